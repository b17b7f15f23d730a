#!/usr/bin/env python3
"""qsim against its peers, in one process run, on the same traces: requests per second and ratios.

    python benchmarks/run.py --quick     # about 2 minutes
    python benchmarks/run.py             # the full set (several minutes)
    python benchmarks/run.py --smoke     # seconds; what the test suite runs so this file cannot rot

Peers: libCacheSim's LRU (PyPI ``libcachesim``, C, fed the same L2 slice-key stream as an oracleGeneral binary
trace, one object of size 1 per slice so its cache size counts entries; ``hashpower`` set to fit the key count), a
plain ``collections.OrderedDict`` LRU, and real ``qemu-io`` on a smaller trace (the ground truth, not a speed peer).
Each figure is the median of several rounds run interleaved (A, B, C, A, B, C, ...) because this machine is shared
and noisy: absolute seconds drift, ratios measured together hold. Every peer's miss count is checked against
qsim's before its time is reported.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qsim.engine import run_kernel  # noqa: E402
from qsim.geometry import ImageGeometry  # noqa: E402
from qsim.image import build_image  # noqa: E402
from qsim.imageopts import ImageOptions  # noqa: E402
from qsim.lru import counts_for_sizes  # noqa: E402
from qsim.replay import parse_cache_sizes, replay  # noqa: E402
from qsim.synth import synthesize  # noqa: E402
from qsim.trace import Trace, concat  # noqa: E402
from qsim.traceio import read_trace, write_trace  # noqa: E402

TIB = 1 << 40
SIZES_20 = "64k..64M:20"


def workloads(n: int, smoke: bool):
    """(name, image options, virtual size, trace) for a request count."""
    one_t = 64 << 30 if smoke else TIB
    four_t = 256 << 30 if smoke else 4 * TIB
    pre = ImageOptions(preallocation="metadata")
    yield "uniform 4k reads, 1T 64k", pre, one_t, synthesize(one_t, n, "uniform", "4k", seed=1)
    yield "zipf:1.2 4k reads, 1T 64k", pre, one_t, synthesize(one_t, n, "zipf:1.2", "4k", seed=2)
    yield "sequential 64k reads, 1T 64k", pre, one_t, synthesize(one_t, n, "seq", "64k", seed=3)
    yield "fio randrw trace x N, 1T 64k", pre, one_t, scaled_fio_trace(n, one_t)
    yield ("uniform 4k reads, 4T 2M extended_l2", ImageOptions(cluster_size=2 << 20, extended_l2=True,
                                                               preallocation="metadata"), four_t,
           synthesize(four_t, n, "uniform", "4k", seed=4))


def scaled_fio_trace(n: int, disk: int) -> Trace:
    """The bundled real fio trace, repeated at shifted offsets (8 GiB apart) up to n requests."""
    base = read_trace(str(ROOT / "traces" / "fio-randrw-mixed-fsync.iolog.gz"))
    copies, k = [], 0
    while sum(len(c) for c in copies) < n:
        shift = (k * (8 << 30)) % (disk - (8 << 30))
        copies.append(Trace(base.op, base.offset + shift, base.length, None, base.source))
        k += 1
    t = concat(copies)
    return t.select(np.arange(n))


# --- contenders ---------------------------------------------------------------------------------------------------

def qsim_replay(trace, size, options, image, sizes):
    rows = replay(trace, size, options, image=image, l2_cache_sizes=sizes).rows
    return rows


def ordered_dict_lru(keys: list, entries: int) -> int:
    cache: OrderedDict = OrderedDict()
    misses = 0
    for key in keys:
        if key in cache:
            cache.move_to_end(key)
        else:
            misses += 1
            cache[key] = True
            if len(cache) > entries:
                cache.popitem(last=False)
    return misses


def write_oracle_general(keys: np.ndarray, path: str) -> None:
    """libCacheSim's oracleGeneral binary format: uint32 time, uint64 id, uint32 size, int64 next access."""
    record = np.zeros(len(keys), dtype=[("t", "<u4"), ("id", "<u8"), ("size", "<u4"), ("next", "<i8")])
    record["t"] = np.arange(len(keys), dtype=np.uint32)
    record["id"] = keys.astype(np.uint64) + 1
    record["size"] = 1
    record["next"] = -1
    record.tofile(path)


def libcachesim_lru(path: str, n: int, entries: int, n_keys: int) -> int:
    import libcachesim as lcs

    reader = lcs.TraceReader(path, lcs.TraceType.ORACLE_GENERAL_TRACE)
    hashpower = max(int(np.ceil(np.log2(max(n_keys, 2)))) + 1, 10)
    cache = lcs.LRU(cache_size=entries, hashpower=hashpower)
    miss_ratio, _ = cache.process_trace(reader)
    return int(round(miss_ratio * n))


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def peak_bytes_per_request(n: int) -> float:
    """Peak resident memory growth of a fresh process replaying n uniform 4k reads on a 1T metadata-preallocated
    image with 20 cache sizes, per request. The peak is reset after a warm-up run (clear_refs), so numba's one-time
    compilation does not hide or inflate it."""
    code = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from qsim.replay import replay
