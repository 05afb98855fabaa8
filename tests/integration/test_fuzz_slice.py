"""A bounded slice of the fuzz campaign (docs/fuzzing.md; ``make fuzz`` runs the whole of it).

In-process: 3,000 mutated first PDUs and 3,000 mutated request heads through the parsers, each checked
against PS3.8 / RFC 9112 and across read boundaries. Through a running pacslb: 1,000 of each over real
sockets, against nodes that record what reaches them, with a well-behaved client served between
batches. Nothing may crash, hang, break the standard or reach a node that pacslb refused; pacslb's log
holds no traceback. The seeds are the stored captures and pynetdicom's encodings (no tool is run).
"""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from fuzz import inproc, live, seeds  # noqa: E402

SEED = 20240601


def test_parsers_slice() -> None:
    for kind in ("dicom", "http"):
        figures = inproc.run_mutator(kind, 3000, SEED, None)
        assert figures["crashes"] == 0 and figures["hangs"] == 0, figures
        assert len(figures["outcomes"]) >= 3, figures  # refusals of several kinds, and accepted inputs


def test_running_pacslb_slice(tmp_path: Path) -> None:
    inputs = {kind: list(seeds.build(kind, live=False).values()) for kind in ("dicom", "http")}
    result = live.run({"dicom": 1000, "http": 1000}, inputs, SEED, None, tmp_path, concurrency=32, batch=500)
    for kind, figures in result["figures"].items():
        assert figures.inputs == 1000, (kind, figures)
        assert (figures.hangs, figures.violations) == (0, 0), (kind, figures.details)
        assert len(figures.outcomes) >= 3, (kind, figures.outcomes)  # refused, accepted and closed all seen
    assert result["figures"]["dicom"].outcomes["accepted"] > 0
    assert result["figures"]["http"].outcomes["forwarded"] > 0
    assert result["probes"]["failed"] == 0, result["probes"]
    assert result["pacslb_alive_at_end"], result
    assert result["tracebacks"] == [], result["tracebacks"]
