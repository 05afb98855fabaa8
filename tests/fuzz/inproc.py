"""The in-process pass: the sans-IO parsers called directly, every input checked by :mod:`fuzz.oracle`.

With atheris installed this is coverage-guided: libFuzzer mutates (with a dictionary of PS3.8 / RFC 9112
tokens) and keeps in the corpus every input that reaches new lines of pacslb/protocols/dicom.py or
http1.py (httptools' C code is not instrumented: its branches guide nothing). Without atheris the seeded
mutator (:mod:`fuzz.mutate`) feeds it instead. Either way: an exception other than the parser's protocol
error is a crash, a :class:`~fuzz.oracle.Violation` is one too (the input is saved), and an input that takes
longer than ``HANG_SECONDS`` is a hang.

Run as a script (one process per kind: atheris ends the process when it is done)::

    python tests/fuzz/inproc.py --kind dicom --runs 400000 --seed 1 --work .fuzz
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

#: An input that one parse takes this long over is a hang (a parse takes tens of microseconds).
HANG_SECONDS = 5
MAX_LEN = 16_384

DICOM_TOKENS = [
    b"\x01\x00", b"\x00\x01", b"\x10\x00", b"\x20\x00", b"\x21\x00", b"\x30\x00", b"\x40\x00", b"\x50\x00",
    b"\x51\x00\x00\x04", b"\x52\x00", b"\x54\x00", b"\x55\x00", b"\x58\x00", b"1.2.840.10008.3.1.1.1",
    b"1.2.840.10008.1.1", b"1.2.840.10008.1.2", b"1.2.840.10008.1.2.1", b"\x00\x00\x00\x00", b"\xff\xff\xff\xff",
    b"                ", b"\x00\x04", b"\xff\xff",
]  # fmt: skip
HTTP_TOKENS = [
    b"GET", b"HEAD", b"POST", b"CONNECT", b"OPTIONS", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"\r\n", b"\r\n\r\n",
    b"Host:", b"Content-Length:", b"Transfer-Encoding:", b"chunked", b"Connection:", b"close", b"keep-alive",
    b"Upgrade:", b"websocket", b"Expect:", b"100-continue", b"Cookie:", b"X-Forwarded-For:", b"Forwarded:",
    b" ", b"\t", b":", b",", b";", b"0\r\n\r\n", b"\n", b"\r",
]  # fmt: skip


def write_dict(path: Path, tokens: list[bytes]) -> None:
    """A libFuzzer dictionary (one quoted token per line, non-printable bytes as \\xNN)."""
    lines = []
    for token in tokens:
        text = "".join(chr(b) if 0x20 <= b < 0x7F and b not in b'"\\' else f"\\x{b:02X}" for b in token)
        lines.append(f'"{text}"')
    path.write_text("\n".join(lines) + "\n")


def _check(kind: str):  # type: ignore[no-untyped-def]
    from fuzz import oracle

    return oracle.check_dicom if kind == "dicom" else oracle.check_http


def run_atheris(kind: str, runs: int, seed: int, work: Path) -> None:
    """Hand the process to libFuzzer; it exits when done (0) or at the first crash (non-zero)."""
    import atheris

    with atheris.instrument_imports(include=["pacslb.protocols"]):
        import pacslb.protocols.dicom
        import pacslb.protocols.http1  # noqa: F401
    check = _check(kind)
    corpus = work / "corpus" / kind
    seeds_dir = work / "seeds" / kind
    artifacts = work / "crashes" / f"inproc-{kind}"
    for directory in (corpus, artifacts):
        directory.mkdir(parents=True, exist_ok=True)
    dictionary = work / f"{kind}.dict"
    write_dict(dictionary, DICOM_TOKENS if kind == "dicom" else HTTP_TOKENS)

    def target(data: bytes) -> None:
        check(data)

    argv = [
        sys.argv[0],
        f"-runs={runs}",
        f"-seed={seed}",
        f"-max_len={MAX_LEN}",
        f"-timeout={HANG_SECONDS}",
        f"-artifact_prefix={artifacts}/",
        f"-dict={dictionary}",
        "-print_final_stats=1",
        "-rss_limit_mb=1024",
        str(corpus),
        str(seeds_dir),
    ]
    atheris.Setup(argv, target)
    atheris.Fuzz()


def run_mutator(kind: str, runs: int, seed: int, work: Path | None) -> dict[str, object]:
    """The same checks on inputs of the seeded mutator; returns the figures (crashes saved under ``work``)."""
    from fuzz import mutate, oracle, seeds

    check = _check(kind)
    seed_inputs = list(seeds.load(work / "seeds" / kind).values()) if work else list(seeds.build(kind, False).values())
    next_input = mutate.stream(kind, seed_inputs, seed)
    outcomes: dict[str, int] = {}
    crashes: list[str] = []
    hangs = 0
    started = time.monotonic()
    for _ in range(runs):
        data = next_input()
        t0 = time.monotonic()
        try:
            verdict = check(data)
            outcome = verdict.outcome if isinstance(verdict, oracle.DicomVerdict) else _http_outcome(verdict)
        except Exception as exc:  # a crash or a violation: keep the input
            outcome = "crash" if not isinstance(exc, oracle.Violation) else "violation"
            crashes.append(f"{type(exc).__name__}: {exc}"[:500])
            if work is not None:
                path = work / "crashes" / f"inproc-{kind}" / f"{outcome}-{oracle.digest(data)}"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
        if time.monotonic() - t0 > HANG_SECONDS:
            hangs += 1
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return {
        "kind": kind,
        "engine": "seeded mutator",
        "inputs": runs,
        "seconds": round(time.monotonic() - started, 1),
        "outcomes": outcomes,
        "crashes": sum(outcomes.get(k, 0) for k in ("crash", "violation")),
        "hangs": hangs,
        "details": crashes[:20],
    }


def _http_outcome(verdict: object) -> str:
    status = getattr(verdict, "status", None)
    heads = getattr(verdict, "heads", 0)
    return f"refused {status}" if status is not None else ("accepted" if heads else "incomplete")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=["dicom", "http"], required=True)
    parser.add_argument("--runs", type=int, required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--engine", choices=["atheris", "mutator"], default="atheris")
    parser.add_argument("--stats", type=Path, help="where the mutator engine writes its figures (JSON)")
    args = parser.parse_args()
    if args.engine == "atheris":
        run_atheris(args.kind, args.runs, args.seed, args.work)
    else:
        figures = run_mutator(args.kind, args.runs, args.seed, args.work)
        text = json.dumps(figures, indent=2)
        if args.stats:
            args.stats.write_text(text)
        print(text)


if __name__ == "__main__":
    main()
