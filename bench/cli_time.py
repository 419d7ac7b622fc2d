"""Time `ompq search` as a user runs it: a fresh interpreter each run, imports included.

    OMPQ_DATA_DIR=../shared/data python bench/cli_time.py [--runs 5]

Each run is ``ompq search --model resnet20 -o <tmp>`` (the default method, generic profile) in
a subprocess; beside it, in fresh interpreters too, the import of what the command loads
(``torch``) and of what it no longer loads (Brevitas' export and nn, ONNX, onnxruntime). Writes
bench/results/cli_time.json: each run's wall seconds, their median, the import medians, the
code version and the load average before and after (comparable on an idle machine only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from architectures import code_version

RESULTS = Path(__file__).resolve().parent / "results" / "cli_time.json"
SEARCH = "from ompq_plugin.cli import main; import sys; sys.exit(main({argv!r}))"
IMPORTS = {
    "torch": "import torch",
    "brevitas_onnx": "import torch, brevitas.export, brevitas.nn, onnx, onnxruntime",
}


def _wall(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["search", "--model", "resnet20", "-o", str(Path(tmp) / "bits.json")]
        searches = [_wall(SEARCH.format(argv=argv)) for _ in range(args.runs)]
    imports = {name: statistics.median(_wall(code) for _ in range(args.runs))
               for name, code in IMPORTS.items()}
    load.append(os.getloadavg()[0])
    out = {
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "code": code_version(),
        "command": "ompq search --model resnet20 -o bits.json",
        "runs_s": searches,
        "median_s": statistics.median(searches),
        "import_median_s": imports,
        "load_average_1min": load,
    }
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
