"""Shared fixtures. Tests that need real QEMU or fio skip with the reason when the tools are missing, unless
QSIM_REQUIRE_QEMU=1 (as in CI), where a missing tool is a failure."""

from __future__ import annotations

import os
import shutil

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
    else qemu-io's folder on PATH."""
    listed = [p for p in os.environ.get("QSIM_QEMU_PREFIXES", "").split(":") if p]
    if listed:
        return listed
    found = shutil.which("qemu-io")
    return [os.path.dirname(found)] if found else []


@pytest.fixture(params=qemu_prefixes() or [None], ids=lambda p: p or "no-qemu")
def qemu_prefix(request, monkeypatch) -> str:
    """One QEMU's folder, put first on PATH for the test (qsim.qemu finds qemu-img and qemu-io there)."""
    prefix = request.param
    if prefix is None or not os.access(os.path.join(prefix, "qemu-io"), os.X_OK):
        message = f"qemu-io not found in {prefix or 'PATH'} ({INSTALL_HINT})"
        if REQUIRE_QEMU:
            pytest.fail(message + " but QSIM_REQUIRE_QEMU=1")
        pytest.skip(message)
    monkeypatch.setenv("PATH", prefix + os.pathsep + os.environ.get("PATH", ""))
    return prefix
