"""Helpers for tests/test_migration.py and tests/test_capabilities.py: tern processes set up as
migration sources and destinations, qemu.qmp sessions with bounded waits, and tern's migration
stream in Python:

- `parse_stream` reads a saved stream of either version into records with the offsets of
  their header, body, CRC and every field (so a test can damage a chosen field), decoding the
  version 2 configuration record, the RAM records in each page encoding (zero, raw, xbzrle,
  zlib, zstd) and the device-state records;
- `crc32c`, `fix_crc`, `encode_record` and `insert_record` rewrite version 2 records the way a
  writer would have;
- `ram_image` rebuilds the guest RAM a stream carries (XBZRLE deltas and compressed pages
  decoded in Python), to compare with x-query-memory-digest;
- `V1Writer` and `to_version1` write version 1 streams (what older terns saved), so a test can
  prove those still restore.

Its `VM` shares the output helpers of tern_harness (`TernOutput`) but starts tern its own way: a
migration test needs options `tern_harness.Tern` does not take (-incoming, an environment,
inherited descriptors).
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from qemu.qmp import ExecuteError, QMPClient

from tern_harness import PASS_LINE, START_LINE, TERN_BINARY, TernOutput, asynctest, free_tcp_port, proc_kib
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
                 pass_fds: Iterable[int] = (), extra: Iterable[str] = (), memory: str = MEMORY,
                 wrapper: Iterable[str] = ()):
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
        # A command that execs tern (`ip netns exec NS`): the pid stays tern's.
        args = list(wrapper) + args
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

    def rss_kib(self) -> int:
        return proc_kib(self.pid, "VmRSS")

    async def vcpu_busy_fraction(self, seconds: float = 2.0) -> float:
        """The share of `seconds` of wall time the vCPU threads (named vcpuN) spent on a CPU,
        averaged over them: near 1 for the built-in guest, which spins while it paces itself."""
        def ticks() -> tuple[int, int]:
            total, count = 0, 0
            for task in glob.glob(f"/proc/{self.pid}/task/*"):
                with contextlib.suppress(OSError):
                    if open(f"{task}/comm").read().strip().startswith("vcpu"):
                        fields = open(f"{task}/stat").read().rsplit(")", 1)[1].split()
                        total += int(fields[11]) + int(fields[12])  # utime + stime
                        count += 1
            return total, count
        before, count = ticks()
        assert count > 0, f"no vcpuN thread in /proc/{self.pid}/task" + self.diagnostics()
        started = time.monotonic()
        await asyncio.sleep(seconds)
        after, _ = ticks()
        return (after - before) / os.sysconf("SC_CLK_TCK") / (time.monotonic() - started) / count

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
    in `final`, or after `timeout`. A destination's guest starts before its status says completed
    (QEMU's order), so a test that saw it running still waits here rather than reading once."""
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
#
# Version 2 (what tern writes; Sources/Migration/MigrationStreamFormat.swift, MigrationChannel.swift,
# StreamConfiguration.swift, PageEncoder.swift, XBZRLEPageEncoder.swift, CompressedPageEncoder.swift,
# DeviceStateSection.swift):
#
#   header   "TERNMIGR"  u32 version (2)
#   records  u8 type, u8 flags, u16 section, u32 body length, body, [u32 CRC32C]
#            flags bit 0: required; bit 1: a CRC32C of the 8 header bytes and the body follows
#
# Version 1 (read only, StreamV1Loader.swift): header with version 1, then records that are a
# type byte and a body whose layout the type decides; see V1Writer and parse_stream_v1.

MAGIC = b"TERNMIGR"
HEADER = 12  # magic, u32 version
PAGE = 4096

# Version 2 record types.
CONFIGURATION, SECTION_DATA, PASS_END, PING, SOURCE_STOPPED, END = 0x01, 0x02, 0x03, 0x04, 0x05, 0x7E
RECORD_NAMES = {CONFIGURATION: "CONFIGURATION", SECTION_DATA: "SECTION_DATA", PASS_END: "PASS_END", PING: "PING",
                SOURCE_STOPPED: "SOURCE_STOPPED", END: "END"}
REQUIRED, CHECKSUM = 0x01, 0x02
RECORD_HEADER = 8
NO_SECTION = 0xFFFF
#: The largest record body a tern reader accepts (StreamRecordFraming.maximumBodyLength).
MAXIMUM_BODY = 4 << 20

