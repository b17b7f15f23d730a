"""`qsim size` and `qsim measure` from the command line: JSON contract, human output, errors without tracebacks."""

import json
import subprocess
import sys

import pytest

from qsim.cli import main


def run(capsys, *argv):
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def run_process(*argv):
    return subprocess.run([sys.executable, "-m", "qsim", *argv], capture_output=True, text=True)


def test_size_json_contract(capsys):
    status, out, _ = run(capsys, "size", "4T", "-o", "cluster_size=128k,extended_l2=on", "--output=json")
    assert status == 0
    d = json.loads(out)
    assert d["virtual_size"] == 4 << 40 and d["cluster_size"] == 128 << 10 and d["extended_l2"] is True
    assert d["l2_entry_bytes"] == 16
    assert d["full_l2_cache_bytes"] == 512 << 20
    assert (d["l2_cache_bytes"], d["l2_cache_entry_size"], d["l2_cache_entries"]) == (32 << 20, 4096, 8192)
    assert d["refcount_cache_bytes"] == 4 * (128 << 10)
    assert d["covered_bytes"] == 256 << 30 and d["covered_fraction"] == 0.0625
    assert "l2-cache-size=512M" in d["settings"]["drive"]
    assert '"l2-cache-size":536870912' in d["settings"]["blockdev"]
    assert "<max_size unit='bytes'>537395200</max_size>" in d["settings"]["libvirt"]


def test_size_human_output(capsys):
    status, out, _ = run(capsys, "size", "1T", "--l2-cache-size", "8M")
    assert status == 0
    assert "8M = 2048 entries x 4k" in out
    assert "covers          64G of 1T (6.25%)" in out
    assert "QEMU's default would be 32M = 8192 x 4k" in out


def test_size_coverage_and_largest_disk(capsys):
    _, out, _ = run(capsys, "size", "1T", "--coverage", "50%", "--output=json")
    assert json.loads(out)["target_l2_cache_bytes"] == 64 << 20
    _, out, _ = run(capsys, "size", "--l2-cache-size", "32M", "-o", "extended_l2=on", "--output=json")
    assert json.loads(out)["largest_covered_disk"] == 128 << 30


def test_measure_json_is_qemu_img_json(capsys):
    status, out, _ = run(capsys, "measure", "2T", "--output=json")
    assert status == 0 and json.loads(out) == {"required": 335806464, "fully-allocated": 2199359062016}


def test_measure_human_breakdown(capsys):
    _, out, _ = run(capsys, "measure", "2T")
    assert "L2 tables" in out and "268435456" in out and "refcount blocks" in out


@pytest.mark.parametrize(
    "argv, status, message",
    [
        (["size", "1X"], 2, "unknown size suffix 'X'"),
        (["size", "-5G"], 2, "-5G"),
        (["size", "--", "-5G"], 2, "is not a size"),
        (["size", "1T", "-o", "cluster_size=3k"], 1, "Cluster size must be a power of two"),
        (["size", "1T", "-o", "colour=blue"], 2, "invalid parameter 'colour'"),
        (["size", "1T", "-o", "extended_l2=maybe"], 2, "expected on or off"),
        (["size", "1T", "--cache-size", "1M", "--l2-cache-size", "2M"], 1, "may not exceed cache-size"),
        (["size", "1T", "--coverage", "150%"], 2, "at most 100%"),
        (["size"], 2, "give a disk SIZE"),
        (["size", "1T", "--qemu-version", "banana"], 2, "is not a QEMU version"),
        (["measure", "16T", "-o", "cluster_size=4k"], 1, "The image size is too large"),
        (["measure", "1T", "-o", "cluster_size=8k,extended_l2=on"], 1, "at least 16384 bytes"),
    ],
)
def test_bad_input_is_one_clear_line(argv, status, message):
    proc = run_process(*argv)
    assert proc.returncode == status
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_sizing_commands_load_no_heavy_module():
    """qsim --version, size and measure answer without numpy, pandas or numba (they cost ~1 s to import)."""
    import subprocess
    import sys

    code = ("import sys, io, contextlib\nfrom qsim import cli\n"
            "for argv in (['size', '1T'], ['measure', '1T'], ['size', '4T', '-o', 'cluster_size=2M']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        assert cli.main(argv) == 0\n"
            "print(sorted(m for m in ('numpy', 'pandas', 'numba', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_package_functions_stay_functions_after_their_modules_load():
    """qsim.replay / sweep / validate are the functions even once something imported the modules of the same
    name (the import system binds submodules on the package; notebook 04 once got the module and failed)."""
    import subprocess
    import sys

    code = ("import qsim\nfrom qsim.validate import validate\nimport qsim.sweep\nimport importlib\n"
            "print(callable(qsim.replay), callable(qsim.sweep), callable(qsim.validate),"
            " type(importlib.import_module('qsim.replay')).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True", "True", "module"]
