"""Helpers for tests/test_migration.py: tern processes set up as migration sources and
destinations, qemu.qmp sessions with bounded waits, and a reader for tern's migration stream
(so the tests can damage it at chosen records).

Its `VM` shares the output helpers of tern_harness (`TernOutput`) but starts tern its own way: a
migration test needs options `tern_harness.Tern` does not take (-incoming, an environment,
inherited descriptors).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from qemu.qmp import ExecuteError, QMPClient

from tern_harness import PASS_LINE, START_LINE, TERN_BINARY, TernOutput, asynctest, free_tcp_port
from tern_harness import skip_reason as harness_skip_reason

MEMORY = "128M"
MEMORY_BYTES = 128 << 20
APPEND = "wss=32M rate=16M"
#: A speed that leaves no limit, and one slow enough to keep a migration active for many seconds.
UNLIMITED = 100_000_000_000
SLOW = 1 << 20

STEP = 5.0
BOOT_TIMEOUT = 15.0
MIGRATION_TIMEOUT = 30.0


def skip_reason() -> Optional[str]:
    return harness_skip_reason("MIGRATION")


class VM(TernOutput):
    """One tern process with the built-in guest, a serial log and a unix QMP socket."""

    def __init__(self, label: str, *, smp: Optional[int] = None, append: str = APPEND,
                 incoming: Optional[str] = None, paused: bool = False, env: Optional[dict] = None,
                 pass_fds: Iterable[int] = (), extra: Iterable[str] = (), memory: str = MEMORY):
        self.label = label
        # Short paths under /tmp: a unix socket path must stay under 108 bytes.
        self.workdir = Path(tempfile.mkdtemp(prefix=f"tern-mig-{label}-", dir="/tmp"))
        self.sock = str(self.workdir / "qmp.sock")
        self.log = str(self.workdir / "serial.log")
        self.stderr_path = str(self.workdir / "stderr")
        #: Set when the test makes this process exit on purpose (killed, or a load that must fail).
        self.expect_exit = False
        args = [TERN_BINARY, "run", "-m", memory, "-append", append, "-serial", f"file:{self.log}",
                "-qmp", f"unix:{self.sock},server=on,wait=off"]
        if smp is not None:
            args += ["-smp", str(smp)]
        if incoming is not None:
            args += ["-incoming", incoming]
        if paused:
            args += ["-S"]
        args += list(extra)
        self.args = args
        environment = dict(os.environ)
        environment.pop("TERN_TEST_DROP_DIRTY_PAGE", None)
        environment.update(env or {})
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                         env=environment, pass_fds=tuple(pass_fds), start_new_session=True)
        self.pid = self.proc.pid

    # ----- output ---------------------------------------------------------------------------

    def diagnostics(self) -> str:
        rc = self.proc.poll()
        state = "running" if rc is None else f"exited with status {rc}"
        return (f"\n--- {self.label} (pid {self.pid}, {state}): {' '.join(self.args)}"
                f"\n--- serial log (last 1200 chars):\n{self.log_text()[-1200:]}"
                f"\n--- stderr (last 2000 chars):\n{self.stderr_text()[-2000:]}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    # ----- waiting (async, so a qemu.qmp client's reader keeps running meanwhile) -------------

    async def until(self, condition: Callable[[], bool], what: str, timeout: float = STEP,
                    allow_exit: bool = False) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if not allow_exit and self.proc.poll() is not None:
                raise AssertionError(f"{self.label} exited while waiting for {what}" + self.diagnostics())
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}" + self.diagnostics())
            await asyncio.sleep(0.02)

    async def wait_qmp_socket(self) -> None:
        await self.until(lambda: os.path.exists(self.sock), f"{self.label}'s QMP socket")

    async def wait_passes(self, count: int, after: int = 0, timeout: float = BOOT_TIMEOUT) -> None:
        await self.until(lambda: len(self.passes()) >= after + count,
                         f"{count} pass line(s) from {self.label}'s guest after the first {after}", timeout)

    async def wait_exit(self, timeout: float = 15.0) -> int:
        self.expect_exit = True
        await self.until(lambda: self.proc.poll() is not None, f"{self.label} to exit", timeout, allow_exit=True)
        return self.proc.returncode

    def assert_healthy(self) -> None:
        log = self.log_text()
        assert "CORRUPT" not in log and not any(not ok for _, ok in self.passes()), \
            f"the guest's self-check failed on {self.label}" + self.diagnostics()

    async def assert_guest_continues(self, after_pass: int, lines: int = 3) -> None:
        """This destination's guest is the migrated one (no fresh boot, pass numbers carry on
        from the source's `after_pass`) and prints `lines` pass lines that say ok."""
        await self.wait_passes(lines, timeout=lines + 10)
        log = self.log_text()
        assert not START_LINE.search(log), f"{self.label}'s guest booted afresh instead of resuming" + self.diagnostics()
        first = self.passes()[0][0]
        assert first > after_pass, (f"{self.label}'s first pass line is {first}, but the source had printed "
                                    f"{after_pass} already" + self.diagnostics())
        self.assert_healthy()

    # ----- teardown -------------------------------------------------------------------------

    def kill(self) -> None:
        self.expect_exit = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)

    def force_kill(self) -> None:
        """SIGKILL the whole process group: an exec: transport's command dies with tern."""
        os.killpg(self.pid, signal.SIGKILL)

    def stop(self) -> Optional[int]:
        """SIGTERM, then SIGKILL. Returns the exit status, or None if it would not die."""
        return self.terminate()

    def remove(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


# ----- qemu.qmp ------------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def session(vm: VM, name: str = "tern-migration-test"):
    """A negotiated qemu.qmp client for `vm`, disconnected afterwards whatever happened."""
    await vm.wait_qmp_socket()
    qmp = QMPClient(name)
    deadline = time.monotonic() + STEP
    while True:
        try:
            await asyncio.wait_for(qmp.connect(vm.sock), STEP)
            break
        except Exception:  # noqa: BLE001 - the socket may exist before tern listens on it
            if time.monotonic() > deadline or not vm.alive():
                raise
            await asyncio.sleep(0.05)
    try:
        yield qmp
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(qmp.disconnect(), STEP)


async def execute(qmp: QMPClient, command: str, arguments: Optional[dict] = None, timeout: float = STEP) -> Any:
    return await asyncio.wait_for(qmp.execute(command, arguments), timeout)


async def execute_error(qmp: QMPClient, command: str, arguments: Optional[dict] = None,
                        error_class: str = "GenericError", desc: Optional[str] = None) -> str:
    """Runs a command that must fail; returns the error's desc."""
    try:
        result = await execute(qmp, command, arguments)
    except ExecuteError as error:
        got = error.error.error.desc
        assert error.error_class == error_class, f"{command} {arguments}: expected {error_class}, got {error.received}"
        if desc is not None:
            assert got == desc, f"{command} {arguments}: expected desc {desc!r}, got {got!r}"
        return got
    raise AssertionError(f"{command} {arguments}: expected a {error_class} error, got return {result!r}")


async def status(qmp: QMPClient) -> str:
    return (await execute(qmp, "query-status"))["status"]


async def wait_migration(qmp: QMPClient, vm: VM, wanted: Iterable[str] = ("completed",),
                         timeout: float = MIGRATION_TIMEOUT,
                         final: Iterable[str] = ("completed", "failed", "cancelled")) -> dict:
    """Polls query-migrate until its status is one of `wanted`; fails at once on another status
    in `final`, or after `timeout`."""
    wanted, final = set(wanted), set(final)
    deadline = time.monotonic() + timeout
    info: dict = {}
    while True:
        info = await execute(qmp, "query-migrate")
        current = info.get("status")
        if current in wanted:
            return info
        if current in final:
            raise AssertionError(f"{vm.label}: migration ended {current}, wanted {sorted(wanted)}: {info}"
                                 + vm.diagnostics())
        if time.monotonic() > deadline:
            raise AssertionError(f"{vm.label}: migration still {current} after {timeout:.0f} s: {info}" + vm.diagnostics())
        await asyncio.sleep(0.05)


async def wait_status(qmp: QMPClient, vm: VM, wanted: str, timeout: float = STEP) -> None:
    deadline = time.monotonic() + timeout
    while True:
        current = await status(qmp)
        if current == wanted:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{vm.label}: query-status is {current!r}, wanted {wanted!r} within "
                                 f"{timeout:.0f} s" + vm.diagnostics())
        await asyncio.sleep(0.05)