# Page encodings: the first byte of a RAM section record's body.
ENC_ZERO, ENC_RAW, ENC_XBZRLE, ENC_ZLIB, ENC_ZSTD = 0x01, 0x02, 0x03, 0x04, 0x05
ENCODING_NAMES = {ENC_ZERO: "zero", ENC_RAW: "raw", ENC_XBZRLE: "xbzrle", ENC_ZLIB: "zlib", ENC_ZSTD: "zstd"}

# Version 1 record types.
V1_RAM_LAYOUT, V1_RAM_PAGES, V1_RAM_ZERO, V1_PASS_END, V1_DEVICE, V1_SOURCE_STOPPED, V1_END = \
    0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x7E


# ----- CRC32C (Castagnoli), as tern's cpage_crc32c -------------------------------------------

class LinkProxy:
    """A TCP proxy on 127.0.0.1 between a migration source and its destination: every
    connection accepted is forwarded, both ways, to `target_port`. Connections are numbered in
    the order they arrive (0: the main stream, then multifd channels...).

    - `cut()` breaks the link: both sockets of every connection are shut down and closed at
      once, and nothing more is accepted.
    - `cut_after=(n, bytes)`: once connection n has carried `bytes` towards the destination,
      that connection alone is cut; `connection_cut` is set.
    - `hold_first=(n, bytes)`: the first `bytes` connection n sends towards the destination are
      held and delivered in one write, so the destination reads them together (a channel's
      header and its first records in one read).
    - `capture=bytes`: the first `bytes` each connection sends towards the destination are kept
      in `captured[n]` (to check what crosses the wire, e.g. that it is encrypted)."""

    def __init__(self, target_port: int, *, cut_after: Optional[tuple[int, int]] = None,
                 hold_first: Optional[tuple[int, int]] = None, capture: int = 0):
        self.target_port = target_port
        self.capture = capture
        self.captured: dict[int, bytearray] = {}
        self.cut_after, self.hold_first = cut_after, hold_first
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.forwarded = {"to-destination": 0, "to-source": 0}
        self.connections = 0
        self.is_cut = False
        self.connection_cut = threading.Event()
        self.held_delivered = threading.Event()
        accept = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        accept.start()
        self.threads.append(accept)

    @property
    def uri(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=STEP)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self.lock:
                if self.is_cut:
                    client.close()
                    upstream.close()
                    return
                number = self.connections
                self.connections += 1
                self.sockets += [client, upstream]
                for source, sink, direction in ((client, upstream, "to-destination"), (upstream, client, "to-source")):
                    pump = threading.Thread(target=self._pump, args=(source, sink, direction, number),
                                            name=f"proxy-{direction}-{number}", daemon=True)
                    self.threads.append(pump)
                    pump.start()

    def _pump(self, source: socket.socket, sink: socket.socket, direction: str, number: int) -> None:
        forward = direction == "to-destination"
        carried = 0
        held = b""
        hold = self.hold_first[1] if forward and self.hold_first and self.hold_first[0] == number else 0
        while True:
            try:
                data = source.recv(1 << 20)
            except OSError:
                break
            if not data:
                break
            carried += len(data)
            if forward and self.capture:
                with self.lock:
                    kept = self.captured.setdefault(number, bytearray())
                    kept += data[:max(0, self.capture - len(kept))]
            if forward and self.cut_after and self.cut_after[0] == number and carried >= self.cut_after[1]:
                self.connection_cut.set()
                for end in (source, sink):
                    with contextlib.suppress(OSError):
                        end.shutdown(socket.SHUT_RDWR)
                    end.close()
                return
            if hold:
                held += data
                if len(held) < hold:
                    continue
                data, held, hold = held, b"", 0
                self.held_delivered.set()
            try:
                sink.sendall(data)
            except OSError:
                break
            with self.lock:
                self.forwarded[direction] += len(data)
        # One side ended (a peer closed, or cut()): pass the end on, with anything still held.
        with contextlib.suppress(OSError):
            if held:
                sink.sendall(held)
            sink.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        with self.lock:
            self.is_cut = True
            sockets = list(self.sockets)
        for sock in [self.listener] + sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self.threads:
            if thread is not threading.current_thread():
                thread.join(timeout=2)
        for sock in [self.listener] + sockets:
            with contextlib.suppress(OSError):
                sock.close()


def _crc32c_table() -> list[int]:
    table = []
    for index in range(256):
        value = index
        for _ in range(8):
            value = (value >> 1) ^ 0x82F63B78 if value & 1 else value >> 1
        table.append(value)
    return table


