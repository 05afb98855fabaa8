"""``python -m pacslb``: the same as the ``pacslb`` command."""

import sys

from pacslb.cli import main

sys.exit(main())
