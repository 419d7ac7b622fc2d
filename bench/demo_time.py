"""Time `ompq demo` as a user runs it and record what it prints: the README's demo figures.

    OMPQ_DATA_DIR=../shared/data python bench/demo_time.py [--no-gptq] [--runs 1]

Runs the real command in a subprocess (fresh interpreter, imports included) and writes
bench/results/demo_time.json: wall seconds, CPU seconds (user + system of the child), the float
and quantized top-1 it printed, the machine's load average before and after (the figures are only
comparable on an idle machine: say so when quoting a busy one). Nothing is hard-coded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ompq_plugin.fileio import write_text_atomic  # noqa: E402


def one_run(no_gptq: bool) -> dict:
    cmd = [sys.executable, "-c", "import sys; from ompq_plugin.cli import main; sys.exit(main())",
           "demo"] + (["--no-gptq"] if no_gptq else [])
    with tempfile.TemporaryDirectory(prefix="ompq-demo-time-") as tmp:
        load_before = os.getloadavg()
        usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run([*cmd, "-o", str(Path(tmp) / "out")], capture_output=True,
                              text=True, check=False)
        wall = time.perf_counter() - t0
        usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"ompq demo failed ({proc.returncode}): {proc.stderr[-2000:]}")
    out = proc.stdout
    float_top1 = float(re.search(r"^top-1 ([\d.]+)%", out, re.M).group(1))
    quant_top1 = float(re.search(r"quantized top-1 ([\d.]+)%", out).group(1))
    smaller = float(re.search(r"([\d.]+)x smaller weights", out).group(1))
    return {
        "command": "ompq demo" + (" --no-gptq" if no_gptq else ""),
        "wall_s": round(wall, 1),
        "cpu_s": round((usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime),
                       1),
        "float_top1": float_top1,
        "quantized_top1": quant_top1,
        "weights_smaller_x": smaller,
        "verification_pass": "PASS" in out,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-gptq", action="store_true")
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    runs = [one_run(args.no_gptq) for _ in range(args.runs)]
    result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
              "runs": runs}
    path = ROOT / "bench" / "results" / f"demo_time{'_no_gptq' if args.no_gptq else ''}.json"
    write_text_atomic(path, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