_CRC32C_TABLE = _crc32c_table()

try:  # the `crc32c` package from PyPI, if installed: the same function, much faster
    import crc32c as _crc32c_module  # type: ignore
except ImportError:  # pragma: no cover - the table below is the fallback
    _crc32c_module = None


def crc32c(data, crc: int = 0) -> int:
    """CRC32C of `data`, continuing from `crc` (0 to start), like zlib.crc32's convention:
    crc32c(b"123456789") == 0xE3069283."""
    if _crc32c_module is not None:
        return _crc32c_module.crc32c(bytes(data), crc)
    table = _CRC32C_TABLE
    crc ^= 0xFFFFFFFF
    for byte in bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


assert crc32c(b"123456789") == 0xE3069283


# ----- version 2: reading ----------------------------------------------------------------------

class Record:
    """One record of a tern migration stream: its type, where it starts and ends, and its
    fields' offsets (absolute positions in the stream, so a test can damage them).

    Version 2 records also have `flags`, `section` (the id) and `section_name`, `body` (where
    the body starts), `length` (the body's), `crc_at` (where the CRC32C is, or None), and
    `values` (the decoded fields: page encoding, page offsets, device name, ...)."""

    def __init__(self, kind: int, start: int, end: int, fields: dict, *, flags: int = 0, section: int = NO_SECTION,
                 body: Optional[int] = None, length: int = 0, crc_at: Optional[int] = None,
                 values: Optional[dict] = None, section_name: Optional[str] = None):
        self.kind, self.start, self.end, self.fields = kind, start, end, fields
        self.flags, self.section, self.body, self.length, self.crc_at = flags, section, body, length, crc_at
        self.values = values or {}
        self.section_name = section_name

    @property
    def required(self) -> bool:
        return bool(self.flags & REQUIRED)

    @property
    def encoding(self) -> Optional[int]:
        """A RAM record's page encoding."""
        return self.values.get("encoding")

    def body_bytes(self, data) -> bytes:
        return bytes(data[self.body:self.body + self.length])

    def __repr__(self) -> str:
        name = RECORD_NAMES.get(self.kind, f"0x{self.kind:02x}")
        extra = f" {self.section_name}" if self.section_name else ""
        values = {k: v for k, v in self.values.items() if k not in ("entries",)}
        return f"Record({name}{extra} @{self.start}..{self.end} {values})"


class Stream(list):
    """The records of a stream (a list), with the stream's `version` and, for version 2, its
    decoded `configuration`."""

    def __init__(self, records: Iterable[Record], version: int, configuration: Optional[dict] = None):
        super().__init__(records)
        self.version = version
        self.configuration = configuration or {}

    def of(self, kind: int, section: Optional[str] = None, encoding: Optional[int] = None) -> list[Record]:
        return [r for r in self if r.kind == kind and (section is None or r.section_name == section)
                and (encoding is None or r.encoding == encoding)]

    @property
    def ram(self) -> list[Record]:
        return self.of(SECTION_DATA, "ram")

    @property
    def devices(self) -> list[Record]:
        return self.of(SECTION_DATA, "devices")


def stream_version(data) -> int:
    assert bytes(data[:8]) == MAGIC, f"not a tern stream: {bytes(data[:16])!r}"
    return struct.unpack_from("<I", data, 8)[0]


def parse_stream(data, *, verify_checksums: bool = False) -> Stream:
    """Walks a complete stream of either version. With verify_checksums, every version 2 record
    that carries a CRC32C must match it (slow in pure Python: a few seconds per 32 MiB)."""
    version = stream_version(data)
    if version == 1:
        return parse_stream_v1(data)
    assert version == 2, f"unknown stream version {version}"
    return parse_stream_v2(data, verify_checksums=verify_checksums)


class _Body:
    """A little-endian cursor over one record body, with absolute offsets."""

    def __init__(self, data, start: int, length: int, what: str):
        self.data, self.position, self.stop, self.what = data, start, start + length, what

    def take(self, form: str) -> tuple[int, int]:
        """(absolute offset, value) of the next field."""
        size = struct.calcsize(form)
        assert self.position + size <= self.stop, f"{self.what}: ends inside a field"
        at = self.position
        self.position += size
        return at, struct.unpack_from(form, self.data, at)[0]

    def bytes(self, count: int) -> tuple[int, bytes]:
        assert count >= 0 and self.position + count <= self.stop, f"{self.what}: ends inside {count} bytes"
        at = self.position
        self.position += count
        return at, bytes(self.data[at:at + count])

    def string(self) -> tuple[int, int, str]:
        """(offset of the length byte, offset of the text, text)."""
        length_at, length = self.take("<B")
        at, raw = self.bytes(length)
        return length_at, at, raw.decode("utf-8", "replace")

    def finish(self) -> None:
        assert self.position == self.stop, f"{self.what}: {self.stop - self.position} bytes left over"


