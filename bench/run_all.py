"""Run every benchmark (`make bench`), one subprocess each, and print their headline numbers.

A benchmark reports, it does not judge: a missed target or a failing script is listed, and this
runner still exits 0, so `make bench` never breaks a build.

    .venv/bin/python bench/run_all.py [--quick] [--only startup,pretrain,...] [--skip NAME,...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ORDER = [
    "startup",
    "pretrain",
    "generation",
    "prompt_scoring",
    "finetune",
    "perplexity",
    "quickstart",
    "scaling",
    "preference",
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    p.add_argument("--no-write", action="store_true", help="pass --no-write (keep results/)")
    p.add_argument("--only", default="", help="comma-separated names to run")
    p.add_argument("--skip", default="", help="comma-separated names to leave out")
    args = p.parse_args()
    only = [n for n in args.only.split(",") if n]
    skip = {n for n in args.skip.split(",") if n}
    names = [n for n in ORDER if (not only or n in only) and n not in skip]
    status: list[list[object]] = []
    for name in names:
        argv = [sys.executable, str(common.REPO / "bench" / f"{name}.py")]
        argv += ["--quick"] * args.quick + ["--no-write"] * args.no_write
        common.log(f"\n=== bench/{name}.py {'--quick' if args.quick else ''}")
        t0 = time.perf_counter()
        code = subprocess.run(argv, cwd=common.REPO, check=False).returncode
        seconds = time.perf_counter() - t0
        headline = ""
        result = common.RESULTS / f"{name}.json"
        if code == 0 and result.exists():
            history = json.loads(result.read_text()).get("history", [])
            if history:
                headline = ", ".join(
                    f"{k}={v}" for k, v in history[-1].items() if k not in ("at", "quick")
                )
        status.append([name, "ok" if code == 0 else f"exit {code}", seconds, headline])
    print("\n" + common.table(["benchmark", "status", "seconds", "headline"], status))
    print("\nDetails: bench/results/<name>.md; how to read them: BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
