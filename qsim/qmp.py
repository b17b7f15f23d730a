"""Talking to a running QEMU over QMP: a UNIX-socket client and libvirt's ``virsh qemu-monitor-command``, with one
interface (``execute`` returns QMP's ``return`` value; an error answer is a QsimError naming the command).

Used by ``qsim capture`` (trace events on and off in a running VM) and by the timed replays of
``qsim.qemusystem`` (requests through HMP's ``qemu-io`` in a guestless qemu-system)."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import time

from .errors import QsimError


def _request(command: str, arguments: dict) -> str:
    return json.dumps({"execute": command, **({"arguments": arguments} if arguments else {})})


def answer(name: str, command: str, message: dict) -> object:
    """QMP's ``return`` value of ``message``; a QsimError for an error answer or anything else."""
    if "error" in message:
        error = message["error"]
        raise QsimError(f"{name}: QMP {command} failed: {error.get('desc', error)}")
    if "return" not in message:
        raise QsimError(f"{name}: unexpected QMP answer to {command}: {str(message)[:100]}")
    return message["return"]


class QmpSocket:
    """A QMP client on a UNIX socket: greeting, qmp_capabilities, then one command at a time (events skipped).

    ``wait_seconds``: keep trying to connect that long (a QEMU just started binds its socket a moment before it
    listens); 0 fails at once, naming the usual causes."""

    def __init__(self, path: str, timeout: float = 10.0, wait_seconds: float = 0.0):
        self.name = path
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                self._connect(path, timeout)
                break
            except QsimError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)
        greeting = self._receive()
        if "QMP" not in greeting:
            raise QsimError(f"{path}: not a QMP socket (greeting {str(greeting)[:100]})")
        self.execute("qmp_capabilities")

    def _connect(self, path: str, timeout: float) -> None:
        if not os.path.exists(path):
            raise QsimError(f"{path}: no such QMP socket (start QEMU with -qmp unix:{path},server=on,wait=off)")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as exc:
            self.sock.close()
            raise QsimError(f"{path}: cannot connect to QMP ({exc.strerror or exc}; is another client attached? "
                            "QEMU serves one client per -qmp socket)") from None
        self.reader = self.sock.makefile("rb")

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
        try:
            self.sock.sendall(_request(command, arguments).encode() + b"\n")
        except OSError as exc:
            raise QsimError(f"{self.name}: QMP connection failed ({exc})") from None
        return answer(self.name, command, self._receive())

    def hmp(self, line: str) -> str:
        """One HMP command (``human-monitor-command``) that must print nothing: its output is an error."""
        out = self.execute("human-monitor-command", **{"command-line": line}) or ""
        if str(out).strip():
            raise QsimError(f"{self.name}: HMP {line!r}: {str(out).strip()[:300]}")
        return str(out)

    def close(self) -> None:
        try:
            self.reader.close()
        finally:
            self.sock.close()


class QmpVirsh:
    """QMP through libvirt: ``virsh [-c URI] qemu-monitor-command DOMAIN JSON`` per command."""

    def __init__(self, domain: str, uri: str | None = None):
        self.name = f"virsh domain {domain}"
        self.command = ["virsh"] + (["-c", uri] if uri else []) + ["qemu-monitor-command", domain]

    def execute(self, command: str, **arguments) -> object:
        try:
            proc = subprocess.run(self.command + [_request(command, arguments)], capture_output=True, text=True,
                                  timeout=30)
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
