"""``qsim capture``: record a running VM's block requests from the host, without touching the guest.

QEMU's BlockBackend trace events ``blk_co_preadv`` and ``blk_co_pwritev`` are switched on over QMP
(``trace-event-set-state``; a QMP socket, or libvirt's ``virsh qemu-monitor-command``), left on for a duration or
until Ctrl-C, and switched back to their previous state, also on an error or a signal. QEMU's ``log`` trace backend
(Debian, Ubuntu) writes the lines to its log (stderr, which libvirt sends to /var/log/libvirt/qemu/DOMAIN.log, or
the ``-D`` file); the part of the log written meanwhile becomes a fio iolog with one file per BlockBackend (named by
its blk pointer): v3 with the log's timestamps (``-msg timestamp=on``, which libvirt passes), v2 without them.

What a capture cannot see: flushes and discards (QEMU has no trace event for them, neither at the BlockBackend nor
in virtio-blk), and which guest disk a BlockBackend pointer is (tell them apart by size and counts, or by a known
I/O). Requests are in submission order; with several in flight their completion order is not recorded.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager


from ..errors import QsimError, UsageError
from ..codes import WRITE
from ..safeio import atomic_output, check_output_path
from .common import RawDefaultsHelp

EVENTS = ("blk_co_preadv", "blk_co_pwritev")
SETTLE_SECONDS = 0.2  # after switching off, for lines of requests already past the trace point
EXAMPLES = """examples:
  qsim capture --virsh vm1 --duration 60 -o vm1.iolog.gz        # log: /var/log/libvirt/qemu/vm1.log
  qsim capture --qmp /run/vm1.qmp --log /var/log/vm1.log -o vm1.iolog   # until Ctrl-C
  qsim trace info vm1.iolog.gz; qsim replay vm1.iolog.gz --file 0x55d0c3a1b2c0 --l2-cache-size 1M,default
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("capture", help="record a running VM's block requests (QEMU trace events over QMP)",
                       description=__doc__, epilog=EXAMPLES, formatter_class=RawDefaultsHelp)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--qmp", metavar="SOCKET", help="QEMU's QMP UNIX socket (-qmp unix:SOCKET,server=on,wait=off)")
    where.add_argument("--virsh", metavar="DOMAIN", help="a libvirt domain: QMP through virsh qemu-monitor-command")
    p.add_argument("--connect", metavar="URI", help="with --virsh: libvirt connection URI (virsh -c)")
    p.add_argument("--log", metavar="FILE", help="the file QEMU's log goes to (default with --virsh: "
                   "/var/log/libvirt/qemu/DOMAIN.log)")
    p.add_argument("--duration", type=float, metavar="SECONDS", help="how long to record (default: until Ctrl-C)")
    p.add_argument("--device", metavar="PTR", help="keep one BlockBackend (blk pointer); default: all, one file each")
    p.add_argument("-o", "--out", required=True, metavar="OUT", help="the iolog to write (.iolog, .iolog.gz)")
    p.set_defaults(run=run_capture)


class QmpSocket:
    """A QMP client on a UNIX socket: greeting, qmp_capabilities, then one command at a time (events skipped)."""

    def __init__(self, path: str, timeout: float = 10.0):
        self.name = path
        if not os.path.exists(path):
            raise QsimError(f"{path}: no such QMP socket (start QEMU with -qmp unix:{path},server=on,wait=off)")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as exc:
            raise QsimError(f"{path}: cannot connect to QMP ({exc.strerror or exc}; is another client attached? "
                            "QEMU serves one client per -qmp socket)") from None
        self.reader = self.sock.makefile("rb")
        greeting = self._receive()
        if "QMP" not in greeting:
            raise QsimError(f"{path}: not a QMP socket (greeting {str(greeting)[:100]})")
        self.execute("qmp_capabilities")

    def _receive(self) -> dict:
        while True:
            try:
                line = self.reader.readline()
            except OSError as exc:
                raise QsimError(f"{self.name}: QMP connection failed ({exc})") from None
            if not line:
                raise QsimError(f"{self.name}: QEMU closed the QMP connection")
            try:
                message = json.loads(line)
            except ValueError:
                raise QsimError(f"{self.name}: not QMP: {line[:100]!r}") from None
            if "event" not in message:
                return message

    def execute(self, command: str, **arguments) -> object:
        request = {"execute": command, **({"arguments": arguments} if arguments else {})}
        try:
            self.sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as exc:
            raise QsimError(f"{self.name}: QMP connection failed ({exc})") from None
        return answer(self.name, command, self._receive())

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


