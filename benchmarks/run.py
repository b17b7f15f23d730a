#!/usr/bin/env python3
"""qsim against its peers, in one process run, on the same traces: requests per second and ratios.

    python benchmarks/run.py --quick     # about 2 minutes
    python benchmarks/run.py             # the full set (several minutes)
    python benchmarks/run.py --smoke     # seconds; what the test suite runs so this file cannot rot

Peers: libCacheSim's LRU (PyPI ``libcachesim``, C, fed the same L2 slice-key stream as an oracleGeneral binary
trace, one object of size 1 per slice so its cache size counts entries; ``hashpower`` set to fit the key count), a
plain ``collections.OrderedDict`` LRU, and real ``qemu-io`` on a smaller trace (the ground truth, not a speed peer).
Each figure is the best of several rounds run interleaved (A, B, C, A, B, C, ...) because this machine is shared
and noisy: absolute seconds drift (the load average is printed before and after), ratios measured together hold.
Every peer's miss count is checked against qsim's before its time is reported.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import platform
import shutil
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
from qsim.replay import replay  # noqa: E402
from qsim.scenario import Scenario, log_spaced_sizes  # noqa: E402
from qsim.synth import synthesize  # noqa: E402
from qsim.trace import Trace, concat  # noqa: E402
from qsim.traceio import read_trace, write_trace  # noqa: E402

TIB = 1 << 40
SIZES_20 = log_spaced_sizes(64 << 10, 64 << 20, 20)  # bytes: the 20 cache sizes of a miss-ratio curve


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
    rows = replay(trace, Scenario.of(tuple(sizes), None, options, size), state=image).rows
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


def best(times: list[float]) -> float:
    """The fastest round: on a shared machine the others' load only ever adds time."""
    return min(times)


def load() -> str:
    return "load average " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


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
from qsim.scenario import Scenario
from qsim.synth import synthesize
from qsim.imageopts import ImageOptions
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
replay(synthesize(1 << 30, 1000, "uniform", "4k", seed=1),
       Scenario.of({SIZES_20!r}, None, ImageOptions(preallocation="metadata"), 1 << 30))
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS")
t = synthesize(1 << 40, {n}, "uniform", "4k", seed=1)
replay(t, Scenario.of({SIZES_20!r}, None, ImageOptions(preallocation="metadata"), 1 << 40))
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
        try:
            import zstandard
        except ImportError:
            zstandard = None
        if zstandard is not None:  # the zstd text readers: the same files, zstd-compressed (and the CSV gzipped)
            for suffix in (".iolog", ".csv"):
                paths[suffix + ".zst"] = paths[suffix] + ".zst"
                with open(paths[suffix], "rb") as src, open(paths[suffix + ".zst"], "wb") as dst:
                    zstandard.ZstdCompressor().copy_stream(src, dst)
            paths[".csv.gz"] = paths[".csv"] + ".gz"
            write_trace(t, paths[".csv"] + ".tmp.csv")
            with open(paths[".csv"] + ".tmp.csv", "rb") as src, gzip.open(paths[".csv.gz"], "wb") as dst:
                shutil.copyfileobj(src, dst)
            contenders.update({
                "iolog_zst": (read_trace, paths[".iolog.zst"]),
                "iolog_zst_python_split": (_python_iolog, paths[".iolog.zst"]),
                "csv_zst": (read_trace, paths[".csv.zst"]), "csv_gz": (read_trace, paths[".csv.gz"])})
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(rounds):
            for name, (fn, path) in contenders.items():
                dt, result = timed(fn, path)
                assert len(result) == len(t), (name, len(result), len(t))
                times[name].append(dt)
    rate = {name: len(t) / best(ts) for name, ts in times.items()}
    zst = {} if "iolog_zst" not in rate else {
        "iolog_zst_lines_s": rate["iolog_zst"], "iolog_zst_vs_python_split": rate["iolog_zst"] /
        rate["iolog_zst_python_split"], "csv_zst_lines_s": rate["csv_zst"], "csv_zst_vs_gzip": rate["csv_zst"] /
        rate["csv_gz"]}
    return zst | {
        "iolog_lines_s": rate["iolog"], "iolog_vs_python_split": rate["iolog"] / rate["iolog_python_split"],
        "iolog_gz_lines_s": rate["iolog_gz"],
        "iolog_gz_vs_python_split": rate["iolog_gz"] / rate["iolog_gz_python_split"],
        "csv_lines_s": rate["csv"], "csv_vs_pandas_read_csv": rate["csv"] / rate["csv_pandas_read_csv"],
        "csv_vs_python_csv": rate["csv"] / rate["csv_python_csv"],
    }