from qsim.synth import synthesize
from qsim.imageopts import ImageOptions
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
replay(synthesize(1 << 30, 1000, "uniform", "4k", seed=1), 1 << 30, ImageOptions(preallocation="metadata"),
       l2_cache_sizes={SIZES_20!r})
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS")
t = synthesize(1 << 40, {n}, "uniform", "4k", seed=1)
replay(t, 1 << 40, ImageOptions(preallocation="metadata"), l2_cache_sizes={SIZES_20!r})
print((status("VmHWM") - base) / {n})
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def parse_speed(lines: int, rounds: int) -> dict[str, float]:
    """Trace parsing, lines per second, against peers on the same files in interleaved rounds: fio iolog (plain
    and gzip) against a plain Python split loop, CSV against pandas.read_csv (its C tokenizer, no checks) and
    Python's csv module. Every contender must count the same requests."""
    import pandas as pd

    with tempfile.TemporaryDirectory() as d:
        t = synthesize(1 << 40, lines, "uniform", "4k", read_share=0.7, flush_every=16, seed=5)
        paths = {suffix: os.path.join(d, "t" + suffix) for suffix in (".iolog", ".iolog.gz", ".csv")}
        for path in paths.values():
            write_trace(t, path, "/dev/vda")
        contenders = {
            "iolog": (read_trace, paths[".iolog"]), "iolog_python_split": (_python_iolog, paths[".iolog"]),
            "iolog_gz": (read_trace, paths[".iolog.gz"]),
            "iolog_gz_python_split": (_python_iolog, paths[".iolog.gz"]),
            "csv": (read_trace, paths[".csv"]),
            "csv_pandas_read_csv": (lambda p: pd.read_csv(p, dtype={"op": "category"}), paths[".csv"]),
            "csv_python_csv": (_python_csv, paths[".csv"]),
        }
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(rounds):
            for name, (fn, path) in contenders.items():
                dt, result = timed(fn, path)
                assert len(result) == len(t), (name, len(result), len(t))
                times[name].append(dt)
    rate = {name: len(t) / statistics.median(ts) for name, ts in times.items()}
    return {
        "iolog_lines_s": rate["iolog"], "iolog_vs_python_split": rate["iolog"] / rate["iolog_python_split"],
        "iolog_gz_lines_s": rate["iolog_gz"],
        "iolog_gz_vs_python_split": rate["iolog_gz"] / rate["iolog_gz_python_split"],
        "csv_lines_s": rate["csv"], "csv_vs_pandas_read_csv": rate["csv"] / rate["csv_pandas_read_csv"],
        "csv_vs_python_csv": rate["csv"] / rate["csv_python_csv"],
    }


def _python_iolog(path):
    """The plain peer: split each line into three lists (no checks)."""
    import gzip

    ops, offsets, lengths = [], [], []
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        next(f)
        for line in f:
            parts = line.split()
            if len(parts) == 5:
                ops.append(parts[2])
                offsets.append(int(parts[3]))
                lengths.append(int(parts[4]))
    return ops


def _python_csv(path):
    ops, offsets, lengths = [], [], []
    with open(path, newline="") as f:
        reader = csv.reader(f)
        next(reader)
        for op, offset, length in reader:
            ops.append(op)
            offsets.append(int(offset))
            lengths.append(int(length))
    return ops


