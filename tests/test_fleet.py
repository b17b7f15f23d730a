"""Fleet sweeps: local worker processes and a real dask.distributed LocalCluster on loopback give the in-process
results; a rerun resumes; a worker killed mid-sweep loses only its task."""

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from qsim.fleet import expand_corpus, fleet_sweep, load_results, make_tasks, run_task, summarize
from qsim.scenario import Grid, Scenario
from qsim.synth import synthesize
from qsim.traceio import write_trace

from conftest import dask_local_cluster

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ["trace_id", "cluster_size", "extended_l2", "l2_cache_size_asked", "l2_lookups", "l2_misses",
           "l2_disk_reads", "l2_writebacks", "zero_fill_bytes", "image_file_bytes"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for i in range(4):
        t = synthesize((i + 2) << 30, 20_000, f"zipf:1.{i + 1}", "4k/70:64k/30", read_share=0.7, flush_every=25,
                       seed=i)
        write_trace(t, str(d / f"vol{i}.iolog.gz"))
    shutil.copy(ROOT / "traces" / "fio-randwrite-4k.iolog.gz", d)
    return d


def tasks_for(corpus):
    grid = Grid(Scenario.of((65536, None)), (65536, 2 << 20), (False, True))
    return make_tasks(expand_corpus([str(corpus / "*.iolog.gz")]), grid)[0]


def in_process(tasks):
    frame = pd.concat([run_task(t) for t in tasks], ignore_index=True)
    return frame.sort_values(COLUMNS[:4]).reset_index(drop=True)[COLUMNS]


def test_corpus_forms(corpus, tmp_path):
    listing = tmp_path / "traces.lst"
    listing.write_text("\n".join(str(p) for p in sorted(corpus.glob("*.gz"))) + "\n")
    assert expand_corpus([str(corpus)]) == expand_corpus([str(corpus / "*.gz")]) == expand_corpus([str(listing)])


def test_local_workers_equal_in_process_and_resume(corpus, tmp_path):
    tasks = tasks_for(corpus)
    expected = in_process(tasks)
    frame, stats = fleet_sweep(tasks, str(tmp_path / "out"), workers=2)
    assert stats["ran"] == len(tasks) == 20
    pd.testing.assert_frame_equal(frame[COLUMNS].reset_index(drop=True), expected)
    # remove three parts: a rerun redoes exactly those
    parts = sorted((tmp_path / "out" / "parts").glob("*/*.parquet"))
    for p in parts[:3]:
        os.remove(p)
    frame, stats = fleet_sweep(tasks, str(tmp_path / "out"), workers=1)
    assert (stats["ran"], stats["skipped"]) == (3, 17)
    pd.testing.assert_frame_equal(frame[COLUMNS].reset_index(drop=True), expected)
    summary = summarize(frame)
    assert set(summary["volumes"]) == {5} and len(summary) == 2 * 2 * 2


@pytest.fixture(scope="module")
def cluster():
    with dask_local_cluster(n_workers=2) as c:
        yield c


def test_dask_cluster_equals_in_process(corpus, tmp_path, cluster):
    tasks = tasks_for(corpus)
    frame, stats = fleet_sweep(tasks, str(tmp_path / "dask"), scheduler=cluster.scheduler_address)
    assert stats["ran"] == len(tasks)
    pd.testing.assert_frame_equal(frame[COLUMNS].reset_index(drop=True), in_process(tasks))


def test_a_worker_killed_mid_sweep_loses_only_its_task(corpus, tmp_path, cluster):
    tasks = tasks_for(corpus)
    killed = []

    def kill_one_worker(_):
        if not killed:
            nanny = next(iter(cluster.workers.values()))
            nanny.process.process.kill()  # the worker process dies; its tasks are rescheduled elsewhere
            killed.append(True)

    frame, stats = fleet_sweep(tasks, str(tmp_path / "kill"), scheduler=cluster.scheduler_address,
                               progress=kill_one_worker)
    assert killed and stats["ran"] == len(tasks)
    pd.testing.assert_frame_equal(frame[COLUMNS].reset_index(drop=True), in_process(tasks))
    assert len(load_results(str(tmp_path / "kill"))) == len(frame)
