"""Fleet-scale sweeps: many traces x many configurations, on local worker processes or a Dask cluster.

One task is one (trace, geometry) replay returning a small DataFrame (every cache size of that geometry costs
nothing extra). Results land as Parquet, one file per task under ``<out>/parts/trace=<id>/``, where ``<id>`` is the
trace's name plus a hash of its content and the file name is a hash of the configuration: a rerun skips what is
already there, so an interrupted sweep resumes where it stopped. Dask (``pip install qsim[dask]``) is optional:
without ``scheduler`` the work runs on local processes using every core.
"""

from __future__ import annotations

import glob
import hashlib
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from .errors import QsimError, UsageError
from .safeio import atomic_path
from .scenario import Grid, Scenario, content_id
from .traceio.reading import ReadOptions

TRACE_SUFFIXES = (".iolog", ".iolog.gz", ".log", ".csv", ".npz", ".txt", ".blktrace")


@dataclass(frozen=True)
class Task:
    """One replay: a trace file, how to read it, and one scenario (one geometry; its cache sizes are swept inside
    it). ``config_id`` names the task's result part: equal options, equal name, on every machine."""

    trace_path: str
    trace_id: str
    scenario: Scenario
    reading: ReadOptions = ReadOptions()

    @property
    def config_id(self) -> str:
        return content_id({"scenario": self.scenario.to_dict(), "reading": asdict(self.reading)})


def expand_corpus(items: list[str]) -> list[str]:
    """Trace paths from globs, directories (their trace files) and list files (one path per line, ``@list.txt``
    or any ``.lst``/``.list`` file)."""
    paths: list[str] = []
    for item in items:
        if item.startswith("@") or item.endswith((".lst", ".list")):
            listing = item.lstrip("@")
            if not os.path.isfile(listing):
                raise QsimError(f"{listing}: no such list of traces")
            base = os.path.dirname(os.path.abspath(listing))
            with open(listing, encoding="utf-8") as f:
                for line in f:
                    line = line.strip()
                    if line and not line.startswith("#"):
                        paths.append(line if os.path.isabs(line) else os.path.join(base, line))
        elif os.path.isdir(item):
            paths.extend(sorted(p for p in glob.glob(os.path.join(item, "*")) if p.endswith(TRACE_SUFFIXES)))
        else:
            matches = sorted(glob.glob(item))
            if not matches:
                raise QsimError(f"{item}: no such trace (and no file matches it as a pattern)")
            paths.extend(matches)
    if not paths:
        raise UsageError("no traces to sweep")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise QsimError(f"{missing[0]}: no such trace file ({len(missing)} missing)")
    return list(dict.fromkeys(paths))


def trace_id(path: str) -> str:
    """``<file name>-<12 hex digits of the content's SHA-256>``: stable across machines and renames of folders."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    name = os.path.basename(path).split(".")[0]
    return f"{name}-{digest.hexdigest()[:12]}"


def run_task(task: Task) -> pd.DataFrame:
    """Replay one trace for one scenario (module-level, so processes and Dask workers can run it)."""
    from .replay import replay

    frame = replay(task.reading.read(task.trace_path), task.scenario).to_frame()
    frame.insert(0, "trace_id", task.trace_id)
    frame["trace"] = task.trace_path
    frame["config_id"] = task.config_id
    return frame


def part_path(out_dir: str, task: Task) -> str:
    return os.path.join(out_dir, "parts", f"trace={task.trace_id}", f"{task.config_id}.parquet")


def make_tasks(paths: list[str], grid: Grid, reading: ReadOptions = ReadOptions()) -> tuple[list[Task], list[str]]:
    """(one task per trace x geometry of ``grid``, the grid's skipped combinations)."""
    ids = {p: trace_id(p) for p in paths}
    scenarios, skipped = grid.expand()
    return [Task(p, ids[p], s, reading) for p in paths for s in scenarios], skipped


def fleet_sweep(tasks: list[Task], out_dir: str, scheduler: str | None = None, workers: int | None = None,
                progress=None) -> tuple[pd.DataFrame, dict]:
    """Run the tasks not yet in ``out_dir`` (locally on ``workers`` processes, or on the Dask scheduler at
    ``scheduler``), write each result as a Parquet part, and return (all rows, run statistics)."""
    _need_parquet()
    todo = [t for t in tasks if not os.path.exists(part_path(out_dir, t))]
    by_key = {(t.trace_id, t.config_id): t for t in todo}
    started = time.perf_counter()
    requests = 0
    for frame in (_run_dask(todo, scheduler) if scheduler else _run_local(todo, workers)):
        task = by_key[(frame["trace_id"].iloc[0], frame["config_id"].iloc[0])]
        path = part_path(out_dir, task)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_path(path) as tmp:  # a part appears whole or not at all
            frame.to_parquet(tmp, index=False)
        requests += int(frame["requests"].iloc[0])
        if progress is not None:
            progress(1)
    elapsed = time.perf_counter() - started
    frame = load_results(out_dir, tasks)
    stats = {"tasks": len(tasks), "ran": len(todo), "skipped": len(tasks) - len(todo), "requests": requests,
             "seconds": elapsed, "requests_per_second": requests / elapsed if elapsed > 0 else 0.0}
    return frame, stats


def local_workers(asked: int | None, tasks: int) -> int:
    """Worker processes for ``tasks`` tasks: as asked (default every core), never more than the cores or the
    tasks (a replay is CPU-bound: more processes than cores only add start-up and memory)."""
    cores = os.cpu_count() or 1
    check_workers(asked)
    return max(1, min(asked or cores, cores, tasks))


def check_workers(asked: int | None) -> None:
    """--workers takes at least one process (None: the default, every core)."""
    if asked is not None and asked < 1:
        raise UsageError(f"--workers {asked}: at least one worker process")


def _run_local(tasks: list[Task], workers: int | None):
    if not tasks:
        return
    workers = local_workers(workers, len(tasks))
    if workers == 1:
        for task in tasks:
            yield run_task(task)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(run_task, t) for t in tasks]
        for future in as_completed(futures):
            yield future.result()