def _python_iolog(path):
    """The plain peer: split each line into three lists (no checks)."""
    ops, offsets, lengths = [], [], []
    if path.endswith(".zst"):
        import zstandard

        f = zstandard.open(path, "rt")
    else:
        f = gzip.open(path, "rt") if path.endswith(".gz") else open(path)
    with f:
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


def write_binary_traces(directory: str, n: int) -> tuple[str, str, int]:
    """n requests as a vscsi v1 file and as a blktrace pair of per-CPU files (each request a Q and a C record, a
    process note with a 16-byte payload every 16 requests); returns both paths and the blktrace record count."""
    import struct

    from qsim.traceio.vscsi import V1

    rng = np.random.default_rng(7)
    rec = np.zeros(n, dtype=V1)
    rec["ver"], rec["len"], rec["ts"] = 0x0100, 4096, np.arange(n, dtype=np.uint64) * 100
    rec["cmd"] = np.where(rng.random(n) < 0.7, 0x28, 0x2A)
    rec["lbn"] = rng.integers(0, 1 << 31, n) * 8
    vscsi = os.path.join(directory, "bench.vscsi")
    rec.tofile(vscsi)
    header = np.dtype([("magic", "<u4"), ("sequence", "<u4"), ("time", "<u8"), ("sector", "<u8"), ("bytes", "<u4"),
                       ("action", "<u4"), ("pid", "<u4"), ("device", "<u4"), ("cpu", "<u4"), ("error", "<u2"),
                       ("pdu_len", "<u2")])
    records = 0
    for cpu in (0, 1):
        mine = np.arange(cpu, n, 2)
        bt = np.zeros(2 * len(mine), dtype=header)
        bt["magic"], bt["device"], bt["cpu"], bt["bytes"] = 0x65617407, (8 << 20), cpu, 4096
        bt["time"][0::2], bt["time"][1::2] = mine * 1000, mine * 1000 + 500
        bt["sector"][0::2] = bt["sector"][1::2] = rec["lbn"][mine]
        category = np.where(rec["cmd"][mine] == 0x2A, 2, 1).astype(np.uint32) << 16
        bt["action"][0::2], bt["action"][1::2] = 1 | category | (1 << 20), 8 | category | (1 << 23)
        bt["sequence"] = np.arange(1, len(bt) + 1)
        note = struct.pack("<IIQQIIIIIHH", 0x65617407, 0, 0, 0, 0, 1 << 26, 1, 8 << 20, cpu, 0, 16) + b"fio".ljust(16,
                                                                                                            b"\0")
        with open(os.path.join(directory, f"bench.blktrace.{cpu}"), "wb") as f:
            for start in range(0, len(bt), 32):
                f.write(bt[start:start + 32].tobytes())
                f.write(note)
                records += 1
        records += len(bt)
    return vscsi, os.path.join(directory, "bench"), records


def _python_vscsi(path: str, limit: int) -> int:
    """The peer: a plain struct loop over the same records, into Python lists."""
    import struct

    ops, offsets, lengths = [], [], []
    with open(path, "rb") as f:
        data = f.read(32 * limit)
    for sn, length, nsg, cmd, ver, lbn, ts in struct.iter_unpack("<IIIHHQQ", data):
        if cmd in (0x28, 0x2A):
            ops.append(cmd == 0x2A)
            offsets.append(lbn * 512)
            lengths.append(length)
    return len(data) // 32


