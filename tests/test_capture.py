"""Known traces through QEMU's block layer, captured back from its log: order, ops, offsets and lengths must equal.

Two real setups:
- live toggling: qemu-system without a guest (-machine none, a -drive, QMP sockets; -msg timestamp=on as libvirt
  passes it; stderr to the log as libvirt does), the I/O issued by the HMP ``qemu-io`` command over QMP's
  human-monitor-command, ``qsim capture`` switching the events on and off (QMP socket, and a stand-in ``virsh``);
- a whole-run log: ``qemu-storage-daemon -T 'blk_co_p*'`` with an NBD export and ``qemu-io`` over NBD, for every
  QEMU in QSIM_QEMU_PREFIXES (7.2 and 10.0 in CI). qemu-storage-daemon's QMP has no trace-event-set-state, so live
  toggling needs qemu-system.
Skips when the binaries are missing, unless QSIM_REQUIRE_QEMU=1.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from qsim.qmp import QmpSocket
from qsim.trace import FLUSH, Trace
from qsim.traceio import read_trace

ROOT = Path(__file__).resolve().parent.parent
KNOWN = ROOT / "traces" / "fio-randrw-mixed-fsync.iolog.gz"  # reads, writes and fsyncs on an 8G file
REQUIRE = os.environ.get("QSIM_REQUIRE_QEMU") == "1"
ENV = dict(os.environ, PYTHONPATH=str(ROOT))

pytestmark = pytest.mark.qemu


def tool(name: str) -> list[str]:
    """Every copy of ``name`` in QSIM_QEMU_PREFIXES (or on PATH), skipping (or failing in CI) when there is none."""
    prefixes = [p for p in os.environ.get("QSIM_QEMU_PREFIXES", "").split(":") if p]
    found = [os.path.join(p, name) for p in prefixes if os.access(os.path.join(p, name), os.X_OK)]
    if not found and shutil.which(name):
        found = [shutil.which(name)]
    if not found:
        message = f"{name} not found (apt-get install -y qemu-utils qemu-system-x86)"
        if REQUIRE:
            pytest.fail(message + " but QSIM_REQUIRE_QEMU=1")
        pytest.skip(message)
    return found


def known(n: int) -> Trace:
    t = read_trace(str(KNOWN))
    return t.select(np.arange(n))


def without_flushes(t: Trace) -> Trace:
    return t.select(t.op != FLUSH)  # QEMU has no trace event for flushes: a capture cannot see them


def assert_same_requests(got: Trace, want: Trace) -> None:
    assert len(got) == len(want)
    assert got.op.tolist() == want.op.tolist()
    assert got.offset.tolist() == want.offset.tolist()
    assert got.length.tolist() == want.length.tolist()


def qemu_io_command(op: int, offset: int, length: int) -> str:
    return "flush" if op == FLUSH else f"{'read' if op == 0 else 'write -P 0xab'} {offset} {length}"


def wait_for(path: Path, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.02)


def connect(path: Path, seconds: float = 20) -> QmpSocket:
    """QEMU binds its socket a moment before it listens (and this machine can be slow): retry a while."""
    return QmpSocket(str(path), wait_seconds=seconds)


class GuestlessVM:
    """qemu-system with no guest: one drive, two QMP sockets (one for qsim capture, one for the test's I/O)."""

    def __init__(self, binary: str, workdir: Path, size: int):
        self.log = workdir / "domain.log"
        self.log.write_text("2026-12-01 21:00:00.000+0000: starting up libvirt version: 9.0.0\n"
                            "LC_ALL=C /usr/bin/qemu-system-x86_64 -name guest=vm1 -trace blk_co_p* -msg timestamp=on\n")
        image = workdir / "disk.qcow2"
        subprocess.run([tool("qemu-img")[0], "create", "-q", "-f", "qcow2", str(image), str(size)], check=True)
        self.control, io = workdir / "control.sock", workdir / "io.sock"
        self.proc = subprocess.Popen(
            [binary, "-machine", "none", "-nodefaults", "-display", "none", "-msg", "timestamp=on",
             "-drive", f"if=none,id=drive0,file={image},format=qcow2",
             "-qmp", f"unix:{self.control},server=on,wait=off", "-qmp", f"unix:{io},server=on,wait=off"],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"))
        wait_for(io)
        self.io = connect(io)

    def run(self, trace: Trace) -> None:
        for op, offset, length in zip(trace.op.tolist(), trace.offset.tolist(), trace.length.tolist()):
            out = self.io.execute("human-monitor-command",
                                  **{"command-line": f'qemu-io drive0 "{qemu_io_command(op, offset, length)}"'})
            assert "error" not in str(out).lower(), out

    def states(self) -> dict[str, str]:
        return {e["name"]: e["state"] for e in self.io.execute("trace-event-get-state", name="blk_co_p*")}

    def close(self) -> None:
        try:
            self.io.execute("quit")
        finally:
            self.io.close()
            self.proc.wait(timeout=10)


@pytest.fixture
def vm(tmp_path):
    machine = GuestlessVM(tool("qemu-system-x86_64")[0], tmp_path, 8 << 30)
    yield machine
    machine.close()


def start_capture(args: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "qsim", "capture", *args], stderr=subprocess.PIPE, text=True,
                            env=ENV)
    line = proc.stderr.readline()
    assert line.startswith("capturing blk_co_preadv, blk_co_pwritev"), line + proc.stderr.read()
    return proc


def test_capture_over_qmp_until_signal(vm, tmp_path):
    trace = known(400)
    vm.run(known(3))  # before the capture: not in it
    out = tmp_path / "captured.iolog.gz"
    proc = start_capture(["--qmp", str(vm.control), "--log", str(vm.log), "-o", str(out)])
    assert vm.states() == {"blk_co_preadv": "enabled", "blk_co_pwritev": "enabled"}
    vm.run(trace)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert vm.states() == {"blk_co_preadv": "disabled", "blk_co_pwritev": "disabled"}
    vm.run(known(5))  # after: the events are off, nothing more in the log
    captured = read_trace(str(out))
    want = without_flushes(trace)
    assert len(want) == 370 and "wrote 370 requests" in err
    assert_same_requests(captured, want)
    assert captured.time is not None and captured.time[0] == 0 and (np.diff(captured.time) >= 0).all()
    assert len(read_trace(str(vm.log))) == 370  # only while the events were on


def test_capture_through_virsh_for_a_duration(vm, tmp_path):
    """libvirt's way in: a stand-in virsh that passes qemu-monitor-command's JSON to the VM's QMP socket."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    virsh = bin_dir / "virsh"
    virsh.write_text(f"""#!{sys.executable}
import json, socket, sys
assert sys.argv[1:3] == ["qemu-monitor-command", "vm1"], sys.argv
sock = socket.socket(socket.AF_UNIX)
sock.connect({str(vm.control)!r})
f = sock.makefile("rw")
def ask(line):
    f.write(line + "\\n")
    f.flush()
    while True:
        reply = json.loads(f.readline())
        if "event" not in reply:
            return reply
f.readline()
ask('{{"execute": "qmp_capabilities"}}')
reply = ask(sys.argv[3])
reply["id"] = "libvirt-1"
print(json.dumps(reply))
""")
    virsh.chmod(0o755)
    trace = known(60)
    out = tmp_path / "vm1.iolog"
    env = dict(ENV, PATH=f"{bin_dir}:{os.environ['PATH']}")
    proc = subprocess.Popen([sys.executable, "-m", "qsim", "capture", "--virsh", "vm1", "--log", str(vm.log),
                             "--duration", "3", "-o", str(out)], stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr.readline().startswith("capturing")
    vm.run(trace)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert vm.states() == {"blk_co_preadv": "disabled", "blk_co_pwritev": "disabled"}
    assert out.read_text().startswith("fio version 3 iolog\n0 0x")
    assert_same_requests(read_trace(str(out)), without_flushes(trace))


def test_capture_errors_are_one_line(tmp_path, vm, capsys):
    from qsim.cli import main

    def capture(*args):
        rc = main(["capture", *args])
        return rc, capsys.readouterr().err

    out = str(tmp_path / "x.iolog")
    rc, err = capture("--qmp", str(tmp_path / "nope.sock"), "--log", str(vm.log), "-o", out)
    assert rc == 1 and err.count("\n") == 1 and "no such QMP socket" in err
    rc, err = capture("--qmp", str(vm.control), "--log", str(vm.log), "-o", str(tmp_path / "x.csv"))
    assert rc == 2 and "writes a fio iolog" in err
    rc, err = capture("--qmp", str(vm.control), "--log", str(vm.log), "-o", str(tmp_path / "no" / "x.iolog"))
    assert rc == 1 and "does not exist" in err
    rc, err = capture("--qmp", str(vm.control), "--log", str(tmp_path / "missing.log"), "-o", out)
    assert rc == 1 and "no such log file" in err
    rc, err = capture("--qmp", str(vm.control), "--log", str(vm.log), "--duration", "0.3", "-o", out)
    assert rc == 1 and "no requests of any BlockBackend" in err and not os.path.exists(out)
    assert vm.states() == {"blk_co_preadv": "disabled", "blk_co_pwritev": "disabled"}


@pytest.mark.parametrize("prefix_index", [0, 1])
def test_storage_daemon_log_over_nbd(tmp_path, prefix_index):
    """qemu-storage-daemon -T 'blk_co_p*' exporting over NBD, qemu-io replaying a known trace through it."""
    daemons = tool("qemu-storage-daemon")
    if prefix_index >= len(daemons):
        pytest.skip("one qemu-storage-daemon only (QSIM_QEMU_PREFIXES names one QEMU)")
    daemon = daemons[prefix_index]
    bindir = os.path.dirname(daemon)
    qemu_io = os.path.join(bindir, "qemu-io") if os.path.exists(os.path.join(bindir, "qemu-io")) else tool("qemu-io")[0]
    sock, log = tmp_path / "nbd.sock", tmp_path / "qsd.log"
    # NBD's sparse reads skip holes without reading (block status), so a fresh image would hide most reads: the
    # null-co driver (read-zeroes=off) reports data everywhere, so every request reaches the BlockBackend.
    qsd = subprocess.Popen([daemon, "-T", "blk_co_p*", "-T", f"file={log}",
                            "--blockdev", f"driver=null-co,node-name=disk0,size={8 << 30}",
                            "--nbd-server", f"addr.type=unix,addr.path={sock}",
                            "--export", "type=nbd,id=export0,node-name=disk0,name=disk0,writable=on"],
                           stderr=subprocess.PIPE)
    try:
        wait_for(sock)
        trace = known(2000)
        script = "\n".join(qemu_io_command(*r) for r in zip(trace.op.tolist(), trace.offset.tolist(),
                                                              trace.length.tolist())) + "\n"
        proc = subprocess.run([qemu_io, "-f", "raw", f"nbd+unix:///disk0?socket={sock}"], input=script,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "error" not in proc.stdout.lower(), proc.stderr
    finally:
        qsd.terminate()
        qsd.wait(timeout=10)
    want = without_flushes(trace)
    assert len(want) == 1884
    assert_same_requests(read_trace(str(log)), want)
    info = subprocess.run([sys.executable, "-m", "qsim", "trace", "info", str(log)], capture_output=True, text=True,
                          env=ENV)
    assert info.returncode == 0 and f"{log}: 1884 requests" in info.stdout and "BlockBackend" in info.stdout
    replay = subprocess.run([sys.executable, "-m", "qsim", "replay", str(log), "--size", "8G",
                             "--l2-cache-size", "1M", "--output", "csv"], capture_output=True, text=True, env=ENV)
    assert replay.returncode == 0, replay.stderr
    assert "20000" not in replay.stdout