def decode_configuration(data, body: int, length: int) -> tuple[dict, dict]:
    """(fields, values) of a CONFIGURATION record body (StreamConfiguration.encode)."""
    cursor = _Body(data, body, length, "CONFIGURATION")
    fields, values = {}, {}
    for name, form in (("ram_size", "<Q"), ("page_size", "<I"), ("cpu_count", "<I"), ("flags", "<B")):
        fields[name], values[name] = cursor.take(form)
    values["return_path"] = bool(values["flags"] & 1)
    for what in ("devices", "capabilities"):
        fields[f"{what}_count"], count = cursor.take("<H")
        names = []
        for _ in range(count):
            names.append(cursor.string()[2])
        values[what] = names
    fields["encoding_count"], count = cursor.take("<H")
    fields["encodings"] = cursor.position
    values["encodings"] = [cursor.take("<B")[1] for _ in range(count)]
    fields["section_count"], count = cursor.take("<H")
    sections = {}
    for _ in range(count):
        id_at, section_id = cursor.take("<H")
        _, name_at, name = cursor.string()
        version_at, section_version = cursor.take("<I")
        sections[section_id] = (name, section_version)
        fields[f"section:{name}:id"], fields[f"section:{name}:name"] = id_at, name_at
        fields[f"section:{name}:version"] = version_at
    values["sections"] = sections
    cursor.finish()
    return fields, values


def decode_ram_record(data, body: int, length: int) -> tuple[dict, dict]:
    """(fields, values) of a RAM section record. values["entries"] lists every page it carries
    as (page offset in RAM, absolute offset of its data or None for zero, data length)."""
    cursor = _Body(data, body, length, "RAM record")
    fields, values = {}, {}
    fields["encoding"], encoding = cursor.take("<B")
    values["encoding"] = encoding
    entries = []
    if encoding in (ENC_ZERO, ENC_RAW):
        fields["offset"], offset = cursor.take("<Q")
        fields["count"], count = cursor.take("<I")
        values["offset"], values["count"] = offset, count
        if encoding == ENC_RAW:
            fields["data"] = cursor.position
            cursor.bytes(count * PAGE)
            entries = [(offset + i * PAGE, fields["data"] + i * PAGE, PAGE) for i in range(count)]
        else:
            entries = [(offset + i * PAGE, None, 0) for i in range(count)]
    elif encoding in (ENC_XBZRLE, ENC_ZLIB, ENC_ZSTD):
        length_form = "<H" if encoding == ENC_XBZRLE else "<I"
        fields["count"], count = cursor.take("<H")
        values["count"] = count
        fields["index"] = cursor.position
        index = []
        for _ in range(count):
            offset_at, offset = cursor.take("<Q")
            length_at, entry_length = cursor.take(length_form)
            index.append((offset, offset_at, length_at, entry_length))
        fields["data"] = cursor.position
        for offset, _, _, entry_length in index:
            at, _ = cursor.bytes(entry_length)
            entries.append((offset, at, entry_length))
        values["index"] = [(offset_at, length_at) for _, offset_at, length_at, _ in index]
        values["offset"] = index[0][0] if index else None
    else:
        raise AssertionError(f"RAM record in unknown page encoding 0x{encoding:02x}")
    cursor.finish()
    values["entries"] = entries
    return fields, values


def decode_device_record(data, body: int, length: int) -> tuple[dict, dict]:
    """(fields, values) of a device-state record (DeviceStateSection.swift)."""
    cursor = _Body(data, body, length, "device record")
    name_length, name, text = cursor.string()
    version, section_version = cursor.take("<I")
    length_at, payload_length = cursor.take("<I")
    payload, _ = cursor.bytes(payload_length)
    cursor.finish()
    fields = {"name_length": name_length, "name": name, "version": version, "length": length_at, "payload": payload}
    return fields, {"name_text": text, "version": section_version, "payload_length": payload_length,
                    "name_text_length": version - name}