class QmpVirsh:
    """QMP through libvirt: ``virsh [-c URI] qemu-monitor-command DOMAIN JSON`` per command."""

    def __init__(self, domain: str, uri: str | None = None):
        self.name = f"virsh domain {domain}"
        self.command = ["virsh"] + (["-c", uri] if uri else []) + ["qemu-monitor-command", domain]

    def execute(self, command: str, **arguments) -> object:
        request = json.dumps({"execute": command, **({"arguments": arguments} if arguments else {})})
        try:
            proc = subprocess.run(self.command + [request], capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            raise QsimError("virsh not found (apt-get install -y libvirt-clients), or use --qmp SOCKET") from None
        except subprocess.TimeoutExpired:
            raise QsimError(f"{self.name}: virsh did not answer within 30 s") from None
        if proc.returncode != 0:
            raise QsimError(f"{self.name}: {' '.join(map(shlex.quote, self.command[:-1]))} failed: "
                            f"{(proc.stderr or proc.stdout).strip()[:300]}")
        try:
            return answer(self.name, command, json.loads(proc.stdout))
        except ValueError:
            raise QsimError(f"{self.name}: virsh printed no QMP answer: {proc.stdout[:100]!r}") from None

    def close(self) -> None:
        pass


def answer(name: str, command: str, message: dict) -> object:
    if "error" in message:
        error = message["error"]
        raise QsimError(f"{name}: QMP {command} failed: {error.get('desc', error)}")
    if "return" not in message:
        raise QsimError(f"{name}: unexpected QMP answer to {command}: {str(message)[:100]}")
    return message["return"]


def event_states(qmp) -> dict[str, bool]:
    """The blk_co_p* events this QEMU has, and whether each is on now."""
    found = {e["name"]: e.get("state") == "enabled" for e in qmp.execute("trace-event-get-state", name="blk_co_p*")}
    missing = [e for e in EVENTS if e not in found]
    if missing:
        raise QsimError(f"{qmp.name}: this QEMU has no trace event {', '.join(missing)} (QEMU 2.x or later has them)")
    return {e: found[e] for e in EVENTS}


class _Stop(Exception):
    """SIGINT (also when started in the background, where it is ignored), SIGTERM or SIGHUP: stop the capture."""


@contextmanager
def stop_signals():
    def stop(signum, frame):
        raise _Stop(signal.Signals(signum).name)

    saved = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def run_capture(args: argparse.Namespace) -> int:

    from ..traceio import format_for_output, qemulog

    log = args.log or (f"/var/log/libvirt/qemu/{args.virsh}.log" if args.virsh else None)
    if log is None:
        raise UsageError("--log: name the file QEMU's log goes to (its stderr, or its -D file)")
    if args.duration is not None and args.duration <= 0:
        raise UsageError("--duration: expected a positive number of seconds")
    device = None if args.device is None else qemulog.parse_device(args.device)
    if format_for_output(args.out) != "iolog":
        raise UsageError(f"-o {args.out}: qsim capture writes a fio iolog (name it .iolog or .iolog.gz)")
    check_output_path(args.out)  # before QEMU is touched
    if not os.path.isfile(log):
        raise QsimError(f"{log}: no such log file (where does this QEMU's stderr or -D log go?)")
    qmp = QmpSocket(args.qmp) if args.qmp else QmpVirsh(args.virsh, args.connect)
    try:
        before = event_states(qmp)
        start = os.path.getsize(log)
        failure = None
        with stop_signals():
            try:
                for event in EVENTS:
                    qmp.execute("trace-event-set-state", name=event, enable=True)
                until = "for %g s" % args.duration if args.duration else "until Ctrl-C"
                print(f"capturing {', '.join(EVENTS)} of {qmp.name} into {log} {until}", file=sys.stderr, flush=True)
                wait(args.duration)
            except _Stop:
                pass
            finally:
                failure = restore(qmp, before)
        time.sleep(SETTLE_SECONDS)
        end = os.path.getsize(log)
    finally:
        qmp.close()
    if end < start:
        raise QsimError(f"{log}: the log shrank during the capture (rotated or truncated?); nothing written")
    written = write_capture(log, start, end, device, args.out)
    if failure:
        raise QsimError(f"{failure}; the events may still be on: switch them off with "
                        + " and ".join(f"trace-event-set-state name={e} enable=false" for e in EVENTS))
    return 0 if written else 1


def wait(duration: float | None) -> None:
    deadline = None if duration is None else time.monotonic() + duration
    while deadline is None or time.monotonic() < deadline:
        time.sleep(0.05 if deadline is None else min(0.05, max(deadline - time.monotonic(), 0)))


def restore(qmp, before: dict[str, bool]) -> str | None:
    """Put each event back as it was (off, unless it was on before); the problem, if that failed."""
    problem = None
    for event, state in before.items():
        try:
            qmp.execute("trace-event-set-state", name=event, enable=state)
        except QsimError as exc:
            problem = problem or str(exc)
    return problem


def write_capture(log: str, start: int, end: int, device: int | None, out: str) -> int:
    """The log's blk_co_p* lines between bytes start and end as a fio iolog; the number of requests written."""
    import numpy as np

    from ..traceio import qemulog

    end = whole_lines_end(log, start, end)
    first_line = 1 + count_lines(log, start)
    chunks = list(qemulog.raw_chunks(log, start=start, end=end, first_line=first_line))
    if device is not None:
        chunks = [c._replace(**{k: (None if v is None else v[c.key == device])
                                for k, v in c._asdict().items()}) for c in chunks]
    chunks = [c for c in chunks if len(c.op)]
    if not chunks:
        what = f"BlockBackend {qemulog.show_device(device)}" if device is not None else "any BlockBackend"
        print(f"qsim capture: no requests of {what} in {log} during the capture (idle guest? is this the log QEMU "
              "writes to, and is QEMU built with the log trace backend, as Debian's and Ubuntu's are?); nothing "
              "written", file=sys.stderr)
        return 0
    keys = list(dict.fromkeys(k for c in chunks for k in np.unique(c.key).tolist()))
    names = {k: qemulog.show_device(k) for k in keys}
    timed = chunks[0].ticks is not None
    t0 = int(chunks[0].ticks[0]) if timed else 0
    count = sum(len(c.op) for c in chunks)
    with atomic_output(out, binary=True) as raw:
        stream = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6) if out.endswith(".gz") else raw
        text = io.TextIOWrapper(stream, encoding="utf-8", newline="\n")
        prefix = "0 " if timed else ""
        text.write(f"fio version {3 if timed else 2} iolog\n")
        for name in names.values():
            text.write(f"{prefix}{name} add\n")
        for name in names.values():
            text.write(f"{prefix}{name} open\n")
        action = np.array(["read", "write"])
        last = 0
        for c in chunks:
            file_names = np.array([names[k] for k in c.key.tolist()], dtype=object)
            body = file_names + " " + action[(c.op == WRITE).astype(np.intp)].astype(object) + " " \
                + c.offset.astype(str).astype(object) + " " + c.length.astype(str).astype(object)
            if timed:
                usec = c.ticks - t0
                last = int(usec[-1])
                body = usec.astype(str).astype(object) + " " + body
            text.write("\n".join(body.tolist()) + "\n")
        for name in names.values():
            text.write(f"{last if timed else ''}{' ' if timed else ''}{name} close\n")
        text.flush()
        text.detach()
        if stream is not raw:
            stream.close()
    per = ", ".join(f"{names[k]} {sum(int((c.key == k).sum()) for c in chunks)}" for k in keys)
    print(f"wrote {count} requests to {out} (fio iolog v{3 if timed else 2}; BlockBackend requests: {per})"
          + ("" if timed else "; the log has no timestamps (QEMU without -msg timestamp=on), so neither has it"),
          file=sys.stderr)
    return count


def whole_lines_end(path: str, start: int, end: int) -> int:
    """``end`` moved back to just after the last complete line (QEMU may be writing one as we look)."""
    with open(path, "rb") as f:
        position = end
        while position > start:
            size = min(1 << 16, position - start)
            f.seek(position - size)
            block = f.read(size)
            cut = block.rfind(b"\n")
            if cut >= 0:
                return position - size + cut + 1
            position -= size
    return start


def count_lines(path: str, end: int) -> int:
    lines, done = 0, 0
    with open(path, "rb") as f:
        while done < end:
            block = f.read(min(32 << 20, end - done))
            if not block:
                break
            lines += block.count(b"\n")
            done += len(block)
    return lines
