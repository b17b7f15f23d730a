"""One scenario, every path: the same command-line options give the same rows through ``qsim replay``,
``qsim sweep`` in process, ``qsim sweep --save`` on local fleet workers and on a real Dask ``LocalCluster``, and
the qsim side of ``qsim validate``.

The table below has a row for every option those subcommands take. Each row says how to spell the option for
replay and for sweep (geometry is ``-o`` for one, ``--cluster-size``/``--extended-l2`` for the other), and each
row's option must change the answer (rows, or success against failure), so a path that drops the option cannot
pass. ``test_the_table_covers_every_option`` holds the table to the parsers: a new option without a row fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qsim import cli
from qsim.cli.scenario_args import READING_DESTS, SCENARIO_DESTS
from qsim.cli.sweep import GRID_DESTS
from qsim.synth import synthesize
from qsim.trace import DISCARD, FLUSH, Trace
from qsim.traceio import write_trace
from qsim.validate import COMPARED, WHEN_MODELLED

from conftest import dask_local_cluster

G, K = 1 << 30, 1 << 10
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# Options that are not part of what is replayed: how it is printed, saved or scheduled.
NOT_SCENARIO = {
    "trace": "the trace itself",
    "output": "the printed format",
    "save": "where the table goes",
    "scheduler": "where a fleet runs (its rows are compared here)",
    "workers": "how many local processes run a fleet (its rows are compared here)",
    "qemu_io": "which QEMU build validate compares with (not what qsim replays)",
    "backing_chain": "a no-op kept for old scripts: --image always opens the whole chain, as QEMU does",
}
# Columns that name a path, not a result.
PATH_COLUMNS = ["trace_id", "config_id", "trace"]


@dataclass(frozen=True)
class Row:
    """One option: ``replay`` and ``sweep`` are the arguments with the option; ``base`` what both commands get with
    and without it; ``trace`` which trace file; ``dests`` the parser destinations the row covers."""

    dests: tuple[str, ...]
    replay: tuple[str, ...]
    sweep: tuple[str, ...] | None = None  # None: the same as replay
    base: tuple[str, ...] = ()
    trace: str = "mixed"
    real_image: str | None = None  # "plain" or "overlay": --image IMG is part of the row's arguments
    validate: bool = True  # also compare validate's qsim side (one cache size)
    extra: dict = field(default_factory=dict)

    @property
    def sweep_args(self) -> tuple[str, ...]:
        return self.replay if self.sweep is None else self.sweep


PRE = ("-o", "preallocation=metadata")
TABLE = {
    "size": Row(("size",), ("--size", "3G")),
    "image": Row(("image",), ("--image", "{plain}"), real_image="plain"),
    "backing-l2-cache-size": Row(("backing_l2_cache_size",), ("--backing-l2-cache-size", "8k"),
                                 base=("--image", "{overlay}"), real_image="overlay"),
    "backing-l2-cache-entry-size": Row(("backing_l2_cache_entry_size",), ("--backing-l2-cache-entry-size", "4k"),
                                       base=("--image", "{overlay}"), real_image="overlay"),
    "-o preallocation": Row(("image_options",), PRE),
    "-o backing": Row(("image_options",), ("-o", "backing=on")),
    "-o fill": Row(("image_options",), ("-o", "fill=0.3")),
    "-o seed": Row(("image_options",), ("-o", "fill=0.3,seed=5"), base=("-o", "fill=0.3")),
    "-o refcount_bits": Row(("image_options",), ("-o", "cluster_size=4k,refcount_bits=64"),
                            ("--cluster-size", "4k", "-o", "refcount_bits=64"),
                            extra={"base_replay": ("-o", "cluster_size=4k"),
                                   "base_sweep": ("--cluster-size", "4k")}),
    "cluster size": Row(("image_options", "cluster_size"), ("-o", "cluster_size=16k"), ("--cluster-size", "16k")),
    "extended_l2": Row(("image_options", "extended_l2"), ("-o", "extended_l2=on"), ("--extended-l2", "on")),
    "l2-cache-size": Row(("l2_cache_size",), ("--l2-cache-size", "64k")),
    "l2-cache-size list": Row(("l2_cache_size",), ("--l2-cache-size", "16k,1M,default"), validate=False),
    "l2-cache-entry-size": Row(("l2_cache_entry_size",), ("--l2-cache-entry-size", "8k"),
                               base=("--l2-cache-size", "1M")),
    "cache-mode": Row(("cache_mode",), ("--cache-mode", "writethrough")),
    "offset-policy": Row(("offset_policy",), ("--offset-policy", "wrap"), base=("--size", "1G"), trace="beyond"),
    "qemu-version": Row(("qemu_version",), ("--qemu-version", "2.11"), base=PRE),
    # validate passes l2-cache-size and l2-cache-entry-size to qemu-io only: no validate for these
    "cache-size": Row(("cache_size",), ("--cache-size", "300k"), validate=False),
    "cache-size list": Row(("cache_size",), ("--cache-size", "64k..1M"), validate=False),
    "refcount-cache-size": Row(("refcount_cache_size",), ("--refcount-cache-size", "1M"), validate=False),
    # validate always compares with cleaning off (qemu-io never cleans), so it has no row here
    "cache-clean-interval": Row(("cache_clean_interval",), ("--cache-clean-interval", "60"), trace="timed",
                                validate=False),
    "format": Row(("format",), ("--format", "blkparse"), trace="blkparse-late"),
    "file": Row(("file",), ("--file", "/dev/vdb"), trace="two-files"),
    "action": Row(("action",), ("--action", "C"), trace="blkparse"),
    "device": Row(("device",), ("--device", "0x56286628b280"), trace="qemu-log"),
    "volume": Row(("volume",), ("--volume", "27"), trace="alibaba"),
    "discard": Row(("discard",), ("--discard", "unmap"), trace="trims"),
    "discard-no-unref": Row(("discard_no_unref",), ("--discard-no-unref",),
                            base=("--discard", "unmap", "--qemu-version", "10.0"), trace="trims"),
}


def _requests() -> Trace:
    t = synthesize(G, 4000, "zipf:1.1", "4k/60:64k/40", read_share=0.5, flush_every=40, seed=3, align=4096)
    return Trace.from_arrays(t.op, t.offset, t.length, None, "<synth>")


@pytest.fixture(scope="module")
def traces(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("traces")
    t = _requests()
    paths = {"mixed": str(d / "mixed.iolog")}
    write_trace(t, paths["mixed"])
    trims = np.where((t.op == 1) & (np.arange(len(t)) % 3 == 0), DISCARD, t.op)  # a third of the writes
    paths["trims"] = str(d / "trims.iolog")
    write_trace(Trace.from_arrays(trims, t.offset, t.length), paths["trims"])
    paths["timed"] = str(d / "timed.iolog")  # bursts of 100 requests, 100 s apart: 4000 s of timestamps
    write_trace(Trace.from_arrays(t.op, t.offset, t.length, (np.arange(len(t)) // 100) * 100.0), paths["timed"])
    beyond = Trace.from_arrays(t.op, t.offset + np.where(np.arange(len(t)) % 5 == 0, G, 0), t.length)
    paths["beyond"] = str(d / "beyond.iolog")
    write_trace(beyond, paths["beyond"])
    lines = ["fio version 2 iolog", "/dev/vda add", "/dev/vdb add", "/dev/vda open", "/dev/vdb open"]
    for k, (op, off, n) in enumerate(zip(t.op, t.offset, t.length)):
        verb = {0: "read", 1: "write", 3: "sync"}[int(op)]
        lines.append(f"/dev/{'vdb' if k % 3 else 'vda'} {verb} {off} {n if op != FLUSH else 0}")
    paths["two-files"] = str(d / "two.iolog")
    Path(paths["two-files"]).write_text("\n".join(lines) + "\n")
    blk = []
    for k, (op, off, n) in enumerate(zip(t.op, t.offset, t.length)):
        if op == FLUSH:
            continue
        rwbs = "W" if op == 1 else "R"
        for action in ("Q", "C") if k % 2 else ("Q",):
            blk.append(f"  8,0    1 {k + 1:>6} {k * 0.001:.9f}  4242  {action}  {rwbs} {off // 512} + {n // 512} [fio]")
    paths["blkparse"] = str(d / "trace.blk")
    Path(paths["blkparse"]).write_text("\n".join(blk) + "\n")
    for name, fixture in (("qemu-log", "qemu-7.2-two-drives.log"), ("alibaba", "alibaba.csv")):
        paths[name] = str(d / fixture)  # two BlockBackends, two volumes: without a choice, the reader refuses
        shutil.copy(FIXTURES / "traces" / fixture, paths[name])
    paths["blkparse-late"] = str(d / "late.blk")  # a banner the format detection does not get past
    Path(paths["blkparse-late"]).write_text("".join(f"# capture banner line {i}\n" for i in range(40)) +
                                            "\n".join(blk) + "\n")
    return paths


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, str]:
    qemu_img = shutil.which("qemu-img")
    qemu_io = shutil.which("qemu-io")
    d = tmp_path_factory.mktemp("images")
    plain = str(d / "plain.qcow2")
    shutil.copy(FIXTURES / "small-64k.qcow2", plain)
    out = {"plain": plain}
    if qemu_img and qemu_io:
        base, top = str(d / "base.qcow2"), str(d / "top.qcow2")
        subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", base, "1G"], check=True)
        rng = np.random.default_rng(2)
        cmds = "".join(f"write -q -P 0x3 {o * 65536} 65536\n" for o in rng.integers(0, G // 65536, 600))
        subprocess.run([qemu_io, base], input=cmds, text=True, check=True, capture_output=True)
        subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top],
                       check=True)
        out["overlay"] = top
    return out


@pytest.fixture(scope="module")
def cluster():
    with dask_local_cluster(n_workers=1) as c:
        yield c


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(argv)
    return status, out.getvalue(), err.getvalue()


def _frame(rows) -> pd.DataFrame:
    frame = pd.DataFrame(rows).drop(columns=[c for c in PATH_COLUMNS if c in pd.DataFrame(rows).columns])
    return frame.sort_values(["cluster_size", "extended_l2", "l2_cache_bytes", "l2_cache_size_asked"]) \
        .reset_index(drop=True)


def every_path(trace: str, replay_args: list[str], sweep_args: list[str], tmp: Path, scheduler: str) -> dict:
    """The rows each path gives (or the exit status where the command fails)."""
    results = {}
    status, out, err = run_cli(["replay", trace, *replay_args, "--output=json"])
    results["replay"] = _frame(json.loads(out)) if status == 0 else status
    status, out, err = run_cli(["sweep", trace, *sweep_args, "--output=json"])
    results["sweep"] = _frame(json.loads(out)) if status == 0 else status
    for name, extra in (("fleet", ["--workers", "1"]), ("dask", ["--scheduler", scheduler])):
        target = tmp / name
        shutil.rmtree(target, ignore_errors=True)
        status, out, err = run_cli(["sweep", trace, *sweep_args, "--save", f"{target}/", *extra, "--output=json"])
        if status == 0:
            from qsim.fleet import load_results

            results[name] = _frame(load_results(str(target)).to_dict(orient="records"))
        else:
            results[name] = status
    return results


def _same(a, b) -> bool:
    if isinstance(a, int) or isinstance(b, int):
        return isinstance(a, int) and isinstance(b, int) and a == b
    return a.columns.tolist() == b.columns.tolist() and a.equals(b)


@pytest.mark.parametrize("name", list(TABLE))
def test_every_path_gives_the_same_rows(name, traces, images, tmp_path, cluster):
    row = TABLE[name]
    if row.real_image == "overlay" and "overlay" not in images:
        pytest.skip("qemu-img is needed to make an overlay (apt-get install -y qemu-utils)")
    fill = {k: v for k, v in images.items()}

    def spell(args):
        return [a.format(**fill) for a in args]

    trace = traces[row.trace]
    with_option = every_path(trace, spell(row.base + row.replay), spell(row.base + row.sweep_args), tmp_path,
                             cluster.scheduler_address)
    first = with_option["replay"]
    assert not isinstance(first, int), f"{name}: replay failed with exit status {first}"
    for path, result in with_option.items():
        assert _same(result, first), f"{name}: {path} differs from replay"
    # The option must matter, or a path that drops it would pass: without it the answer changes.
    base_replay = row.extra.get("base_replay", row.base)
    base_sweep = row.extra.get("base_sweep", row.base)
    status, out, _ = run_cli(["replay", trace, *spell(base_replay), "--output=json"])
    without = _frame(json.loads(out)) if status == 0 else status
    assert not _same(without, first), f"{name}: the option changes nothing, so this row proves nothing"
    status, out, _ = run_cli(["sweep", trace, *spell(base_sweep), "--output=json"])
    assert not _same(_frame(json.loads(out)) if status == 0 else status, first)


@pytest.mark.parametrize("name", [n for n, r in TABLE.items() if r.validate])
def test_validate_replays_the_same_scenario(name, traces, images, monkeypatch):
    """validate's qsim side is replay's row for the same options, and qemu-io is handed the same settings."""
    from qsim.qemu import QemuCounts

    validate_module = importlib.import_module("qsim.validate")  # (qsim.validate the attribute is the function)

    row = TABLE[name]
    fill = {k: v for k, v in images.items()}
    args = [a.format(**fill) for a in row.base + row.replay]
    handed = {}

    def fake_qemu(trace, virtual_size, options, l2_cache_size, l2_cache_entry_size, cache_mode, image=None,
                  progress=None, discard="ignore", discard_no_unref=False, qemu_io=None, backing_caches=(),
                  before_run=None):
        before_run(image or "<the scratch image>")  # where validate computes its qsim side
        handed.update(virtual_size=virtual_size, options=options, l2_cache_size=l2_cache_size,
                      l2_cache_entry_size=l2_cache_entry_size, cache_mode=cache_mode, image=image,
                      requests=len(trace), discard=discard, discard_no_unref=discard_no_unref,
                      backing_caches=backing_caches)
        return QemuCounts(**{f.name: 0 for f in dataclasses.fields(QemuCounts)})

    monkeypatch.setattr(validate_module, "replay_in_qemu", fake_qemu)
    # the file QEMU would open is the image itself (no scratch copy here): what replay reads of it at open stays
    monkeypatch.setattr(validate_module, "record_file_at_open", lambda alloc, path, cluster_size: None)
    monkeypatch.setattr("qsim.qemu.find_tool", lambda name, qemu_io=None: name)
    monkeypatch.setattr(validate_module, "qemu_version", lambda qemu_io=None: "7.2.22 (stub)")
    status, out, err = run_cli(["validate", traces[row.trace], *args, "--output=json"])
    assert status == 1, err  # the stub's zeros never match
    ours = json.loads(out)["qsim"]
    status, out, err = run_cli(["replay", traces[row.trace], *args, "--output=json"])
    expected = json.loads(out)[0]
    for key, value in ours.items():  # validate sums every layer's counters, as QEMU's trace does
        below = sum(expected.get(f"backing{d if d > 1 else ''}_{key}", 0)
                    for d in range(1, expected.get("backing_depth", 0) + 1)) if key in COMPARED + WHEN_MODELLED else 0
        assert value == expected[key] + below, (name, key)
    assert handed["cache_mode"] == expected["cache_mode"]
    assert (handed["discard"], handed["discard_no_unref"]) == (expected["discard"], expected["discard_no_unref"])
    assert handed["virtual_size"] == expected["virtual_size"]
    assert handed["l2_cache_entry_size"] in (None, expected["l2_cache_entry_size"])
    for k, layer in enumerate(handed["backing_caches"]):  # backing.l2-cache-size and the like reach qemu-io
        prefix = "backing_" if k == 0 else f"backing{k + 1}_"
        assert layer.l2_cache_entry_size in (None, expected[prefix + "l2_cache_entry_size"])
    assert (handed["image"] is not None) == (row.real_image is not None)
    if row.real_image is None:
        assert handed["options"].cluster_size == expected["cluster_size"]
        assert handed["options"].extended_l2 == expected["extended_l2"]


def _dests(parser) -> set[str]:
    return {a.dest for a in parser._actions if a.dest not in ("help", "version")}


def test_the_table_covers_every_option():
    """Every option of replay, sweep and validate is in the table (or says why it is not part of a scenario),
    and every scenario or reading option the table names is one the parsers have."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    covered = {d for row in TABLE.values() for d in row.dests}
    for command in ("replay", "sweep", "validate"):
        dests = _dests(sub[command])
        missing = dests - covered - set(NOT_SCENARIO)
        assert not missing, f"qsim {command}: options without a row in the equivalence table: {sorted(missing)}"
    assert covered <= SCENARIO_DESTS | READING_DESTS | GRID_DESTS
    assert SCENARIO_DESTS | READING_DESTS | GRID_DESTS <= covered


def test_scenario_hash_names_the_same_configuration_the_same_way():
    from qsim.cachecfg import CacheSettings
    from qsim.imageopts import ImageOptions
    from qsim.scenario import ImageSpec, Scenario

    a = Scenario(ImageSpec(ImageOptions(preallocation="metadata")), (CacheSettings(65536),), qemu_version="2.11")
    b = Scenario(ImageSpec(ImageOptions(preallocation="metadata")), (CacheSettings(65536),), qemu_version="2.11.0")
    assert a == b and a.config_id == b.config_id
    assert a.config_id != Scenario(a.image, a.caches).config_id  # the QEMU version is part of the name
