"""Helpers for the QMP tests: start and stop tern, talk QMP raw or through qemu.qmp.

Every wait here is bounded (STEP seconds unless a caller says otherwise), so a tern that hangs
makes a test fail quickly instead of stalling the suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

from qemu.qmp import ExecuteError, QMPClient

REPO = Path(__file__).resolve().parent.parent
TERN_BINARY = os.environ.get("TERN_BINARY") or str(REPO / ".build" / "debug" / "tern")

#: Default bound for a single wait (a reply, an event, a socket to appear).
STEP = 5.0
#: Bound for the guest's first pass line after tern starts.
BOOT_TIMEOUT = 10.0

DEFAULT_APPEND = "wss=16M rate=8M"
RAM_BYTES = 128 << 20
WORKING_SET_BASE = 0x1000000
WORKING_SET_BYTES = 16 << 20
IMAGE_BASE = 0x100000
CMDLINE_ADDRESS = 0x20000

PASS_LINE = re.compile(r"^tern-guest: pass (\d+) rate (\d+)MiB/s (ok|FAIL)", re.MULTILINE)
START_LINE = re.compile(r"^tern-guest: start ", re.MULTILINE)

Address = Union[str, tuple]


def skip_reason(suite: str = "QMP") -> Optional[str]:
    """Why the suite cannot run here, or None."""
    if not os.path.exists("/dev/kvm"):
        return (f"SKIPPED ALL {suite} TESTS: /dev/kvm is missing; these tests boot a guest under KVM "
                "and cannot run on this machine")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return f"SKIPPED ALL {suite} TESTS: /dev/kvm exists but is not readable and writable by this user"
    if not (os.path.isfile(TERN_BINARY) and os.access(TERN_BINARY, os.X_OK)):
        return (f"SKIPPED ALL {suite} TESTS: the tern binary {TERN_BINARY} does not exist "
                "(run `swift build` first, or set TERN_BINARY)")
    return None


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid: int) -> dict:
    """/proc/PID/status as a dict of strings."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def proc_kib(pid: int, key: str) -> int:
    """A '... kB' field of /proc/PID/status (VmRSS, VmHWM) in KiB."""
    status = proc_status(pid)
    assert key in status, f"/proc/{pid}/status has no {key}: the process has exited"
    return int(status[key].split()[0])