def _python_blktrace(path: str, limit: int) -> int:
    import struct

    kept, walked = [], 0
    with open(path, "rb") as f:
        data = f.read(56 * limit)
    pos = 0
    unpack = struct.Struct("<IIQQIIIIIHH").unpack_from
    while pos + 48 <= len(data) and walked < limit:
        magic, seq, t, sector, nbytes, action, pid, dev, cpu, err, pdu = unpack(data, pos)
        if action & 0xFFFF == 1 and not action & (1 << 26):
            kept.append((action >> 17 & 1, sector * 512, nbytes, t))
        pos += 48 + pdu
        walked += 1
    return walked


def binary_format_speed(n: int, rounds: int) -> dict:
    """Records per second reading vscsi and blktrace binary files into qsim's Trace columns (iter_trace, streamed;
    the files are in the page cache), against a plain Python struct loop over the same bytes (the peer reads its
    first min(n, 300k) records), interleaved rounds; and the peak memory per request of a whole read_trace."""
    from qsim.traceio import iter_trace, read_trace

    with tempfile.TemporaryDirectory() as d:
        vscsi, blk, blk_records = write_binary_traces(d, n)
        limit = min(n, 300_000)

        def ours(path):
            return sum(len(c) for c in iter_trace(path))

        assert ours(vscsi) == n and ours(blk) == n  # also compiles the decoders once
        t_v, t_b, t_pv, t_pb = [], [], [], []
        for _ in range(rounds):
            t_v.append(timed(ours, vscsi)[0])
            t_b.append(timed(ours, blk)[0])
            dt, walked = timed(_python_vscsi, vscsi, limit)
            t_pv.append(dt / walked)
            dt, walked = timed(_python_blktrace, blk + ".blktrace.0", limit)
            t_pb.append(dt / walked)
        bytes_per_request = _traced_peak(read_trace, vscsi) / n
    vscsi_rate, blk_rate = n / best(t_v), blk_records / best(t_b)
    return {"vscsi_records_s": vscsi_rate, "vscsi_vs_python_struct": vscsi_rate * best(t_pv),
            "blktrace_records_s": blk_rate, "blktrace_vs_python_struct": blk_rate * best(t_pb),
            "binary_read_bytes_per_request": bytes_per_request, "binary_records": n}


def _traced_peak(fn, *args) -> int:
    """Peak bytes numpy and Python allocate during ``fn(*args)`` (tracemalloc; numpy reports its buffers to it)."""
    import tracemalloc

    tracemalloc.start()
    try:
        fn(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def end_to_end_replay(n: int, rounds: int, smoke: bool) -> dict:
    """``qsim replay FILE`` from the command line, start-up included (a fresh process each round, as a user runs
    it): n uniform 4 KiB reads of a 1 TiB disk as fio iolog v3, CSV and .npz, on a metadata-preallocated 1 TiB
    image made by qemu-img (when it is installed) and on the synthetic image (--size 1T), 20 cache sizes; against
    the same replay of the trace already in memory (in this process: what the command adds is start-up, reading
    the file and opening the image). Requests per second, best of ``rounds``."""
    import shutil

    disk = 64 << 30 if smoke else TIB
    sizes = "64k..64M:20"
    out: dict = {"e2e_requests": n}
    with tempfile.TemporaryDirectory() as d:
        t = synthesize(disk, n, "uniform", "4k", seed=1)
        paths = {fmt: os.path.join(d, f"t.{fmt}") for fmt in ("iolog", "csv", "npz")}
        for path in paths.values():
            write_trace(t, path, "/dev/vda")
        image = None
        if shutil.which("qemu-img"):
            image = os.path.join(d, "img.qcow2")
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", image,
                            str(disk)], check=True)
        runs = {}
        for fmt, path in paths.items():
            if image and not (smoke and fmt != "npz"):  # (--smoke: two runs, to check the harness)
                runs[f"e2e_{fmt}_image_req_s"] = [path, "--image", image]
            if not (smoke and fmt != "iolog"):
                runs[f"e2e_{fmt}_synthetic_req_s"] = [path, "--size", str(disk), "-o", "preallocation=metadata"]
        times: dict[str, list[float]] = {name: [] for name in runs}
        memory: list[float] = []
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        for _ in range(rounds):
            for name, argv in runs.items():
                cmd = [sys.executable, "-m", "qsim", "replay", *argv, "--l2-cache-size", sizes, "--output", "csv"]
                start = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                times[name].append(time.perf_counter() - start)
                assert proc.returncode == 0, proc.stderr[-2000:]
                assert len(proc.stdout.splitlines()) == 21, proc.stdout[-500:]
            memory.append(timed(qsim_replay, t, disk, ImageOptions(preallocation="metadata"),
                                build_image(ImageGeometry(disk), ImageOptions(preallocation="metadata")),
                                SIZES_20)[0])
    in_memory = n / best(memory)
    out["e2e_in_memory_req_s"] = in_memory
    for name, ts in times.items():
        out[name] = n / best(ts)
        out[name.replace("_req_s", "_vs_in_memory")] = out[name] / in_memory
    return out


