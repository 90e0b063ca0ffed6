"""The whole quickstart: wall time and peak memory of
`mlsteps run configs/quickstart.yaml --run-dir <tmp>` (every stage, from a fresh run directory).
Targets: <= 180 s and <= 3 GB.

Memory is measured two ways: the peak of the summed RSS of the whole process tree (psutil,
polled every 50 ms; shared pages of forked workers count once per process, so this errs high)
and the largest single-process peak (``ru_maxrss`` of the children). Stage durations come from
the run's state.json. Skipped, with a message, while configs/quickstart.yaml does not exist.

    .venv/bin/python bench/quickstart.py [--quick] [--recipe PATH]
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TARGET_S = 180.0
TARGET_GB = 3.0


def run_once(recipe: Path, overrides: list[str], timeout_s: float | None) -> dict[str, Any]:
    script = str(Path(sys.executable).parent / "mlsteps")
    with tempfile.TemporaryDirectory(prefix="bench-quickstart-") as tmp:
        run_dir = Path(tmp) / "run"
        argv = [sys.executable, script, "run", str(recipe), *overrides, "--run-dir", str(run_dir)]
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            argv, cwd=common.REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        timed_out = False
        with common.RssSampler(pid=proc.pid) as tree:
            try:
                _, err = proc.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                # SIGINT: mlsteps stops at a safe point and records what finished in state.json.
                timed_out = True
                proc.send_signal(signal.SIGINT)
                try:
                    _, err = proc.communicate(timeout=120)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    _, err = proc.communicate()
        wall = time.perf_counter() - t0
        single_peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        stages: dict[str, Any] = {}
        state = run_dir / "state.json"
        if state.exists():
            for name, entry in json.loads(state.read_text()).get("stages", {}).items():
                stages[name] = {"status": entry.get("status"), "seconds": entry.get("duration_s")}
        return {
            "exit_code": proc.returncode,
            "timed_out_after_s": timeout_s if timed_out else None,
            "wall_s": wall,
            "tree_peak_mb": tree.peak_mb,
            "single_process_peak_mb": single_peak_mb,
            "stages": stages,
            "stderr_tail": err[-1500:] if proc.returncode else "",
        }


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--recipe", type=Path, default=common.REPO / "configs" / "quickstart.yaml")
    p.add_argument("--timeout", type=float, default=None, help="stop the run (SIGINT) after N s")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE overrides passed to mlsteps run")
    args = p.parse_args()
    if not args.recipe.exists():
        msg = f"skipped: {args.recipe} does not exist (yet)"
        print(msg)
        common.write_results(
            "quickstart",
            quick=args.quick,
            result={"skipped": msg},
            markdown=msg,
            headline={"skipped": True},
            no_write=args.no_write,
        )
        return
    overrides = list(args.overrides)
    if args.quick:
        common.log("--quick: the quickstart is run as is (it is the smoke test); one run")
    res = run_once(args.recipe, overrides, args.timeout)
    gb = max(res["tree_peak_mb"], res["single_process_peak_mb"]) / 1024
    rows = [
        ["wall time (s)", res["wall_s"], TARGET_S, common.verdict(res["wall_s"], TARGET_S, False)],
        [
            "peak RSS, process tree sum (GB)",
            res["tree_peak_mb"] / 1024,
            TARGET_GB,
            common.verdict(res["tree_peak_mb"] / 1024, TARGET_GB, False),
        ],
        [
            "peak RSS, largest process (GB)",
            res["single_process_peak_mb"] / 1024,
            TARGET_GB,
            common.verdict(res["single_process_peak_mb"] / 1024, TARGET_GB, False),
        ],
    ]
    out = common.table(["measure", "value", "target", "verdict"], rows)
    stage_table = common.table(
        ["stage", "status", "seconds"],
        [[k, v["status"], v["seconds"]] for k, v in res["stages"].items()],
    )
    load = os.getloadavg()[0]
    head = (
        f"`mlsteps run {args.recipe.relative_to(common.REPO) if args.recipe.is_relative_to(common.REPO) else args.recipe}"
        f"{' ' + ' '.join(overrides) if overrides else ''} --run-dir <tmp>`, fresh run "
        f"directory, exit code {res['exit_code']}"
        + (f" (stopped after {args.timeout:g} s: INCOMPLETE)" if res["timed_out_after_s"] else "")
        + f"; {os.cpu_count()} CPUs, load average "
        f"{load:.1f} at the end."
    )
    print(head + "\n\n" + out + "\n\n" + stage_table)
    if res["exit_code"]:
        print("stderr tail:\n" + res["stderr_tail"])
    common.write_results(
        "quickstart",
        quick=args.quick,
        result=res,
        markdown=head + "\n\n" + out + "\n\nPer stage (state.json):\n\n" + stage_table,
        headline={
            "wall_s": round(res["wall_s"], 1),
            "peak_gb": round(gb, 2),
            "exit": res["exit_code"],
            "complete": not res["timed_out_after_s"],
        },
        no_write=args.no_write,
    )


if __name__ == "__main__":
    main()