class TernOutput:
    """What a tern process left behind: its serial log (`self.log`) and stderr (`self.stderr_path`)."""

    log: str
    stderr_path: str
    proc: subprocess.Popen

    def force_kill(self) -> None:
        """SIGKILL, for a process that ignored SIGTERM."""
        self.proc.kill()

    def terminate(self) -> Optional[int]:
        """SIGTERM, then SIGKILL; returns the exit status (None if it would not die)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.force_kill()
                try:
                    return self.proc.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    return None
        return self.proc.returncode

    def log_text(self) -> str:
        try:
            with open(self.log, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def stderr_text(self) -> str:
        try:
            with open(self.stderr_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def passes(self, text: Optional[str] = None) -> list[tuple[int, bool]]:
        """The pass lines so far as (number, ok)."""
        text = self.log_text() if text is None else text
        return [(int(m.group(1)), m.group(3) == "ok") for m in PASS_LINE.finditer(text)]


class Tern(TernOutput):
    """One tern process: its paths, its pid, its serial log."""

    def __init__(self, *, workdir: Path, smp: Optional[int] = None, name: Optional[str] = None,
                 paused: bool = False, append: Optional[str] = DEFAULT_APPEND,
                 qmp: Optional[Iterable[str]] = None, extra: Iterable[str] = ()):
        self.workdir = workdir
        self.sock = str(workdir / "qmp.sock")
        self.log = str(workdir / "serial.log")
        self.stdout_path = str(workdir / "stdout")
        self.stderr_path = str(workdir / "stderr")
        #: Set by a test that makes tern exit on purpose (quit); teardown then does not complain.
        self.expect_exit = False
        #: QMP addresses tern listens on, in -qmp order: a path or a (host, port) tuple.
        self.addresses: list[Address] = []
        # "{dir}" in a -qmp spec stands for this tern's (short) work directory.
        qmp_specs = ([spec.replace("{dir}", str(workdir)) for spec in qmp] if qmp is not None
                     else [f"unix:{self.sock},server=on,wait=off"])
        args = [TERN_BINARY, "run", "-m", "128M", "-serial", f"file:{self.log}"]
        if append is not None:
            args += ["-append", append]
        if smp is not None:
            args += ["-smp", str(smp)]
        if name is not None:
            args += ["-name", name]
        if paused:
            args += ["-S"]
        for spec in qmp_specs:
            args += ["-qmp", spec]
            self.addresses.append(self._address_of(spec))
        args += list(extra)
        self.args = args
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                         start_new_session=True)
        self.pid = self.proc.pid

    @staticmethod
    def _address_of(spec: str) -> Address:
        kind, _, rest = spec.partition(":")
        where = rest.split(",")[0]
        if kind == "unix":
            return where
        if kind == "tcp":
            host, _, port = where.rpartition(":")
            return (host or "127.0.0.1", int(port))
        raise ValueError(f"unknown -qmp spec {spec}")

    @property
    def address(self) -> Address:
        """The first QMP address."""
        return self.addresses[0]

    # ----- output ---------------------------------------------------------------------------

    def diagnostics(self) -> str:
        rc = self.proc.poll()
        state = "running" if rc is None else f"exited with status {rc}"
        log = self.log_text()
        return (f"\n--- tern (pid {self.pid}, {state}): {' '.join(self.args)}"
                f"\n--- serial log (last 1500 chars):\n{log[-1500:]}"
                f"\n--- stderr (last 3000 chars):\n{self.stderr_text()[-3000:]}")

    def assert_healthy_log(self) -> None:
        log = self.log_text()
        assert "CORRUPT" not in log and " FAIL" not in log, "the guest's self-check failed" + self.diagnostics()

    # ----- waiting --------------------------------------------------------------------------

    def wait_until(self, condition: Callable[[], bool], what: str, timeout: float = STEP) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if condition():
                return
            if self.proc.poll() is not None and not self.expect_exit:
                raise AssertionError(f"tern exited while waiting for {what}" + self.diagnostics())
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}" + self.diagnostics())
            time.sleep(0.05)

    def wait_for_qmp(self, timeout: float = STEP) -> None:
        """Wait until every QMP address accepts a connection and sends a greeting."""
        for address in self.addresses:
            def ready(address=address) -> bool:
                try:
                    with RawQMP(address, timeout=1.0) as probe:
                        probe.read_message()
                    return True
                except (OSError, EOFError, ValueError):
                    return False
            self.wait_until(ready, f"the QMP server at {address}", timeout)

    def wait_passes(self, count: int, timeout: float = BOOT_TIMEOUT, after: int = 0) -> None:
        """Wait for `count` pass lines beyond the first `after` ones."""
        self.wait_until(lambda: len(self.passes()) >= after + count,
                        f"{count} guest pass line(s) after the first {after}", timeout)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def assert_alive(self) -> None:
        assert self.alive(), "tern died" + self.diagnostics()

    # ----- teardown -------------------------------------------------------------------------



def new_workdir() -> Path:
    # Short paths under /tmp: a unix socket path must stay under 108 bytes.
    return Path(tempfile.mkdtemp(prefix="tern-qmp-", dir="/tmp"))


# ----- raw QMP over a plain socket -----------------------------------------------------------

def connect_unix(path: str, timeout: float = STEP) -> socket.socket:
    """Connect to a unix socket, waiting (bounded) while tern's listen backlog is full.

    A socket with a timeout is non-blocking underneath, and a non-blocking unix connect fails
    with EAGAIN instead of waiting when the backlog is full; a blocking client would wait.
    """
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            return sock
        except BlockingIOError:
            sock.close()
            if time.monotonic() > deadline:
                raise TimeoutError(f"tern did not accept a connection on {path} within {timeout:.0f} s "
                                   "(listen backlog stayed full)") from None
            time.sleep(0.01)
        except OSError:
            sock.close()
            raise


class RawQMP:
    """A QMP client that sends whatever bytes it is given and reads replies line by line."""

    def __init__(self, address: Address, timeout: float = STEP):
        if isinstance(address, tuple):
            self.sock = socket.create_connection(address, timeout=timeout)
        else:
            self.sock = connect_unix(address, timeout)
        self.timeout = timeout
        self.buffer = b""
        #: Events seen while waiting for replies, in order.
        self.events: list[dict] = []
        #: Every raw line received, terminator included.
        self.lines: list[bytes] = []

    def __enter__(self) -> "RawQMP":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, message: Any) -> None:
        self.send_bytes(json.dumps(message).encode() + b"\n")

    def read_line(self, timeout: Optional[float] = None) -> bytes:
        """The next line, terminator included. EOFError at end of stream."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no complete line from tern in time; partial: {self.buffer[:200]!r}")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise TimeoutError(f"no complete line from tern in time; partial: {self.buffer[:200]!r}")
            if not chunk:
                raise EOFError(f"tern closed the connection; partial line: {self.buffer[:200]!r}")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        line += b"\n"
        self.lines.append(line)
        return line

    def read_message(self, timeout: Optional[float] = None) -> dict:
        line = self.read_line(timeout)
        try:
            return json.loads(line)
        except ValueError as error:
            raise ValueError(f"tern sent a line that is not JSON: {line[:300]!r}") from error

    def reply(self, timeout: Optional[float] = None) -> dict:
        """The next message that is not an event (events are kept in self.events)."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        while True:
            message = self.read_message(max(0.01, deadline - time.monotonic()))
            if isinstance(message, dict) and "event" in message:
                self.events.append(message)
                continue
            return message

    def command(self, execute: str, arguments: Optional[dict] = None, **extra: Any) -> dict:
        message: dict = {"execute": execute}
        if arguments is not None:
            message["arguments"] = arguments
        message.update(extra)
        self.send(message)
        return self.reply()

    def greeting(self) -> dict:
        return self.read_message()

    def negotiate(self) -> dict:
        """Read the greeting and negotiate capabilities; returns the greeting."""
        greeting = self.greeting()
        assert "QMP" in greeting, f"expected a greeting, got {greeting}"
        reply = self.command("qmp_capabilities")
        assert reply == {"return": {}}, f"qmp_capabilities failed: {reply}"
        return greeting

    def wait_event(self, name: str, timeout: float = STEP) -> dict:
        """The next event called `name`, from those already seen or still to come."""
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                if event.get("event") == name:
                    return self.events.pop(i)
            message = self.read_message(max(0.01, deadline - time.monotonic()))
            if isinstance(message, dict) and "event" in message:
                self.events.append(message)
            else:
                raise AssertionError(f"expected event {name}, got a non-event message {message}")


def raw_session(address: Address) -> RawQMP:
    client = RawQMP(address)
    try:
        client.negotiate()
    except BaseException:
        client.close()
        raise
    return client


def assert_error(reply: dict, error_class: str, desc: Optional[str] = None, *,
                 desc_prefix: Optional[str] = None) -> dict:
    assert isinstance(reply, dict) and "error" in reply, f"expected an error reply, got {reply}"
    assert "return" not in reply, f"a reply with both error and return: {reply}"
    error = reply["error"]
    assert isinstance(error, dict), f"'error' must be an object: {reply}"
    assert isinstance(error.get("desc"), str), f"error without a string desc: {reply}"
    assert error.get("class") == error_class, f"expected class {error_class}, got {reply}"
    if desc is not None:
        assert error["desc"] == desc, f"expected desc {desc!r}, got {reply}"
    if desc_prefix is not None:
        assert error["desc"].startswith(desc_prefix), f"expected desc starting {desc_prefix!r}, got {reply}"
    return error


# ----- qemu.qmp ------------------------------------------------------------------------------

def asynctest(fn):
    """Run an `async def` test with asyncio.run (pytest-asyncio is not used)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return asyncio.run(fn(*args, **kwargs))
    return wrapper


