"""Writing the files a user names: through a temporary file and a rename, never through a link, never over an
image or a FIFO, keeping an existing file's permissions, and leaving the old file whole when interrupted."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from qsim.errors import QsimError
from qsim.safeio import atomic_output, atomic_path
from qsim.synth import synthesize
from qsim.tables import save_frame
from qsim.traceio import read_trace, write_trace

ROOT = Path(__file__).resolve().parent.parent
IMAGE = b"QFI\xfb\x00\x00\x00\x03" + bytes(range(256)) * 4


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.qcow2"
    path.write_bytes(IMAGE)
    return path


def run_cli(*argv, cwd):
    return subprocess.run([sys.executable, "-m", "qsim", *argv], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("argv", [
    ["trace", "synth", "out.csv", "--size", "1G", "--requests", "10"],
    ["trace", "convert", str(ROOT / "traces" / "synth-hotspot-mixed.csv"), "out.csv"],
    ["replay", str(ROOT / "traces" / "fio-randread-4k.iolog.gz"), "--save", "out.csv"],
    ["plot", "coverage", "--save", "out.png"],
])
def test_a_link_to_an_image_stays_byte_identical(tmp_path, image, argv):
    target = argv[argv.index("--save") + 1] if "--save" in argv else argv[-1] if argv[1] == "convert" else argv[2]
    (tmp_path / target).symlink_to(image.name)
    proc = run_cli(*argv, cwd=tmp_path)
    command = " ".join(argv[:2]) if argv[0] == "trace" else argv[0]
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"qsim {command}: error: {target}: is a symbolic link; qsim does "
                                                "not write through links (name the real file)"]
    assert image.read_bytes() == IMAGE and os.path.islink(tmp_path / target) and not leftovers(tmp_path)


def test_an_existing_image_is_refused_even_by_its_own_name(tmp_path, image):
    frame = pd.DataFrame({"a": [1]})
    renamed = tmp_path / "results.csv"
    renamed.write_bytes(IMAGE)
    with pytest.raises(QsimError, match="results.csv: is a qcow2 image; qsim never writes over an image"):
        save_frame(frame, str(renamed))
    with pytest.raises(QsimError, match="is a qcow2 image"):
        write_trace(synthesize(1 << 30, 5), str(renamed))
    assert renamed.read_bytes() == IMAGE


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "out.csv"
    os.mkfifo(fifo)
    proc = run_cli("trace", "synth", str(fifo), "--size", "1G", "--requests", "10", cwd=tmp_path)  # timeout: hang
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"qsim trace synth: error: {fifo}: exists and is not a regular file; qsim "
                                   "writes only regular files")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_folder_and_a_missing_folder_are_refused(tmp_path):
    (tmp_path / "r.csv").mkdir()
    with pytest.raises(QsimError, match="r.csv: exists and is not a regular file"):
        save_frame(pd.DataFrame({"a": [1]}), str(tmp_path / "r.csv"))
    with pytest.raises(QsimError, match=r"cannot write: folder .*/nope does not exist"):
        write_trace(synthesize(1 << 30, 5), str(tmp_path / "nope" / "t.csv"))


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_write_leaves_the_old_file(tmp_path, interruption):
    path = tmp_path / "t.csv"
    path.write_text("old content\n")
    with pytest.raises(interruption):
        with atomic_output(str(path)) as f:
            f.write(b"half of the new ")
            raise interruption()
    assert path.read_text() == "old content\n" and not leftovers(tmp_path)


def test_a_failing_writer_leaves_the_old_trace(tmp_path, monkeypatch):
    path = tmp_path / "t.npz"
    write_trace(synthesize(1 << 30, 5, seed=1), str(path))
    before = path.read_bytes()
    import numpy as np

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(QsimError, match=r"t.npz: cannot write \(No space left on device\)"):
        write_trace(synthesize(1 << 30, 50, seed=2), str(path))
    assert path.read_bytes() == before and not leftovers(tmp_path)


@pytest.mark.parametrize("suffix", [".csv", ".iolog", ".iolog.gz", ".npz"])
def test_replacing_keeps_the_permissions(tmp_path, suffix):
    path = tmp_path / f"t{suffix}"
    path.write_text("x")
    os.chmod(path, 0o640)
    t = synthesize(1 << 30, 20, seed=3)
    write_trace(t, str(path))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert read_trace(str(path)).offset.tolist() == t.offset.tolist()


def test_a_new_file_gets_the_umask_mode_and_tables_and_figures_are_atomic(tmp_path):
    old = os.umask(0o027)
    try:
        save_frame(pd.DataFrame({"a": [1, 2]}), str(tmp_path / "r.json"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "r.json").st_mode) == 0o640
    assert pd.read_json(tmp_path / "r.json").a.tolist() == [1, 2]
    from qsim import plot
    from qsim.sizing import coverage_table

    fig = plot.coverage_map(coverage_table([1 << 30], [65536]))
    plot.save_figure(fig, str(tmp_path / "c.svg"))
    assert (tmp_path / "c.svg").read_text().lstrip().startswith("<?xml") and not leftovers(tmp_path)


def test_atomic_path_names_a_temporary_beside_the_target(tmp_path):
    with atomic_path(str(tmp_path / "x.png")) as tmp:
        assert Path(tmp).parent == tmp_path and tmp.endswith(".tmp") and os.path.exists(tmp)
        Path(tmp).write_bytes(b"png")
    assert (tmp_path / "x.png").read_bytes() == b"png" and not leftovers(tmp_path)
