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
import os
import signal
import sys
import time
from contextlib import contextmanager

from ..errors import QsimError, UsageError
from ..safeio import check_output_path
from .common import RawDefaultsHelp
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
    from ..capture import EVENTS, SETTLE_SECONDS, event_states, restore, write_capture
    from ..qmp import QmpSocket, QmpVirsh
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
    if written.count:
        per = ", ".join(f"{name} {n}" for name, n in written.requests.items())
        print(f"wrote {written.count} requests to {args.out} (fio iolog v{3 if written.timed else 2}; BlockBackend "
              f"requests: {per})" + ("" if written.timed else "; the log has no timestamps (QEMU without -msg "
                                     "timestamp=on), so neither has it"), file=sys.stderr)
    else:
        what = f"BlockBackend {qemulog.show_device(device)}" if device is not None else "any BlockBackend"
        print(f"qsim capture: no requests of {what} in {log} during the capture (idle guest? is this the log QEMU "
              "writes to, and is QEMU built with the log trace backend, as Debian's and Ubuntu's are?); nothing "
              "written", file=sys.stderr)
    if failure:
        raise QsimError(f"{failure}; the events may still be on: switch them off with "
                        + " and ".join(f"trace-event-set-state name={e} enable=false" for e in EVENTS))
    return 0 if written.count else 1


def wait(duration: float | None) -> None:
    deadline = None if duration is None else time.monotonic() + duration
    while deadline is None or time.monotonic() < deadline:
        time.sleep(0.05 if deadline is None else min(0.05, max(deadline - time.monotonic(), 0)))
