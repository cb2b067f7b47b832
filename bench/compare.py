"""Times bench/textbook.py against vanilla_gan.py as whole processes.

Each run is a fresh `python` process, so its wall time counts everything: interpreter
start-up, imports, loading MNIST, training and writing outputs. The two scripts alternate
which goes first in each pair, so a warm file cache or a busy machine favours neither, and
the ratio reported is the median of each pair's own ratio, so a load that changes between
pairs cannot skew it. --busy N runs N busy loops (`while True: pass`) beside both, as other
work on a shared machine would. Peak memory is the child's own peak resident set size (host
RAM, not GPU memory), read with os.wait4 on that one child.

    python bench/compare.py --epochs 3 --pairs 3 --data-dir DIR [--device D] [--busy N]
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEXTBOOK = "textbook"
VANILLA = "vanilla_gan"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--device", help="passed to both (default: each script's own)")
    parser.add_argument("--busy", type=int, default=0, help="busy loops to run beside both")
    return parser.parse_args()


def command(name, args, data_dir, out_dir):
    if name == TEXTBOOK:
        cmd = [sys.executable, str(REPO / "bench" / "textbook.py")]
    else:
        cmd = [sys.executable, str(REPO / "vanilla_gan.py")]
    cmd += ["--epochs", str(args.epochs), "--data-dir", data_dir]
    if args.device:
        cmd += ["--device", args.device]
    if name == VANILLA:
        # A fresh folder each run, so no run resumes or reuses another's files
        cmd += ["--out-dir", out_dir]
    return cmd


def run_once(name, args, data_dir):
    """One child process: (wall seconds, peak RSS in MiB). Exits if it fails."""
    scratch = tempfile.mkdtemp(prefix=f"bench-{name}-")
    try:
        out_dir = os.path.join(scratch, "run")
        os.mkdir(out_dir)
        stderr_path = os.path.join(scratch, "stderr.log")
        cmd = command(name, args, data_dir, out_dir)
        with open(stderr_path, "wb") as stderr_file:
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr_file)
            # wait4, not RUSAGE_CHILDREN: the peak of this child alone, not of all so far
            result = os.wait4(proc.pid, 0)
            seconds = time.perf_counter() - start
        status = result[1]
        usage = result[2]
        # Tell Popen the child is reaped, so it does not wait for it again
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            with open(stderr_path, "rb") as stderr_file:
                tail = stderr_file.read()[-3000:].decode(errors="replace")
            print(f"{name} failed (exit {proc.returncode}): {' '.join(cmd)}", file=sys.stderr)
            print(tail, file=sys.stderr)
            sys.exit(1)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    peak_mib = usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux
    return seconds, peak_mib


def describe(seconds):
    median = statistics.median(seconds)
    return f"{median:.1f}s (min {min(seconds):.1f} to max {max(seconds):.1f})"


def run_pairs(args, data_dir, times, peaks):
    for pair in range(args.pairs):
        order = [TEXTBOOK, VANILLA]
        if pair % 2 == 1:
            order.reverse()
        for name in order:
            seconds, peak_mib = run_once(name, args, data_dir)
            times[name].append(seconds)
            peaks[name].append(peak_mib)
            print(f"pair {pair + 1}/{args.pairs}  {name:12s} {seconds:7.1f}s"
                  f"  peak {peak_mib:7.0f} MiB", flush=True)


def main():
    args = parse_args()
    # Absolute, since the children may not share our idea of a relative path
    data_dir = os.path.abspath(args.data_dir)
    times = {TEXTBOOK: [], VANILLA: []}
    peaks = {TEXTBOOK: [], VANILLA: []}
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        run_pairs(args, data_dir, times, peaks)
    finally:
        for loop in busy:
            loop.kill()
    device = args.device if args.device else "each script's default"
    print(f"\n{args.epochs} epoch(s), {args.pairs} pair(s), device: {device}, "
          f"{args.busy} busy loop(s) beside")
    for name in (TEXTBOOK, VANILLA):
        memory = statistics.median(peaks[name])
        print(f"{name:12s} {describe(times[name])}, median peak {memory:.0f} MiB")
    ratios = [ours / theirs for ours, theirs in zip(times[VANILLA], times[TEXTBOOK])]
    print(f"median of the pairs' ratios {VANILLA} / {TEXTBOOK}: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
