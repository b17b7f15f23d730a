"""Shared fixtures. Tests that need real QEMU or fio skip with the reason when the tools are missing, unless
QSIM_REQUIRE_QEMU=1 (as in CI), where a missing tool is a failure.

``qemu`` runs a test once per QEMU build: the folders of QSIM_QEMU_PREFIXES (colon-separated, each holding
qemu-io and qemu-img; CI gives 7.2's /usr/bin and 10.0's /opt/qemu-10.0/usr/bin), or the qemu-io on PATH."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess

import pytest

REQUIRE_QEMU = os.environ.get("QSIM_REQUIRE_QEMU") == "1"
INSTALL_HINT = "apt-get install -y qemu-utils fio"


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        message = f"{tool} not found ({INSTALL_HINT})"
        if REQUIRE_QEMU:
            pytest.fail(message + " but QSIM_REQUIRE_QEMU=1")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def qemu_img() -> str:
    return _need("qemu-img")


@pytest.fixture(scope="session")
def qemu_io() -> str:
    return _need("qemu-io")


@pytest.fixture(scope="session")
def fio() -> str:
    return _need("fio")


def qemu_prefixes() -> list[str]:
    """The folders holding the QEMU binaries to compare with: QSIM_QEMU_PREFIXES (':'-separated, as CI sets it),
    else qemu-io's folder on PATH (a placeholder naming the problem when there is none, so the tests say so)."""
    listed = [p for p in os.environ.get("QSIM_QEMU_PREFIXES", "").split(":") if p]
    if listed:
        return listed
    found = shutil.which("qemu-io")
    return [os.path.dirname(found) if found else "(qemu-io not on PATH)"]


def qemu_version_of(qemu_io: str) -> tuple[int, int]:
    """(major, minor) of a qemu-io binary."""
    out = subprocess.run([qemu_io, "--version"], capture_output=True, text=True).stdout.split()
    major, minor = out[2].split(".")[:2] if len(out) > 2 else ("0", "0")
    return int(major), int(minor)


def _prefix_id(prefix: str) -> str:
    qemu_io = os.path.join(prefix, "qemu-io")
    if os.access(qemu_io, os.X_OK):
        return "qemu-%d.%d" % qemu_version_of(qemu_io)
    return prefix


def _need_prefix(prefix: str) -> None:
    for tool in (os.path.join(prefix, "qemu-io"), os.path.join(prefix, "qemu-img")):
        if not os.access(tool, os.X_OK):
            message = f"{tool} not found ({INSTALL_HINT}; QSIM_QEMU_PREFIXES lists folders of qemu-io and qemu-img)"
            if REQUIRE_QEMU:
                pytest.fail(message + " but QSIM_REQUIRE_QEMU=1")
            pytest.skip(message)


@pytest.fixture(scope="session", params=qemu_prefixes(), ids=_prefix_id)
def qemu(request) -> str:
    """The qemu-io of one QEMU build (its qemu-img beside it); validate(..., qemu_io=qemu) compares with it."""
    _need_prefix(request.param)
    return os.path.join(request.param, "qemu-io")


@pytest.fixture(params=qemu_prefixes(), ids=_prefix_id)
def qemu_prefix(request, monkeypatch) -> str:
    """One QEMU's folder, put first on PATH for the test (qsim.qemu finds qemu-img and qemu-io there)."""
    _need_prefix(request.param)
    monkeypatch.setenv("PATH", request.param + os.pathsep + os.environ.get("PATH", ""))
    return request.param


@contextlib.contextmanager
def dask_local_cluster(n_workers: int):
    """A real dask.distributed LocalCluster on loopback (worker processes, one thread each, quiet); skips without
    the distributed package. Each test module starts its own: one of them kills workers."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None, silence_logs=40) as cluster:
        yield cluster
