"""``make fuzz``: the whole campaign, both passes, and its figures.

    python tests/fuzz/campaign.py [--total 1000000] [--live-share 0.2] [--seed 1] [--work .fuzz]

``--total`` inputs are split: ``--live-share`` of them through a running pacslb (half DICOM, half HTTP,
:mod:`fuzz.live`), the rest in-process (half per parser, :mod:`fuzz.inproc`, coverage-guided with atheris
when it is installed). Seeds are captured first (:mod:`fuzz.seeds`) and kept in WORK/seeds; the corpus
atheris grows is WORK/corpus; failing inputs are saved in WORK/crashes; the figures go to
WORK/results-SEED.json and are printed. Exit status 1 when anything crashed, hung or broke the standard.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from fuzz import inproc, live, seeds  # noqa: E402

REPO = TESTS.parent
KINDS = ("dicom", "http")


def prepare_seeds(work: Path, capture: bool) -> dict[str, list[bytes]]:
    for kind in KINDS:
        directory = work / "seeds" / kind
        if capture or not directory.exists() or not any(directory.iterdir()):
            seeds.write(seeds.build(kind, live=capture), directory)
    return {kind: list(seeds.load(work / "seeds" / kind).values()) for kind in KINDS}


def run_inproc(kind: str, runs: int, seed: int, work: Path, engine: str) -> dict[str, Any]:
    """One in-process pass in its own process (atheris ends the process it runs in)."""
    log = work / f"inproc-{kind}.log"
    argv = [sys.executable, str(Path(inproc.__file__)), "--kind", kind, "--runs", str(runs), "--seed", str(seed)]
    argv += ["--work", str(work), "--engine", engine, "--stats", str(work / f"inproc-{kind}.json")]
    started = time.monotonic()
    with log.open("wb") as out:
        code = subprocess.call(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    seconds = round(time.monotonic() - started, 1)
    text = log.read_text(errors="replace")
    if engine == "mutator":
        figures: dict[str, Any] = json.loads((work / f"inproc-{kind}.json").read_text())
        figures["exit_code"] = code
        return figures
    done = re.search(r"Done (\d+) runs in (\d+) second", text)
    crash_files = sorted(p.name for p in (work / "crashes" / f"inproc-{kind}").glob("*-*"))
    cov = re.findall(r"cov: (\d+) ft: (\d+) corp: (\d+)", text)
    return {
        "kind": kind,
        "engine": "atheris (libFuzzer, coverage of pacslb/protocols)",
        "inputs": int(done.group(1)) if done else None,
        "seconds": seconds,
        "exit_code": code,
        "crashes": 0 if code == 0 else 1,
        "hangs": sum(1 for name in crash_files if name.startswith("timeout-")),
        "artifacts": crash_files,
        "coverage_edges": int(cov[-1][0]) if cov else None,
        "corpus_units": int(cov[-1][2]) if cov else None,
        "error": None if code == 0 else text[-3000:],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--total", type=int, default=1_000_000)
    parser.add_argument("--live-share", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--work", type=Path, default=REPO / ".fuzz")
    parser.add_argument("--concurrency", type=int, default=48)
    parser.add_argument("--engine", choices=["auto", "atheris", "mutator"], default="auto")
    parser.add_argument("--no-capture", action="store_true", help="reuse WORK/seeds instead of capturing again")
    parser.add_argument("--skip", choices=["live", "inproc"], action="append", default=[])
    args = parser.parse_args()
    work: Path = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401

            engine = "atheris"
        except ImportError:
            engine = "mutator"
    started = time.monotonic()
    seed_inputs = prepare_seeds(work, capture=not args.no_capture)
    live_total = int(args.total * args.live_share)
    inproc_total = args.total - live_total
    results: dict[str, Any] = {
        "seed": args.seed,
        "total": args.total,
        "seeds": {kind: len(v) for kind, v in seed_inputs.items()},
    }
    if "live" not in args.skip and live_total:
        run_dir = work / f"live-{args.seed}"
        run_dir.mkdir(parents=True, exist_ok=True)
        counts = {"dicom": live_total // 2, "http": live_total - live_total // 2}
        outcome = live.run(counts, seed_inputs, args.seed, work, run_dir, concurrency=args.concurrency)
        results["live"] = {
            kind: {
                "inputs": f.inputs, "outcomes": dict(f.outcomes), "hangs": f.hangs, "violations": f.violations,
                "status_differs_from_parser": f.mismatches, "details": f.details, "differs": f.differs,
            }
            for kind, f in outcome.pop("figures").items()
        }  # fmt: skip
        results["live"].update(outcome)
        print(json.dumps(results["live"], indent=2, default=str), flush=True)
    if "inproc" not in args.skip and inproc_total:
        results["inproc"] = {}
        for kind, runs in (("dicom", inproc_total // 2), ("http", inproc_total - inproc_total // 2)):
            results["inproc"][kind] = run_inproc(kind, runs, args.seed, work, engine)
            print(json.dumps(results["inproc"][kind], indent=2), flush=True)
    results["seconds"] = round(time.monotonic() - started, 1)
    bad = 0
    for kind in KINDS:
        lv = results.get("live", {}).get(kind, {})
        ip = results.get("inproc", {}).get(kind, {})
        bad += lv.get("hangs", 0) + lv.get("violations", 0) + (ip.get("crashes") or 0) + (ip.get("hangs") or 0)
    lv = results.get("live", {})
    if lv:
        bad += len(lv.get("tracebacks", [])) + lv["probes"]["failed"] + (0 if lv.get("pacslb_alive_at_end") else 1)
    results["problems"] = bad
    (work / f"results-{args.seed}.json").write_text(json.dumps(results, indent=2, default=str))
    print(
        f"fuzz: {args.total} inputs, {bad} problems, {results['seconds']} s; figures in {work}/results-{args.seed}.json"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
