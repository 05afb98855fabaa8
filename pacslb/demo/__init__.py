"""The embedded demo (``pacslb demo``): three simulated PACS nodes behind the four INFINITT-style services.

What this package owns: the simulated nodes (a pynetdicom SCP and a small status web server each), the
demo study it generates for storescu, the balancer config it builds, and the banner telling a newcomer
what to try. What it must not do: balance anything itself. The balancing is the real engine
(:func:`pacslb.engine.serve`) running the config built here, so the demo shows the product, not a mock.

Theory of operation.

- Ports derive from one base (``--base-port``, default 10000), mirroring INFINITT's layout shifted into
  the unprivileged range: web base+80, dicom base+104, query base+105, mwl base+204. Node *i* (1..3)
  listens for DICOM on base+1100+i and for HTTP on base+1180+i. Everything binds 127.0.0.1 only.
- The nodes share one archive, as the nodes of a real PACS cluster share one database: a study sent
  through the dicom service can be found through the query service whichever node each lands on
  (the services keep separate persistence tables, so they may pick different nodes). What each node
  did itself (instances it received, requests it answered) is counted per node, which is what shows
  the balancing at work.
- Each node answers C-ECHO, C-STORE of every storage SOP class, C-FIND in the study- and patient-root
  models (built from the archive) and Modality Worklist C-FIND (a few fixed scheduled procedure steps).
  It accepts any called AE title: clients address the balancer (e.g. "INFINITT"), not the node.
- pynetdicom and http.server are thread-based; they run in their own threads beside the event loop and
  share nothing with it but the archive, which has its own lock.
- Lifecycle: generate the study, start the nodes, run the engine until SIGINT/SIGTERM, then stop the
  nodes and remove the temporary directory, whatever happened in between.
- pydicom and pynetdicom are imported where they are used, not at the top: the CLI imports this module
  to build its parser for every command, and those two take about half a second to import.


The modules: ``layout`` (ports, AE titles, timings), ``archive`` (the shared archive, C-FIND matching, the
worklist, the demo study), ``nodes`` (a simulated node and its web page) and ``launch`` (the config, the
banner, the entry points).
"""

from pacslb.demo.archive import WORKLIST, answer, matches
from pacslb.demo.launch import add_arguments, banner, build_config_text, main
from pacslb.demo.layout import NODE_COUNT, DemoPorts

__all__ = [
    "NODE_COUNT",
    "WORKLIST",
    "DemoPorts",
    "add_arguments",
    "answer",
    "banner",
    "build_config_text",
    "main",
    "matches",
]