@contextlib.asynccontextmanager
async def qmp_client(address: Address, name: str = "tern-test"):
    """A negotiated qemu.qmp client, disconnected afterwards whatever happened."""
    qmp = QMPClient(name)
    await asyncio.wait_for(qmp.connect(address), STEP)
    try:
        yield qmp
    finally:
        # After quit, or if tern dropped us, disconnect re-raises the reader's error: ignore it.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(qmp.disconnect(), STEP)


async def execute(qmp: QMPClient, command: str, arguments: Optional[dict] = None,
                  timeout: float = STEP) -> Any:
    return await asyncio.wait_for(qmp.execute(command, arguments), timeout)


async def execute_error(qmp: QMPClient, command: str, arguments: Optional[dict] = None,
                        error_class: str = "GenericError", desc: Optional[str] = None,
                        timeout: float = STEP) -> ExecuteError:
    try:
        result = await execute(qmp, command, arguments, timeout)
    except ExecuteError as error:
        assert error.error_class == error_class, f"{command}: expected {error_class}, got {error.received}"
        if desc is not None:
            assert error.error.error.desc == desc, f"{command}: expected desc {desc!r}, got {error.received}"
        return error
    raise AssertionError(f"{command} {arguments}: expected a {error_class} error, got return {result!r}")


async def next_event(listener, name: Optional[str] = None, timeout: float = STEP) -> dict:
    """The next event from a qemu.qmp EventListener (optionally: the next one called `name`)."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        try:
            event = await asyncio.wait_for(listener.get(), max(0.01, remaining))
        except asyncio.TimeoutError:
            raise AssertionError(f"no {name or 'event'} within {timeout:.0f} s") from None
        if name is None or event["event"] == name:
            return dict(event)


def check_event_shape(event: dict, name: str, data: Optional[dict] = None) -> None:
    """QEMU's event format: event, optional data object, timestamp {seconds, microseconds}."""
    assert event.get("event") == name, f"expected {name}: {event}"
    assert set(event) <= {"event", "data", "timestamp"}, f"unexpected members in {event}"
    if data is not None:
        assert event.get("data") == data, f"{name}: expected data {data}, got {event}"
    elif "data" in event:
        assert isinstance(event["data"], dict), f"{name}: data must be an object: {event}"
    stamp = event.get("timestamp")
    assert isinstance(stamp, dict) and set(stamp) == {"seconds", "microseconds"}, f"bad timestamp: {event}"
    seconds, micros = stamp["seconds"], stamp["microseconds"]
    assert isinstance(seconds, int) and isinstance(micros, int), f"timestamp members must be integers: {event}"
    assert 0 <= micros < 1_000_000, f"microseconds out of range: {event}"
    assert abs(seconds + micros / 1e6 - time.time()) < 60, f"timestamp is not the wall-clock time: {event}"