def _run_dask(tasks: list[Task], scheduler: str):
    try:
        from dask.distributed import Client, as_completed as dask_completed
    except ImportError:
        raise QsimError("--scheduler needs Dask: pip install 'qsim[dask]' (or pip install 'dask[distributed]')",
                        status=2) from None
    if not tasks:
        return
    client = scheduler if not isinstance(scheduler, str) else _connect(Client, scheduler)
    try:
        futures = [client.submit(run_task, t, pure=False, retries=3) for t in tasks]
        for future in dask_completed(futures):
            yield future.result()
    finally:
        if isinstance(scheduler, str):
            client.close()


SCHEDULER_SCHEMES = ("tcp://", "tls://", "inproc://", "ucx://", "ws://", "wss://")
CONNECT_SECONDS = 5


def check_scheduler_address(address: str) -> None:
    """A Dask scheduler address is ``tcp://HOST:PORT`` (or another Dask scheme): refuse anything else up front."""
    if not address.startswith(SCHEDULER_SCHEMES) or address.rstrip("/").endswith("//"):
        raise UsageError(f"--scheduler {address[:80]!r}: expected a Dask scheduler address such as "
                         "tcp://scheduler:8786")


def _connect(client_type, address: str):
    check_scheduler_address(address)
    try:
        return client_type(address, timeout=f"{CONNECT_SECONDS}s")
    except (OSError, TimeoutError, ValueError) as exc:
        raise QsimError(f"--scheduler {address}: no Dask scheduler answered within {CONNECT_SECONDS} s "
                        f"({type(exc).__name__})") from None


def load_results(out_dir: str, tasks: list[Task] | None = None) -> pd.DataFrame:
    """All parts of a result set (only those of ``tasks`` when given), sorted into a stable order."""
    paths = [part_path(out_dir, t) for t in tasks] if tasks is not None else \
        glob.glob(os.path.join(out_dir, "parts", "trace=*", "*.parquet"))
    paths = [p for p in paths if os.path.exists(p)]
    if not paths:
        return pd.DataFrame()
    frame = pd.concat([pd.read_parquet(p) for p in sorted(paths)], ignore_index=True)
    return frame.sort_values(["trace_id", "cluster_size", "extended_l2", "l2_cache_bytes",
                              "l2_cache_size_asked"]).reset_index(drop=True)


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Per configuration, across volumes: median and p95 of the miss ratio and of metadata bytes read, and how many
    volumes the cache fully covers."""
    if frame.empty:
        return frame
    frame = frame.assign(miss_ratio=np.where(frame.l2_lookups > 0, frame.l2_misses / frame.l2_lookups.clip(lower=1),
                                             0.0),
                         covers_volume=frame.covered_fraction >= 1.0)
    keys = ["cluster_size", "extended_l2", "l2_cache_size_asked"]
    keys += [k for k in ("cache_size_asked", "refcount_cache_size_asked") if k in frame.columns]
    grouped = frame.groupby(keys, sort=True)
    summary = grouped.agg(volumes=("trace_id", "nunique"),
                          miss_ratio_median=("miss_ratio", "median"),
                          miss_ratio_p95=("miss_ratio", lambda s: float(np.percentile(s, 95))),
                          metadata_read_bytes_median=("metadata_read_bytes", "median"),
                          metadata_read_bytes_p95=("metadata_read_bytes", lambda s: float(np.percentile(s, 95))),
                          volumes_fully_covered=("covers_volume", "sum"))
    return summary.reset_index()


def _need_parquet() -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise QsimError("fleet sweeps write Parquet: pip install 'qsim[fleet]' (pyarrow)", status=2) from None
