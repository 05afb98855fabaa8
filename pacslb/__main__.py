"""``python -m pacslb``: the same as the ``pacslb`` command.

``health`` and ``role``, which keepalived runs every second and on every transition, take a shortcut that
loads neither the config models nor asyncio (pacslb/cluster/quick.py); everything else, and anything
unusual, goes to the full command line.
"""

import sys

if sys.argv[1:2] in (["health"], ["role"]):
    from pacslb.cluster.quick import main as quick

    code = quick(sys.argv[1:])
    if code is not None:
        sys.exit(code)

from pacslb.cli import main

sys.exit(main())
