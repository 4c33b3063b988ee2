"""Benchmark: start-up time of `forge --help` against a bare `python -c pass`, in one run.

Both are fresh interpreters started from this process, taken in turns so that a busy moment of a
shared machine hits both. The goal is `forge --help` under 0.5 s here; the extra time over a bare
interpreter is what forge's imports and plugin loading cost. The run also lists which heavy
modules (torch, transformers, peft, safetensors) `forge --help` imported: there should be none.

    python benchmarks/bench_startup.py [--repeats 15] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HEAVY_MODULES = ("torch", "transformers", "peft", "safetensors", "numpy")
GOAL_SECONDS = 0.5


def wall_seconds(command: list[str]) -> float:
    """Run `command` once with its output discarded; return its wall time."""
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def heavy_imports_of_help() -> list[str]:
    """Return the heavy top-level packages that importing the CLI and rendering --help loads."""
    code = (
        "import sys\n"
        "from llmforge.cli import cli\n"
        "try:\n"
        "    cli.main(['--help'], prog_name='forge', standalone_mode=False)\n"
        "except SystemExit:\n"
        "    pass\n"
        "import json\n"
        f"print(json.dumps(sorted({{name.split('.')[0] for name in sys.modules}} & set({HEAVY_MODULES!r}))), file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stderr.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="runs of each command to take the median of")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()

    # The console script that pip installed next to this interpreter, as a user's shell runs it.
    script = Path(sys.executable).with_name("forge")
    if not script.is_file():
        raise SystemExit(f"error: no forge script next to {sys.executable}; install the project first: pip install -e .")
    forge_help = [str(script), "--help"]
    bare = [sys.executable, "-c", "pass"]
    wall_seconds(forge_help)  # warm the file system cache, as a second invocation in a shell would be
    forge_times, bare_times = [], []
    for _ in range(args.repeats):
        forge_times.append(wall_seconds(forge_help))
        bare_times.append(wall_seconds(bare))

    forge_median, bare_median = statistics.median(forge_times), statistics.median(bare_times)
    result = {
        "forge_help_s": round(forge_median, 3),
        "python_pass_s": round(bare_median, 3),
        "forge_help_minus_python_s": round(forge_median - bare_median, 3),
        "forge_help_over_python": round(forge_median / bare_median, 2),
        "goal_forge_help_s": GOAL_SECONDS,
        "goal_met": forge_median < GOAL_SECONDS,
        "heavy_modules_imported": heavy_imports_of_help(),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name, value in result.items():
            print(f"{name:<28} {value}")


if __name__ == "__main__":
    main()