def parse_stream_v2(data, *, verify_checksums: bool = False) -> Stream:
    assert stream_version(data) == 2
    records = []
    configuration: dict = {}
    position = HEADER
    while position < len(data):
        assert position + RECORD_HEADER <= len(data), f"a record header is cut at {position}"
        kind, flags, section, length = struct.unpack_from("<BBHI", data, position)
        body = position + RECORD_HEADER
        crc_at = body + length if flags & CHECKSUM else None
        end = body + length + (4 if crc_at is not None else 0)
        assert end <= len(data), f"record 0x{kind:02x} at {position} runs past the end of the stream"
        if verify_checksums and crc_at is not None:
            stored = struct.unpack_from("<I", data, crc_at)[0]
            computed = crc32c(data[position:crc_at])
            assert stored == computed, f"record 0x{kind:02x} at {position}: CRC 0x{stored:08x}, computed 0x{computed:08x}"
        fields = {"type": position, "flags": position + 1, "section": position + 2, "length": position + 4}
        values: dict = {}
        section_name = None
        if kind == CONFIGURATION:
            extra, values = decode_configuration(data, body, length)
            fields.update(extra)
            configuration = values
        elif kind == SECTION_DATA:
            section_name = configuration.get("sections", {}).get(section, (None,))[0]
            if section_name == "ram":
                extra, values = decode_ram_record(data, body, length)
            elif section_name == "devices":
                extra, values = decode_device_record(data, body, length)
            else:
                raise AssertionError(f"a record for section {section}, which the configuration does not list")
            fields.update(extra)
        elif kind == PASS_END:
            fields["pass"] = body
            values["pass"] = struct.unpack_from("<I", data, body)[0]
        elif kind == PING:
            fields["value"] = body
            values["value"] = struct.unpack_from("<I", data, body)[0]
        elif kind == SOURCE_STOPPED:
            fields["nanoseconds"] = body
            values["nanoseconds"] = struct.unpack_from("<Q", data, body)[0]
        elif kind == END:
            fields["count"] = body
            values["count"] = struct.unpack_from("<Q", data, body)[0]
        records.append(Record(kind, position, end, fields, flags=flags, section=section, body=body, length=length,
                              crc_at=crc_at, values=values, section_name=section_name))
        position = end
        if kind == END:
            break
    return Stream(records, 2, configuration)


# ----- version 2: writing and damaging ---------------------------------------------------------

def encode_record(kind: int, body: bytes, *, flags: int = REQUIRED | CHECKSUM, section: int = NO_SECTION,
                  length: Optional[int] = None) -> bytes:
    """One version 2 record; its CRC32C (with CHECKSUM in flags) covers the header and body."""
    header = struct.pack("<BBHI", kind, flags, section, len(body) if length is None else length)
    record = header + bytes(body)
    if flags & CHECKSUM:
        record += struct.pack("<I", crc32c(record))
    return record


def fix_crc(data: bytearray, record: Record) -> None:
    """Recomputes `record`'s CRC32C over its (possibly damaged) header and body, as a writer
    that produced those bytes would have, so the loader's own checks see the damage."""
    assert record.crc_at is not None, f"{record} carries no CRC"
    struct.pack_into("<I", data, record.crc_at, crc32c(data[record.start:record.crc_at]))


def insert_record(data: bytes, before: Record, raw_record: bytes, *, counted: bool = True) -> bytes:
    """`raw_record` inserted in front of `before`; with `counted`, the END record's count is
    raised by one (and its CRC fixed), as the newer writer that wrote it would have."""
    result = bytearray(data[:before.start] + raw_record + data[before.start:])
    if counted:
        end = parse_stream_v2(result)[-1]
        assert end.kind == END
        struct.pack_into("<Q", result, end.fields["count"], end.values["count"] + 1)
        if end.crc_at is not None:
            fix_crc(result, end)
    return bytes(result)


# ----- the guest RAM a stream carries --------------------------------------------------------