def qemu_rate(rounds: int) -> float | None:
    """Requests per second of real qemu-io replaying 5000 4k random reads (with cache tracing, as validate does)."""
    import shutil

    if not shutil.which("qemu-io"):
        return None
    from qsim.qemu import replay_in_qemu

    t = synthesize(8 << 30, 5000, "uniform", "4k", seed=6)
    times = [timed(replay_in_qemu, t, 8 << 30, ImageOptions(preallocation="metadata"), 64 << 10)[0]
             for _ in range(rounds)]
    return len(t) / best(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="1M requests, 3 rounds (about 2 minutes)")
    mode.add_argument("--smoke", action="store_true", help="tiny sizes, 1 round: checks the harness works")
    p.add_argument("--csv", default=str(ROOT / "benchmarks" / "results" / "latest.csv"))
    p.add_argument("--only", metavar="TEXT", help="only the workloads whose name contains TEXT (e.g. fio, zipf); "
                   "'parse': trace parsing alone; 'replay': qsim replay FILE end to end alone")
    args = p.parse_args()
    if args.smoke:
        counts, rounds, od_limit = [20_000], 1, 20_000
    elif args.quick:
        counts, rounds, od_limit = [1_000_000], 3, 1_000_000
    else:
        counts, rounds, od_limit = [1_000_000, 10_000_000], 5, 10_000_000
    started = load()
    print(f"{started} at the start ({os.cpu_count()} cores)", flush=True)
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
            sizes20 = SIZES_20
            one = [1 << 20]
            # the slice-key stream the peers get (4 KiB slices at these sizes)
            entry = qsim_replay(trace.select(np.arange(min(len(trace), 10))), size, options, image,
                                one)[0]["l2_cache_entry_size"]
            stream = run_kernel(image, trace, entry).events
            keys = stream.key
            n_keys = stream.n_keys
            entries_one = qsim_replay(trace.select(np.arange(1)), size, options, image, one)[0]["l2_cache_entries"]
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
            q1, q20 = best(t_q1), best(t_q20)
            row = {"workload": name, "requests": n, "l2_lookups": len(keys), "misses_at_1M": expected,
                   "qsim_1_size_req_s": n / q1, "qsim_20_sizes_req_s": n / q20}
            if t_lcs:
                lcs_t = best(t_lcs)
                row.update(libcachesim_1_size_req_s=n / lcs_t, qsim20_vs_libcachesim1=lcs_t / q20)
            if t_od:
                od_t = best(t_od)
                row.update(ordereddict_1_size_req_s=n / od_t, qsim20_vs_ordereddict20=20 * od_t / q20)
            results.append(row)
            print(_format_row(row), flush=True)
    extra: dict = {"load_at_start": started}
    if args.only != "replay":
        extra.update(parse_speed(20_000 if args.smoke else 2_000_000, rounds))
        extra.update(binary_format_speed(20_000 if args.smoke else 2_000_000 if args.quick else 10_000_000, rounds))
    if args.only in (None, "replay"):
        extra.update(end_to_end_replay(20_000 if args.smoke else 10_000_000, min(rounds, 3), args.smoke))
    if not args.smoke and args.only not in ("parse", "replay"):  # --only parse / replay: those figures alone
        extra["bytes_per_request_10M"] = peak_bytes_per_request(10_000_000 if not args.quick else 1_000_000)
        extra["qemu_io_req_s"] = qemu_rate(rounds)
    if "iolog_lines_s" in extra:
        print_parsing(extra)
    if "e2e_requests" in extra:
        for image in ("image", "synthetic"):
            formats = [f for f in ("iolog", "csv", "npz") if f"e2e_{f}_{image}_req_s" in extra]
            if not formats:
                continue
            what = "a metadata-preallocated qcow2 (--image)" if image == "image" else "the synthetic image (--size)"
            print(f"qsim replay FILE end to end ({extra['e2e_requests'] / 1e6:g}M reads, 20 sizes, {what}): " +
                  ", ".join(f"{f} {extra[f'e2e_{f}_{image}_req_s'] / 1e6:.2f}M req/s "
                            f"({extra[f'e2e_{f}_{image}_vs_in_memory']:.2f}x the in-memory replay)" for f in formats))
        print(f"  (the in-memory replay of the same trace: {extra['e2e_in_memory_req_s'] / 1e6:.2f}M req/s)")
    if "bytes_per_request_10M" in extra:
        print(f"peak memory: {extra['bytes_per_request_10M']:.0f} bytes per request (1T, 20 cache sizes)")
    if extra.get("qemu_io_req_s"):
        print(f"qemu-io replay (ground truth): {extra['qemu_io_req_s']:.0f} requests/s")
    extra["load_at_end"] = load()
    print(f"machine: {machine}; {started} at the start, {extra['load_at_end']} at the end")
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in results for k in r}))
        writer.writeheader()
        writer.writerows(results)
    with open(Path(args.csv).with_suffix(".json"), "w") as f:
        json.dump({"machine": machine, "rows": results, **extra}, f, indent=2)
    return 0


