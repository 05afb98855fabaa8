"""The fuzz campaign (``make fuzz``, docs/fuzzing.md): malformed DICOM first PDUs and HTTP request heads
against the code that reads untrusted bytes, in two passes.

- in-process (:mod:`fuzz.inproc`): the sans-IO parsers (pacslb/protocols/dicom.py, http1.py) called
  directly, coverage-guided with atheris (libFuzzer) when it is installed, else with the seeded mutator;
  every input is checked by :mod:`fuzz.oracle` (what comes out must be what PS3.8 / RFC 9112 allow, and
  must not depend on how the bytes were split into reads);
- through a running pacslb (:mod:`fuzz.live`): mutated inputs over real sockets to a ``pacslb run``
  process in front of in-process nodes that record what reaches them; the answers are checked against
  the standard, the nodes must never see what pacslb refused, and a well-behaved client is served between
  batches.

Seeds are real captures (:mod:`fuzz.seeds`); the mutator is :mod:`fuzz.mutate`; :mod:`fuzz.campaign` is the
command line. Nothing here is collected by pytest (no ``test_*`` module); tests/integration/test_fuzz_slice.py
runs a bounded slice.
"""
