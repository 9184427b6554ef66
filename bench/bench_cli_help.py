"""Seconds for `open-clip-cxr COMMAND --help` (issue 13's target: under 2 s each).

    python bench/bench_cli_help.py [--repeat 3]

Prints the median wall time per subcommand, in a fresh process each time, and the CPU it ran on.
"""
import argparse
import subprocess
import sys
import time

from bench_common import cpu_name

COMMANDS = ["shards", "eval", "export", "push", "convert", "train-text", "train-clip", "demo", "index", "search", "serve"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(f"CPU: {cpu_name()}")
    print("| subcommand | median --help seconds |\n| --- | --- |")
    for cmd in COMMANDS:
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "open_clip_cxr.cli", cmd, "--help"], capture_output=True)
            times.append(time.perf_counter() - t)
        print(f"| {cmd} | {sorted(times)[len(times) // 2]:.2f} |")


if __name__ == "__main__":
    main()