# ----- the stream ----------------------------------------------------------------------------

MAGIC = b"TERNMIGR"
HEADER = 12  # magic, u32 version
RAM_LAYOUT, RAM_PAGES, RAM_ZERO, PASS_END, DEVICE, SOURCE_STOPPED, END = 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x7E
PAGE = 4096


class Record:
    """One record of a tern migration stream: its type, where it starts, and its fields'
    offsets (absolute positions in the stream)."""

    def __init__(self, kind: int, start: int, end: int, fields: dict):
        self.kind, self.start, self.end, self.fields = kind, start, end, fields

    def __repr__(self) -> str:
        return f"Record(0x{self.kind:02x} @{self.start}..{self.end} {self.fields})"


def parse_stream(data: bytes) -> list[Record]:
    """Walks a complete stream (format v1, see Sources/Migration/MigrationStreamFormat.swift)."""
    assert data[:8] == MAGIC, f"not a tern stream: {data[:16]!r}"
    records = []
    position = HEADER
    while position < len(data):
        kind = data[position]
        body = position + 1
        if kind == RAM_LAYOUT:
            fields, end = {"size": body, "page_size": body + 8}, body + 12
        elif kind in (RAM_PAGES, RAM_ZERO):
            count = struct.unpack_from("<I", data, body + 8)[0]
            fields = {"offset": body, "count": body + 8, "data": body + 12}
            end = body + 12 + (count * PAGE if kind == RAM_PAGES else 0)
        elif kind == PASS_END:
            fields, end = {"pass": body}, body + 4
        elif kind == DEVICE:
            name_length = struct.unpack_from("<H", data, body)[0]
            name = body + 2
            version = name + name_length
            length = struct.unpack_from("<I", data, version + 4)[0]
            fields = {"name_length": body, "name": name, "version": version, "length": version + 4,
                      "payload": version + 8, "name_text": data[name:version].decode("utf-8", "replace"),
                      "payload_length": length}
            end = version + 8 + length
        elif kind == SOURCE_STOPPED:
            fields, end = {"nanoseconds": body}, body + 8
        elif kind == END:
            fields, end = {"pages": body}, body + 8
        else:
            raise AssertionError(f"unknown record type 0x{kind:02x} at {position}")
        records.append(Record(kind, position, end, fields))
        position = end
        if kind == END:
            break
    return records
