"""pacslb's side-by-side benchmark suite (pacslb vs HAProxy 2.6 vs a direct connection).

Run it with ``python bench/run.py`` (or ``make bench``). It is not a test suite: it measures, prints and
records; it never asserts a timing. See docs/performance.md for what each case measures.
"""