def qemu_rate(rounds: int) -> float | None:
    """Requests per second of real qemu-io replaying 5000 4k random reads (with cache tracing, as validate does)."""
    import shutil

    if not shutil.which("qemu-io"):
        return None
    from qsim.qemu import replay_in_qemu

    t = synthesize(8 << 30, 5000, "uniform", "4k", seed=6)
    times = [timed(replay_in_qemu, t, 8 << 30, ImageOptions(preallocation="metadata"), 64 << 10)[0]
             for _ in range(rounds)]
    return len(t) / statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="1M requests, 3 rounds (about 2 minutes)")
    mode.add_argument("--smoke", action="store_true", help="tiny sizes, 1 round: checks the harness works")
    p.add_argument("--csv", default=str(ROOT / "benchmarks" / "results" / "latest.csv"))
    p.add_argument("--only", metavar="TEXT", help="only the workloads whose name contains TEXT (e.g. fio, zipf); "
                   "'parse': trace parsing alone")
    args = p.parse_args()
    if args.smoke:
        counts, rounds, od_limit = [20_000], 1, 20_000
    elif args.quick:
        counts, rounds, od_limit = [1_000_000], 3, 1_000_000
    else:
        counts, rounds, od_limit = [1_000_000, 10_000_000], 5, 10_000_000
    try:
        import libcachesim  # noqa: F401
        have_lcs = True
    except ImportError:
        have_lcs = False
        print("note: libcachesim not installed (pip install libcachesim): that peer is skipped", file=sys.stderr)

    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    results = []
    for n in counts:
        for name, options, size, trace in workloads(n, args.smoke):
            if args.only and args.only not in name:
                continue
            g = ImageGeometry(size, options.cluster_size, options.extended_l2)
            image = build_image(g, options)
            sizes20 = parse_cache_sizes(SIZES_20)
            one = [1 << 20]
            # the slice-key stream the peers get (4 KiB slices at these sizes)
            entry = replay(trace.select(np.arange(min(len(trace), 10))), size, options, image=image,
                           l2_cache_sizes=one).rows[0]["l2_cache_entry_size"]
            stream = run_kernel(image, trace, entry).events
            keys = stream.key
            n_keys = stream.n_keys
            entries_one = replay(trace.select(np.arange(1)), size, options, image=image,
                                 l2_cache_sizes=one).rows[0]["l2_cache_entries"]
            expected = counts_for_sizes(keys, stream.kind, stream.flush_at, n_keys, [entries_one])[0].misses
            with tempfile.TemporaryDirectory() as d:
                lcs_path = os.path.join(d, "keys.oracleGeneral")
                if have_lcs:
                    write_oracle_general(keys, lcs_path)
                key_list = keys.tolist() if n <= od_limit else None
                t_q1, t_q20, t_lcs, t_od = [], [], [], []
                for _ in range(rounds):  # interleaved rounds
                    dt, rows = timed(qsim_replay, trace, size, options, image, one)
                    assert rows[0]["l2_misses"] == expected
                    t_q1.append(dt)
                    t_q20.append(timed(qsim_replay, trace, size, options, image, sizes20)[0])
                    if have_lcs:
                        dt, misses = timed(libcachesim_lru, lcs_path, len(keys), entries_one, n_keys)
                        assert misses == expected, f"libcachesim {misses} != qsim {expected} ({name})"
                        t_lcs.append(dt)
                    if key_list is not None:
                        dt, misses = timed(ordered_dict_lru, key_list, entries_one)
                        assert misses == expected, f"OrderedDict {misses} != qsim {expected} ({name})"
                        t_od.append(dt)
            q1, q20 = statistics.median(t_q1), statistics.median(t_q20)
            row = {"workload": name, "requests": n, "l2_lookups": len(keys), "misses_at_1M": expected,
                   "qsim_1_size_req_s": n / q1, "qsim_20_sizes_req_s": n / q20}
            if t_lcs:
                lcs_t = statistics.median(t_lcs)
                row.update(libcachesim_1_size_req_s=n / lcs_t, qsim20_vs_libcachesim1=lcs_t / q20)
            if t_od:
                od_t = statistics.median(t_od)
                row.update(ordereddict_1_size_req_s=n / od_t, qsim20_vs_ordereddict20=20 * od_t / q20)
            results.append(row)
            print(_format_row(row), flush=True)
    extra = parse_speed(20_000 if args.smoke else 2_000_000, rounds)
    if not args.smoke and args.only != "parse":  # --only parse: the parsing figures alone
        extra["bytes_per_request_10M"] = peak_bytes_per_request(10_000_000 if not args.quick else 1_000_000)
        extra["qemu_io_req_s"] = qemu_rate(rounds)
    print(f"trace parsing: {extra['iolog_lines_s'] / 1e6:.2f}M iolog lines/s "
          f"({extra['iolog_vs_python_split']:.1f}x a plain Python split loop); gzip "
          f"{extra['iolog_gz_lines_s'] / 1e6:.2f}M/s ({extra['iolog_gz_vs_python_split']:.1f}x); CSV "
          f"{extra['csv_lines_s'] / 1e6:.2f}M lines/s ({extra['csv_vs_pandas_read_csv']:.1f}x pandas.read_csv, "
          f"{extra['csv_vs_python_csv']:.1f}x Python's csv module)")
    if "bytes_per_request_10M" in extra:
        print(f"peak memory: {extra['bytes_per_request_10M']:.0f} bytes per request (1T, 20 cache sizes)")
    if extra.get("qemu_io_req_s"):
        print(f"qemu-io replay (ground truth): {extra['qemu_io_req_s']:.0f} requests/s")
    print(f"machine: {machine}")
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in results for k in r}))
        writer.writeheader()
        writer.writerows(results)
    with open(Path(args.csv).with_suffix(".json"), "w") as f:
        json.dump({"machine": machine, "rows": results, **extra}, f, indent=2)
    return 0


def _format_row(row: dict) -> str:
    parts = [f"{row['workload']:<38} {row['requests'] / 1e6:>5.2f}M req",
             f"qsim 1 size {row['qsim_1_size_req_s'] / 1e6:6.2f}M/s",
             f"20 sizes {row['qsim_20_sizes_req_s'] / 1e6:6.2f}M/s"]
    if "libcachesim_1_size_req_s" in row:
        parts.append(f"libCacheSim 1 size {row['libcachesim_1_size_req_s'] / 1e6:5.2f}M/s "
                     f"(qsim 20 sizes {row['qsim20_vs_libcachesim1']:.1f}x faster)")
    if "ordereddict_1_size_req_s" in row:
        parts.append(f"OrderedDict x20: qsim {row['qsim20_vs_ordereddict20']:.0f}x faster")
    return " | ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