def print_parsing(extra: dict) -> None:
    print(f"trace parsing: {extra['iolog_lines_s'] / 1e6:.2f}M iolog lines/s "
          f"({extra['iolog_vs_python_split']:.1f}x a plain Python split loop); gzip "
          f"{extra['iolog_gz_lines_s'] / 1e6:.2f}M/s ({extra['iolog_gz_vs_python_split']:.1f}x); CSV "
          f"{extra['csv_lines_s'] / 1e6:.2f}M lines/s ({extra['csv_vs_pandas_read_csv']:.1f}x pandas.read_csv, "
          f"{extra['csv_vs_python_csv']:.1f}x Python's csv module)")
    print(f"binary traces ({extra['binary_records'] / 1e6:g}M requests): vscsi {extra['vscsi_records_s'] / 1e6:.1f}M "
          f"records/s ({extra['vscsi_vs_python_struct']:.0f}x a Python struct loop), blktrace "
          f"{extra['blktrace_records_s'] / 1e6:.1f}M records/s ({extra['blktrace_vs_python_struct']:.0f}x); "
          f"read whole: {extra['binary_read_bytes_per_request']:.1f} bytes per request at peak")
    if "iolog_zst_lines_s" in extra:
        print(f"zstd text: iolog {extra['iolog_zst_lines_s'] / 1e6:.2f}M lines/s "
              f"({extra['iolog_zst_vs_python_split']:.1f}x a Python split loop over zstandard's reader), CSV "
              f"{extra['csv_zst_lines_s'] / 1e6:.2f}M lines/s ({extra['csv_zst_vs_gzip']:.2f}x the same CSV gzipped)")


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
