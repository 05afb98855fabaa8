"""The process machinery: worker processes that serve beside the main process, to use every core.

- Relay workers (:mod:`.relayworker`, the workers' side; :mod:`.relaypool`, the main process's) move the
  bytes of established tcp and dicom connections, on a small epoll loop (:mod:`pacslb.proxy.eventloop`).
- Web workers (:mod:`.webworker`; :mod:`.webpool`) serve whole http-mode connections the main process
  accepted and handed them.
- :mod:`.control` starts a worker and carries the messages and descriptors of either kind.

The modes (pacslb/proxy/tcp.py, dicom.py, http.py) import nothing of this package: the engine gives them
the relay pool's relay and the web pool's hand-over.
"""