def xbzrle_decode(delta: bytes, page: bytearray) -> None:
    """Applies a QEMU-style XBZRLE delta (ULEB128 unchanged run, ULEB128 changed run, changed
    bytes; repeated) to `page` in place."""
    def uleb(at: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = delta[at]
            at += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value, at
    position = at = 0
    while at < len(delta):
        unchanged, at = uleb(at)
        changed, at = uleb(at)
        assert changed > 0, "an XBZRLE pair with an empty changed run"
        position += unchanged
        assert position + changed <= len(page) and at + changed <= len(delta), "an XBZRLE run past the page"
        page[position:position + changed] = delta[at:at + changed]
        position += changed
        at += changed


class ZstdUnavailable(Exception):
    """Neither the `zstandard` Python package nor the `zstd` command is here to decode zstd pages."""


def zstd_decompress_pages(blobs: list[bytes]) -> list[bytes]:
    """Each blob is one zstd frame holding one page (CompressedPageEncoder)."""
    if not blobs:
        return []
    try:
        import zstandard  # type: ignore
    except ImportError:
        zstandard = None
    if zstandard is not None:
        decompressor = zstandard.ZstdDecompressor()
        return [decompressor.decompress(blob, max_output_size=2 * PAGE) for blob in blobs]
    command = shutil.which("zstd")
    if command is None:
        raise ZstdUnavailable("decoding zstd pages needs the `zstandard` Python package or the `zstd` command")
    # Concatenated frames decode to the concatenated pages.
    result = subprocess.run([command, "-d", "-c", "-q"], input=b"".join(blobs), capture_output=True, timeout=60)
    assert result.returncode == 0, f"zstd -d failed: {result.stderr[-500:]!r}"
    out = result.stdout
    assert len(out) == PAGE * len(blobs), f"{len(blobs)} zstd frames decode to {len(out)} bytes, not whole pages"
    return [out[i * PAGE:(i + 1) * PAGE] for i in range(len(blobs))]


def ram_image(data, stream: Optional[Stream] = None) -> bytearray:
    """The guest RAM a complete stream (either version) leaves on a fresh destination: every RAM
    record applied in order, in whatever page encoding. Its SHA-256 is comparable with
    x-query-memory-digest. Raises ZstdUnavailable for zstd pages without a decoder."""
    import zlib
    stream = stream if stream is not None else parse_stream(data)
    if stream.version == 1:
        size = struct.unpack_from("<Q", data, stream[0].fields["size"])[0]
        memory = bytearray(size)
        for record in stream:
            if record.kind in (V1_RAM_PAGES, V1_RAM_ZERO):
                offset = struct.unpack_from("<Q", data, record.fields["offset"])[0]
                count = struct.unpack_from("<I", data, record.fields["count"])[0]
                if record.kind == V1_RAM_PAGES:
                    memory[offset:offset + count * PAGE] = data[record.fields["data"]:record.fields["data"] + count * PAGE]
                else:
                    memory[offset:offset + count * PAGE] = bytes(count * PAGE)
        return memory
    memory = bytearray(stream.configuration["ram_size"])
    for record in stream.ram:
        encoding = record.encoding
        if encoding in (ENC_ZERO, ENC_RAW):
            offset, count = record.values["offset"], record.values["count"]
            if encoding == ENC_RAW:
                start = record.fields["data"]
                memory[offset:offset + count * PAGE] = data[start:start + count * PAGE]
            else:
                memory[offset:offset + count * PAGE] = bytes(count * PAGE)
            continue
        entries = record.values["entries"]
        blobs = [bytes(data[at:at + length]) for _, at, length in entries]
        if encoding == ENC_ZSTD:
            pages = zstd_decompress_pages(blobs)
        elif encoding == ENC_ZLIB:
            pages = [zlib.decompress(blob) for blob in blobs]
        else:
            pages = []
            for (offset, _, _), blob in zip(entries, blobs):
                page = memory[offset:offset + PAGE]
                xbzrle_decode(blob, page)
                pages.append(page)
        for (offset, _, _), page in zip(entries, pages):
            assert len(page) == PAGE, f"a {ENCODING_NAMES[encoding]} page at 0x{offset:x} decodes to {len(page)} bytes"
            memory[offset:offset + PAGE] = page
    return memory


# ----- version 1 -----------------------------------------------------------------------------

def parse_stream_v1(data) -> Stream:
    """Walks a complete version 1 stream (StreamV1Loader.swift)."""
    assert stream_version(data) == 1
    records = []
    position = HEADER
    while position < len(data):
        kind = data[position]
        body = position + 1
        if kind == V1_RAM_LAYOUT:
            fields, end = {"size": body, "page_size": body + 8}, body + 12
        elif kind in (V1_RAM_PAGES, V1_RAM_ZERO):
            count = struct.unpack_from("<I", data, body + 8)[0]
            fields = {"offset": body, "count": body + 8, "data": body + 12}
            end = body + 12 + (count * PAGE if kind == V1_RAM_PAGES else 0)
        elif kind == V1_PASS_END:
            fields, end = {"pass": body}, body + 4
        elif kind == V1_DEVICE:
            name_length = struct.unpack_from("<H", data, body)[0]
            name = body + 2
            version = name + name_length
            length = struct.unpack_from("<I", data, version + 4)[0]
            fields = {"name_length": body, "name": name, "version": version, "length": version + 4,
                      "payload": version + 8, "name_text": bytes(data[name:version]).decode("utf-8", "replace"),
                      "payload_length": length}
            end = version + 8 + length
        elif kind == V1_SOURCE_STOPPED:
            fields, end = {"nanoseconds": body}, body + 8
        elif kind == V1_END:
            fields, end = {"pages": body}, body + 8
        else:
            raise AssertionError(f"unknown version 1 record type 0x{kind:02x} at {position}")
        records.append(Record(kind, position, end, fields))
        position = end
        if kind == V1_END:
            break
    return Stream(records, 1)


class V1Writer:
    """Writes a version 1 stream, as terns before stream version 2 did."""

    def __init__(self):
        self.out = bytearray(MAGIC + struct.pack("<I", 1))
        self.pages = 0

    def ram_layout(self, size: int, page_size: int = PAGE) -> None:
        self.out += struct.pack("<BQI", V1_RAM_LAYOUT, size, page_size)

    def ram_pages(self, offset: int, contents: bytes) -> None:
        assert len(contents) % PAGE == 0 and contents
        count = len(contents) // PAGE
        self.out += struct.pack("<BQI", V1_RAM_PAGES, offset, count) + contents
        self.pages += count

    def ram_zero(self, offset: int, count: int) -> None:
        self.out += struct.pack("<BQI", V1_RAM_ZERO, offset, count)
        self.pages += count

    def pass_end(self, number: int) -> None:
        self.out += struct.pack("<BI", V1_PASS_END, number)

    def device(self, name: str, version: int, payload: bytes) -> None:
        encoded = name.encode()
        self.out += struct.pack("<BH", V1_DEVICE, len(encoded)) + encoded + struct.pack("<II", version, len(payload))
        self.out += payload

    def source_stopped(self, nanoseconds: int) -> None:
        self.out += struct.pack("<BQ", V1_SOURCE_STOPPED, nanoseconds)

    def end(self) -> bytes:
        """Closes the stream (END carries the number of pages sent) and returns it."""
        self.out += struct.pack("<BQ", V1_END, self.pages)
        return bytes(self.out)


def to_version1(data) -> bytes:
    """The version 1 stream equivalent to a version 2 one that uses only the zero and raw page
    encodings (a plain save: no xbzrle, no compress): the same RAM records, pass ends, device
    sections and stop time, in the same order. PING records and unknown optional records have
    no version 1 form and are left out."""
    stream = parse_stream_v2(data)
    configuration = stream.configuration
    assert configuration["page_size"] == PAGE, configuration
    writer = V1Writer()
    writer.ram_layout(configuration["ram_size"], configuration["page_size"])
    for record in stream:
        if record.kind == SECTION_DATA and record.section_name == "ram":
            if record.encoding == ENC_RAW:
                start = record.fields["data"]
                writer.ram_pages(record.values["offset"], bytes(data[start:start + record.values["count"] * PAGE]))
            elif record.encoding == ENC_ZERO:
                writer.ram_zero(record.values["offset"], record.values["count"])
            else:
                raise AssertionError(f"version 1 has no form for {ENCODING_NAMES.get(record.encoding)} pages: {record}")
        elif record.kind == SECTION_DATA and record.section_name == "devices":
            payload = record.fields["payload"]
            writer.device(record.values["name_text"], record.values["version"],
                          bytes(data[payload:payload + record.values["payload_length"]]))
        elif record.kind == PASS_END:
            writer.pass_end(record.values["pass"])
        elif record.kind == SOURCE_STOPPED:
            writer.source_stopped(record.values["nanoseconds"])
    return writer.end()


# ----- the return path, and following a stream as it arrives (tests that play the destination) --
#
# ReturnPath.swift: each message is u16 type, u16 body length (at most 1024), the body, and a u32
# CRC32C of the four header bytes and the body; all little-endian.

RP_PONG, RP_LOADED, RP_FAILED, RP_REQ_PAGES, RP_LACKING, RP_RESUME_READY = 1, 2, 3, 4, 5, 6


def return_path_message(kind: int, body: bytes = b"", *, bad_checksum: bool = False) -> bytes:
    """One return-path message as a destination frames it; with `bad_checksum`, its CRC32C is
    off by one bit."""
    framed = struct.pack("<HH", kind, len(body)) + bytes(body)
    crc = crc32c(framed) ^ (1 if bad_checksum else 0)
    return framed + struct.pack("<I", crc)


def request_pages(offset: int, length: int, *, bad_checksum: bool = False) -> bytes:
    """A REQ_PAGES message: u64 RAM offset, u32 length in bytes."""
    return return_path_message(RP_REQ_PAGES, struct.pack("<QI", offset, length), bad_checksum=bad_checksum)


class StreamFollower:
    """Follows a version 2 stream as it arrives, in pieces of any size, record by record, without
    keeping page data: counts the records of each type (`counts`) and calls
    `on_record(type, body)` for the types in `keep` (the body without its CRC). `ended` once the
    END record is in; `error` says why it stopped following (not a version 2 tern stream, or a
    record longer than any tern writes)."""

    def __init__(self, on_record: Optional[Callable[[int, bytes], None]] = None, keep: Iterable[int] = (PING, END)):
        self.on_record = on_record
        self.keep = set(keep)
        self.counts: dict[int, int] = {}
        self.bytes = 0
        self.version: Optional[int] = None
        self.ended = False
        self.error: Optional[str] = None
        self._buffer = bytearray()
        self._need = HEADER  # bytes to gather in _buffer before the next step
        self._skip = 0  # bytes of a record nobody keeps, still to pass over
        self._kind: Optional[int] = None  # the kept record whose body is being gathered
        self._length = 0

    def feed(self, data) -> None:
        view = memoryview(data)
        self.bytes += len(view)
        while len(view) and not self.ended and self.error is None:
            if self._skip:
                taken = min(self._skip, len(view))
                self._skip -= taken
                view = view[taken:]
                continue
            taken = min(self._need - len(self._buffer), len(view))
            self._buffer += view[:taken]
            view = view[taken:]
            if len(self._buffer) == self._need:
                self._advance()

    def _advance(self) -> None:
        data = bytes(self._buffer)
        self._buffer.clear()
        if self.version is None:
            if data[:8] != MAGIC:
                self.error = f"not a tern stream: {data!r}"
                return
            self.version = struct.unpack_from("<I", data, 8)[0]
            if self.version != 2:
                self.error = f"stream version {self.version}, not 2"
            self._need = RECORD_HEADER
            return
        if self._kind is None:
            kind, flags, _, length = struct.unpack("<BBHI", data)
            if length > MAXIMUM_BODY:
                self.error = f"record 0x{kind:02x} claims {length} bytes"
                return
            self.counts[kind] = self.counts.get(kind, 0) + 1
            rest = length + (4 if flags & CHECKSUM else 0)
            if kind in self.keep:
                self._kind, self._length, self._need = kind, length, rest
                if rest == 0:
                    self._finish(b"")
            else:
                self._skip, self._need = rest, RECORD_HEADER
            return
        self._finish(data[:self._length])

    def _finish(self, body: bytes) -> None:
        kind = self._kind
        self._kind, self._need = None, RECORD_HEADER
        if kind == END:
            self.ended = True
        if self.on_record is not None:
            self.on_record(kind, body)


class EventLog:
    """The events a qemu.qmp listener has heard so far, in order."""

    def __init__(self, listener):
        self.listener = listener
        self.events: list[dict] = []

    def take(self) -> list[dict]:
        self.events += [dict(event) for event in self.listener.clear()]
        return self.events

    def statuses(self) -> list[str]:
        return [e["data"]["status"] for e in self.take() if e["event"] == "MIGRATION"]

    async def wait_for(self, wanted: str, timeout: float = STEP) -> None:
        deadline = time.monotonic() + timeout
        while wanted not in self.statuses():
            if time.monotonic() > deadline:
                raise AssertionError(f"no MIGRATION {wanted} event within {timeout:.0f} s; saw {self.statuses()}")
            await asyncio.sleep(0.02)

    def passes_before(self, wanted: str) -> list[int]:
        """The MIGRATION_PASS numbers that came before the first MIGRATION `wanted`."""
        passes = []
        for event in self.take():
            if event["event"] == "MIGRATION" and event["data"]["status"] == wanted:
                return passes
            if event["event"] == "MIGRATION_PASS":
                passes.append(event["data"]["pass"])
        raise AssertionError(f"no MIGRATION {wanted} event: {self.events}")
