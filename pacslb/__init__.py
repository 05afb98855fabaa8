"""pacslb: a load balancer for medical-imaging (PACS) clusters that understands DICOM."""

import os as _os

__version__ = "0.1.0"

# PACSLB_COMPILE=0 when pacslb runs: the per-request path runs as Python even where it was compiled (a wheel
# with it, a checkout after `make`), with the same behaviour: to compare the two, or to rule one out.
if _os.environ.get("PACSLB_COMPILE") == "0":
    from pacslb.compiled import prefer_sources

    prefer_sources()
