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
