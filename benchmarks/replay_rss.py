"""Peak RSS of ``qsim replay`` on huge disks (issue #19: memory follows the data, not the disk).

Run by hand (needs qemu-img and /usr/bin/time; the images are sparse, a few MB on disk; the traces ~130 MB each):

    .venv/bin/python benchmarks/replay_rss.py [FOLDER] [--requests 10M]

Cases, each a fresh ``python -m qsim replay`` process, ``--l2-cache-size 1M,default``:
- 10M requests, uniform over an empty real 16 TiB image (qemu-img create), 4k/70:64k/30, 30% writes, fsync/64:
  the issue's case. Every one of the 32,768 L2 tables gets created.
- the same size read-only (no table exists, nothing is looked up);
- a synthetic 1 EiB disk with 2 MiB clusters, 20k requests, 30% writes;
- 1M requests, 30% writes, over a synthetic metadata-preallocated 1 TiB image (16,384 dense tables).

Measured 2026-12-02 on the shared 2-core box (before -> after the sparse entries):
16T 30% writes 5,283 MB, 131.8 s -> 618 MB, 23.3 s (same output); 16T read-only 457 -> 458 MB;
1E 2M clusters, 20k requests spread over the whole disk: 12.4 GB -> 382 MB; prealloc 1T, 1M requests 30%
writes: 522 -> 525 MB.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def peak(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of ``cmd`` (GNU time)."""
    proc = subprocess.run(["/usr/bin/time", "-f", "%e %M", *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} failed: {proc.stderr.strip()[-300:]}")
    seconds, kib = proc.stderr.strip().splitlines()[-1].split()
    return float(seconds), int(kib)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", nargs="?", default=None)
    p.add_argument("--requests", default="10M")
    args = p.parse_args()
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None or not os.path.exists("/usr/bin/time"):
        print("needs qemu-img and /usr/bin/time", file=sys.stderr)
        return 2
    folder = args.folder or tempfile.mkdtemp(prefix="qsim-replay-rss-")
    os.environ["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    qsim = [sys.executable, "-m", "qsim"]
    image = os.path.join(folder, "big16.qcow2")
    if not os.path.exists(image):
        subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", image, "16T"], check=True)
    traces = {
        "t-writes.npz": ["--size", "16T", "--requests", args.requests, "--bs", "4k/70:64k/30", "--rw", "70",
                         "--fsync", "64", "--seed", "3"],
        "t-reads.npz": ["--size", "16T", "--requests", args.requests, "--bs", "4k", "--rw", "100", "--seed", "4"],
        "t-1e.npz": ["--size", "1E", "--requests", "20k", "--bs", "4k", "--rw", "70", "--seed", "1"],
        "t-1t.npz": ["--size", "1T", "--requests", "1M", "--bs", "4k/70:64k/30", "--rw", "70", "--seed", "5"],
    }
    for name, argv in traces.items():
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            subprocess.run([*qsim, "trace", "synth", path, "--pattern", "uniform", *argv], check=True,
                           stdout=subprocess.DEVNULL)
    caches = ["--l2-cache-size", "1M,default"]
    cases = [
        (f"{args.requests} 30% writes, real 16T", ["--image", image]),
        (f"{args.requests} reads, real 16T", ["--image", image]),
        ("20k 30% writes, synthetic 1E 2M", ["--size", "1E", "-o", "cluster_size=2M"]),
        ("1M 30% writes, prealloc 1T", ["--size", "1T", "-o", "preallocation=metadata"]),
    ]
    for (label, image_args), name in zip(cases, traces):
        seconds, kib = peak([*qsim, "replay", os.path.join(folder, name), *image_args, *caches])
        print(f"{label:<36} {seconds:7.1f} s {kib / 1024:8.0f} MiB peak RSS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
