"""Hostile images against qemu-img's verdicts: a few hundred mutants of a handful of tiny real images (made here
with qemu-img, nothing cached in the repo), field-targeted and random. For each mutant QEMU judges first
(``qemu-img info``, ``qemu-img check``, ``qemu-img map``); then qsim reads it the three ways users do (``qsim
inspect``, ``qsim inspect --map``, and the replay path ``image_from_qcow2(open_image(path))``, whose check
runs three ways for one verdict: with dense counts, with the compiled passes large images get, and with chunked
counts):

- 0 tracebacks, 0 hangs, 0 signals: every outcome is a result or one QsimError line (exit 1);
- memory stays bounded (tracemalloc peak per mutant);
- the mutant is byte-identical afterwards;
- whatever QEMU refuses or calls corrupt, qsim refuses too (a missing backing file: the map refuses, inspect
  lists it as an error in the chain);
- where both accept, ``qsim inspect --map --output=json`` prints what qemu-img map prints, byte for byte.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import struct
import subprocess
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from unittest import mock
from pathlib import Path

import numpy as np
import pytest

from qsim.cli import main
from qsim.errors import QsimError
from qsim.image import image_from_qcow2
from qsim.qcow2 import HEADER_FIELDS, open_image

pytestmark = pytest.mark.qemu
MiB = 1 << 20
PEAK_LIMIT = 160 * MiB


def _run(args, **kw):
    return subprocess.run(args, capture_output=True, text=True, errors="replace", timeout=60, **kw)


def _bases(tmp: Path, qemu_img: str, qemu_io: str) -> dict[str, Path]:
    """The real images the mutants come from (each a few hundred KiB)."""
    out = {}

    def make(name, size, opts="", writes=(), backing=None):
        path = tmp / f"{name}.qcow2"
        cmd = [qemu_img, "create", "-q", "-f", "qcow2"]
        if opts:
            cmd += ["-o", opts]
        if backing:
            cmd += ["-b", backing, "-F", "qcow2"]
        _run(cmd + [str(path), size]).check_returncode()
        if writes:
            _run([qemu_io, *sum((["-c", w] for w in writes), []), str(path)]).check_returncode()
        out[name] = path
        return path

    used = ("write -q -P 1 0 128k", "write -q -z 256M 64k", "write -q -P 2 300M 4k", "discard -q 64k 64k")
    make("plain", "512M", "", used)
    make("v2", "512M", "compat=0.10", ("write -q -P 1 0 128k", "write -q -P 2 300M 4k"))
    make("ext", "1G", "cluster_size=128k,extended_l2=on", ("write -q -P 3 1M 4k", "write -q -z 512M 4k",
                                                             "write -q -P 4 600M 128k"))
    make("rc1", "256M", "refcount_bits=1,cluster_size=4k", ("write -q -P 1 0 64k", "write -q -P 2 100M 8k"))
    base = make("base", "512M", "", ("write -q -P 5 0 1M",))
    make("top", "512M", "", ("write -q -P 6 64k 64k",), backing=base.name)
    packed = tmp / "packed.qcow2"
    _run([qemu_img, "convert", "-c", "-O", "qcow2", str(out["plain"]), str(packed)]).check_returncode()
    out["packed"] = packed
    snap = make("snap", "512M", "", ("write -q -P 1 0 64k",))
    _run([qemu_img, "snapshot", "-c", "s1", str(snap)]).check_returncode()
    _run([qemu_io, "-c", "write -q -P 9 0 4k", "-c", "write -q -P 9 200M 4k", str(snap)]).check_returncode()
    bm = make("bitmap", "256M", "", ("write -q -P 1 0 64k",))
    _run([qemu_img, "bitmap", "--add", str(bm), "b0"]).check_returncode()
    data = tmp / "data.raw"
    make("datafile", "256M", f"data_file={data}", ("write -q -P 7 0 64k", "write -q -P 7 100M 4k"))
    del out["base"]
    return out


def _layout(data: bytes) -> dict:
    """Where a base image keeps its metadata (from its own header; the bases are sound)."""
    f = {name: struct.unpack_from(">" + fmt, data, off)[0] for name, off, fmt, _ in HEADER_FIELDS[:13]}
    cs = 1 << f["cluster_bits"]
    l1 = [struct.unpack_from(">Q", data, f["l1_table_offset"] + 8 * i)[0] for i in range(f["l1_size"])]
    l2 = [e & 0x00FFFFFFFFFFFE00 for e in l1 if e & 0x00FFFFFFFFFFFE00]
    reft = [struct.unpack_from(">Q", data, f["refcount_table_offset"] + 8 * i)[0] for i in range(cs // 8)]
    return dict(fields=f, cs=cs, l2=l2, refblocks=[e for e in reft if e], l1=f["l1_table_offset"],
                reft=f["refcount_table_offset"])


def _mutants(name: str, data: bytes, rng: np.random.Generator):
    """(label, bytes) pairs: every header field set to telling values, table entries aimed at metadata, made
    unaligned or given reserved bits, refcounts zeroed or doubled, and random byte flips in metadata."""
    lay = _layout(data)
    cs, f = lay["cs"], lay["fields"]
    version = f["version"]

    def put(fmt, offset, value):
        b = bytearray(data)
        if offset + struct.calcsize(fmt) > len(b):
            return None
        struct.pack_into(">" + fmt, b, offset, int(value) % (1 << (8 * struct.calcsize(fmt))))
        return bytes(b)

    out = []
    fields = HEADER_FIELDS[1:] if version == 3 else HEADER_FIELDS[1:13]
    for fname, off, fmt, _ in fields:
        if fmt == "4s":
            continue
        old = struct.unpack_from(">" + fmt, data, off)[0]
        values = {0, 1, old + 1, old - 1, old ^ (1 << int(rng.integers(8 * struct.calcsize(fmt)))), cs, cs + 8,
                  (1 << (8 * struct.calcsize(fmt))) - 1}
        if fname == "crypt_method":
            values |= {2, 3}
        if fname == "compression_type":
            values |= {2}
        for v in sorted(values)[:2 if name not in ("plain", "ext") else 4]:
            m = put(fmt, off, v)
            if m is not None and m != data:
                out.append((f"{name}:{fname}={v:#x}", m))
    targets = {"l1 table": lay["l1"], "refcount table": lay["reft"], "header": 0, "eof": len(data) + cs * 4,
               "refblock": lay["refblocks"][0] & ~0x1FF if lay["refblocks"] else 0}
    if lay["l2"]:
        targets["another l2"] = lay["l2"][-1]
    l1_first = next((i for i in range(f["l1_size"])
                     if struct.unpack_from(">Q", data, f["l1_table_offset"] + 8 * i)[0]), None)
    if l1_first is not None:
        at = f["l1_table_offset"] + 8 * l1_first
        old = struct.unpack_from(">Q", data, at)[0]
        for label, target in targets.items():
            out.append((f"{name}:l1[{l1_first}]->{label}", put("Q", at, (1 << 63) | target)))
        out.append((f"{name}:l1 unaligned", put("Q", at, old + 0x200)))
        out.append((f"{name}:l1 reserved bit", put("Q", at, old | (1 << 56))))
        out.append((f"{name}:l1 copied cleared", put("Q", at, old & ~(1 << 63))))
    entry_bytes = 16 if f.get("cluster_bits") and version == 3 and data[79] & 16 else 8
    for t, l2 in enumerate(lay["l2"][:1 if name not in ("plain", "ext") else 2]):
        entries = [(i, struct.unpack_from(">Q", data, l2 + entry_bytes * i)[0]) for i in range(cs // entry_bytes)]
        used = [(i, e) for i, e in entries if e]
        for i, e in used[:2 if name in ("plain", "ext") else 1]:
            at = l2 + entry_bytes * i
            for label, target in list(targets.items())[:None if name in ("plain", "ext") else 3]:
                out.append((f"{name}:l2[{t}][{i}]->{label}", put("Q", at, (e & (1 << 63)) | target)))
            out.append((f"{name}:l2[{t}][{i}] unaligned", put("Q", at, e + 0x200)))
            out.append((f"{name}:l2[{t}][{i}] reserved", put("Q", at, e | 0x10)))
            out.append((f"{name}:l2[{t}][{i}] compressed flag", put("Q", at, e | (1 << 62))))
            out.append((f"{name}:l2[{t}][{i}] zero flag", put("Q", at, e | 1)))
            out.append((f"{name}:l2[{t}][{i}] copied flipped", put("Q", at, e ^ (1 << 63))))
            if entry_bytes == 16:
                bm = struct.unpack_from(">Q", data, at + 8)[0]
                out.append((f"{name}:l2[{t}][{i}] bitmap alloc+zero", put("Q", at + 8, bm | (bm << 32) | 3)))
                out.append((f"{name}:l2[{t}][{i}] bitmap cleared", put("Q", at + 8, 0)))
        free = next((i for i, e in entries if not e), None)
        if free is not None and used:
            out.append((f"{name}:l2[{t}] duplicate entry", put("Q", l2 + entry_bytes * free, used[0][1])))
    for j, rb in enumerate(lay["refblocks"][:1]):
        at = f["refcount_table_offset"] + 8 * j
        out.append((f"{name}:reftable[{j}] unaligned", put("Q", at, rb + 0x200)))
        out.append((f"{name}:reftable[{j}] reserved", put("Q", at, rb | 1)))
        out.append((f"{name}:reftable[{j}] beyond eof", put("Q", at, len(data) + 16 * cs)))
        out.append((f"{name}:reftable[{j}] zero", put("Q", at, 0)))
        width = 1 << f.get("refcount_order", 4) if version == 3 else 16
        if width == 16 and name in ("plain", "ext", "snap"):
            for c in (0, 1, 3, len(data) // cs - 1):
                old = struct.unpack_from(">H", data, rb + 2 * c)[0]
                for v in {0, 2, old + 1}:
                    out.append((f"{name}:refcount[{c}]={v}", put("H", rb + 2 * c, v)))
    if f["backing_file_offset"]:
        at = f["backing_file_offset"]
        b = bytearray(data)
        b[at + 1] = 0  # a NUL in the backing file name
        out.append((f"{name}:backing name NUL", bytes(b)))
        out.append((f"{name}:backing name missing", put("B", at, ord("X"))))
    areas = [(0, min(cs, 512)), (lay["l1"], lay["l1"] + 64), (lay["reft"], lay["reft"] + 32)]
    areas += [(x, x + 256) for x in lay["l2"][:2]] + [(x & ~0x1FF, (x & ~0x1FF) + 64) for x in lay["refblocks"][:1]]
    if f["snapshots_offset"]:
        areas.append((f["snapshots_offset"], f["snapshots_offset"] + 64))
    for k in range(8 if name in ("plain", "ext", "snap") else 3):
        b = bytearray(data)
        for _ in range(int(rng.integers(1, 4))):
            lo, hi = areas[int(rng.integers(len(areas)))]
            b[int(rng.integers(lo, min(hi, len(b))))] = int(rng.integers(256))
        out.append((f"{name}:random {k}", bytes(b)))
    return [(label, m) for label, m in out if m is not None and m != data]


QEMU10 = "/opt/qemu-10.0/usr/bin/qemu-img"


def _newer_qemu_img() -> str | None:
    """A second qemu-img (QEMU >= 8.2 prints "compressed"): from QSIM_QEMU_PREFIXES as CI sets it, or /opt."""
    dirs = os.environ.get("QSIM_QEMU_PREFIXES", "").split(":")[1:] or [os.path.dirname(QEMU10)]
    tools = [os.path.join(d, "qemu-img") for d in dirs if os.access(os.path.join(d, "qemu-img"), os.X_OK)]
    return tools[0] if tools else None


def _qemu_verdict(qemu_img: str, path: Path) -> dict:
    """What QEMU 7.2 says: refused (cannot open), corrupt (check finds corruptions or map hits one), or sound."""
    v = {"info": None, "check": None, "map": None, "text": ""}
    try:
        info = _run([qemu_img, "info", "-f", "qcow2", str(path)])
        check = _run([qemu_img, "check", "-f", "qcow2", str(path)])
        mapped = _run([qemu_img, "map", "-f", "qcow2", "--output=json", str(path)])
    except subprocess.TimeoutExpired:
        v["hang"] = True
        return v
    v.update(info=info.returncode, check=check.returncode, map=mapped.returncode, map_out=mapped.stdout,
             text=info.stderr + check.stderr + mapped.stderr)
    return v


def _qsim(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    return status, out.getvalue(), err.getvalue()


def _qcow2_with(name: str, value: int, call):
    """``call`` with one of qsim.qcow2's thresholds set to ``value``: COMPILED_MIN_ENTRIES=0 gives a small image the
    compiled passes (qsim.qcow2scan) a large one takes; DENSE_CLUSTERS=0 keeps its reference counts per chunk, as
    for a huge sparse file."""
    import qsim.qcow2

    with mock.patch.object(qsim.qcow2, name, value):
        return call()


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def test_mutants_against_qemu_verdicts(tmp_path, qemu_img, qemu_io):
    bases = _bases(tmp_path, qemu_img, qemu_io)
    rng = np.random.default_rng(19)
    cases = []
    for name, path in bases.items():
        for label, data in _mutants(name, path.read_bytes(), rng):
            target = path.with_name(f"m{len(cases):04d}-{path.name}")
            target.write_bytes(data)
            cases.append((label, target, data))
    with ThreadPoolExecutor(4) as pool:
        verdicts = list(pool.map(lambda c: _qemu_verdict(qemu_img, c[1]), cases))

    tally = {"qemu refuses": 0, "qemu corrupt": 0, "qemu sound": 0, "qsim refuses": 0, "qsim stricter": 0,
             "maps compared": 0, "skipped (key or dirty)": 0}
    failures, stricter = [], []
    newer = _newer_qemu_img()
    previous = signal.signal(signal.SIGALRM, _alarm)
    tracemalloc.start()
    try:
        for (label, path, data), v in zip(cases, verdicts):
            assert not v.get("hang"), f"{label}: qemu-img hung"
            outcomes = {}
            tracemalloc.reset_peak()
            signal.alarm(20)
            try:
                for key, call in (("inspect", lambda: _qsim(["inspect", str(path), "--output=json"])),
                                  ("map", lambda: _qsim(["inspect", str(path), "--map", "--output=json",
                                                         "--qemu-version", "7.2"])),
                                  ("replay", lambda: image_from_qcow2(open_image(str(path)))),
                                  ("replay, compiled", lambda: _qcow2_with(
                                      "COMPILED_MIN_ENTRIES", 0, lambda: image_from_qcow2(open_image(str(path))))),
                                  ("replay, chunked counts", lambda: _qcow2_with(
                                      "DENSE_CLUSTERS", 0, lambda: image_from_qcow2(open_image(str(path)))))):
                    try:
                        r = call()
                        outcomes[key] = r if not key.startswith("replay") else (0, "", "")
                    except QsimError as exc:
                        outcomes[key] = (1, "", f"qsim: error: {exc}\n")
            except Hang:
                failures.append(f"{label}: qsim hung")
                continue
            except Exception as exc:  # a traceback: the one thing that must never happen
                failures.append(f"{label}: {type(exc).__name__}: {exc}")
                continue
            finally:
                signal.alarm(0)
            peak = tracemalloc.get_traced_memory()[1]
            if peak > PEAK_LIMIT:
                failures.append(f"{label}: qsim peaked at {peak >> 20} MiB")
            if path.read_bytes() != data:
                failures.append(f"{label}: the input changed")
            for key, (status, _, err) in outcomes.items():
                if status not in (0, 1) or (status == 1 and len([x for x in err.splitlines() if "error:" in x]) != 1):
                    failures.append(f"{label}: {key} exit {status} with {err!r}")
            for way in ("replay, compiled", "replay, chunked counts"):  # the check's three ways, one verdict
                if outcomes[way] != outcomes["replay"]:
                    failures.append(f"{label}: dense counts say {outcomes['replay'][2]!r}, {way} "
                                    f"{outcomes[way][2]!r}")
                del outcomes[way]
            keyless = "key-secret" in v["text"] or "encrypt" in v["text"].lower()
            dirty = len(data) > 80 and data[4:8] == b"\0\0\0\3" and data[79] & 1
            backing = "backing" in v["text"].lower() and v["info"] == 0
            refused = v["info"] != 0 or v["check"] == 1 or v["map"] != 0
            corrupt = v["check"] == 2
            if keyless or (dirty and not refused):
                tally["skipped (key or dirty)"] += 1
                continue
            tally["qemu refuses" if refused else "qemu corrupt" if corrupt else "qemu sound"] += 1
            qsim_refused = {k for k, (s, _, _) in outcomes.items() if s}
            if qsim_refused:
                tally["qsim refuses"] += 1
            if refused or corrupt:
                need = {"map"} if backing and not corrupt else {"inspect", "map", "replay"}
                missing = need - qsim_refused
                if missing:
                    failures.append(f"{label}: QEMU says {'corrupt' if corrupt else 'no'} ({v['text'].strip()[:160]!r})"
                                    f" but qsim {sorted(missing)} accepted it")
            elif qsim_refused:
                tally["qsim stricter"] += 1
                stricter.append(label)
            elif v["map"] == 0:
                tally["maps compared"] += 1
                if outcomes["map"][1] != v["map_out"]:
                    failures.append(f"{label}: map differs from qemu-img map")
                if newer is not None:
                    theirs = _run([newer, "map", "-f", "qcow2", "--output=json", str(path)])
                    ours = _qsim(["inspect", str(path), "--map", "--output=json", "--qemu-version", "10.0"])[1]
                    if theirs.returncode == 0 and ours != theirs.stdout:
                        failures.append(f"{label}: map differs from {newer} map")
    finally:
        tracemalloc.stop()
        signal.signal(signal.SIGALRM, previous)
    print(f"\n{len(cases)} mutants of {len(bases)} images: {tally}\nqsim stricter than QEMU: {stricter}")
    assert not failures, f"{len(failures)} of {len(cases)} mutants:\n" + "\n".join(failures[:40])
    assert len(cases) >= 400 and tally["qemu refuses"] + tally["qemu corrupt"] >= 100
