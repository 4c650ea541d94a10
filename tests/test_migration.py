"""Live migration between tern processes, driven over QMP with qemu.qmp.

Every test boots small guests (-m 128M, "wss=32M rate=16M": the guest keeps dirtying memory
and checking it) and checks the outcome from both ends: the source's query-migrate and run
state, the destination's run state, and the destination guest's own self-check (three more
pass lines that say ok, no CORRUPT line, pass numbers carried on from the source, so the guest
was migrated and not booted afresh).

Covered: the tcp (also -smp 2 and -incoming defer), unix, exec and fd transports; a memory
digest comparison with the destination held paused (-S), and the TERN_TEST_DROP_DIRTY_PAGE hook
that proves that comparison can fail; cancel; a destination that dies mid-stream; the saved
stream (version 2: checksums, configuration, the RAM it carries), the same stream rewritten as
version 1 (still restores), truncated and corrupted streams (each damaged field with its CRC
recomputed, so the loader's own checks meet it, and damage only the CRC catches), unknown
optional and required records; ping-pong A -> B -> A'; the QMP error cases; MIGRATION events.
The capabilities (xbzrle, compress, auto-converge) are in test_capabilities.py.

Skipped, loudly, without /dev/kvm or the tern binary (TERN_BINARY, default .build/debug/tern).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
import time
from typing import Optional

import pytest

from migration_support import (
    CHECKSUM, CONFIGURATION, ENC_RAW, ENC_XBZRLE, ENC_ZERO, END, HEADER, MEMORY_BYTES, PAGE, PASS_END,
    REQUIRED, SECTION_DATA, SLOW, UNLIMITED, V1_DEVICE, V1_END, V1_RAM_LAYOUT, V1_RAM_PAGES, VM, asynctest,
    encode_record, execute, execute_error, fix_crc, free_tcp_port, insert_record, parse_stream, ram_image,
    session, skip_reason, status, stream_version, to_version1, wait_migration, wait_status,
)

_SKIP = skip_reason()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")


@pytest.fixture
def launch():
    """A factory for tern processes; every one is stopped afterwards, and one that died when
    the test did not expect it makes the test error."""
    started: list[VM] = []

    def start(label: str, **options) -> VM:
        vm = VM(label, **options)
        started.append(vm)
        return vm

    yield start

    problems = []
    for vm in started:
        died = vm.proc.poll()
        if died is not None and not vm.expect_exit:
            problems.append(f"{vm.label} exited on its own with status {died} during the test" + vm.diagnostics())
        if vm.stop() is None:
            problems.append(f"{vm.label} (pid {vm.pid}) survived SIGKILL")
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)
    for vm in started:
        vm.remove()


def tcp_uri() -> str:
    return f"tcp:127.0.0.1:{free_tcp_port()}"


async def check_source_completed(qmp, src: VM, info: dict) -> None:
    """What a completed source must show: QEMU's members, RAM totals, postmigrate."""
    for member in ("total-time", "downtime", "setup-time", "ram"):
        assert member in info, f"completed query-migrate lacks {member!r}: {info}"
    ram = info["ram"]
    assert ram["total"] == MEMORY_BYTES, f"ram.total should be the guest's RAM: {info}"
    assert ram["remaining"] == 0, f"ram.remaining must be 0 once completed: {info}"
    assert ram["transferred"] > 0 and ram["dirty-sync-count"] >= 1, f"implausible statistics: {info}"
    assert ram["normal"] > 0, f"a guest with a 32 MiB working set sent no data pages: {info}"
    # Completion is reported just before the run state changes (as in QEMU): allow a moment.
    await wait_status(qmp, src, "postmigrate")


async def migrate(src: VM, dst: VM, uri: str, *, speed: int = UNLIMITED, dst_state: str = "running") -> dict:
    """Migrates src to dst (which is listening on `uri`) and checks both ends; returns the
    source's final query-migrate. The destination's guest is checked by the caller."""
    async with session(src) as s, session(dst) as d:
        await src.wait_passes(1)
        if speed is not None:
            await execute(s, "migrate_set_speed", {"value": speed})
        await execute(s, "migrate", {"uri": uri})
        info = await wait_migration(s, src)
        await check_source_completed(s, src, info)
        await wait_status(d, dst, dst_state)
        incoming = await wait_migration(d, dst, wanted=("completed",), timeout=5)
        assert incoming.get("status") == "completed", f"destination query-migrate: {incoming}"
        return info


async def check_destination_guest(src: VM, dst: VM) -> None:
    """dst runs the migrated guest and it is healthy; src's guest no longer runs."""
    last = src.passes()[-1][0]
    await dst.assert_guest_continues(last)
    src.assert_healthy()
    assert src.passes()[-1][0] == last, "the source's guest kept running after it migrated" + src.diagnostics()


# ----- transports ----------------------------------------------------------------------------

@pytest.mark.parametrize("smp,defer", [(1, False), (2, False), (1, True)], ids=["smp1", "smp2", "defer"])
@asynctest
async def test_migrate_tcp(launch, smp, defer):
    uri = tcp_uri()
    src = launch("src", smp=smp)
    dst = launch("dst", smp=smp, incoming="defer" if defer else uri)
    if defer:
        async with session(dst) as d:
            assert await status(d) == "inmigrate"
            await execute(d, "migrate-incoming", {"uri": uri})
    info = await migrate(src, dst, uri)
    async with session(dst) as d:
        incoming = await wait_migration(d, dst, wanted=("completed",), timeout=5)
    # tern's extensions on the destination: the bytes it read are the bytes the source sent.
    assert incoming.get("x-bytes-read") == info["ram"]["transferred"], \
        f"destination read {incoming.get('x-bytes-read')} bytes, source counted {info['ram']['transferred']}"
    assert isinstance(incoming.get("x-guest-downtime"), int) and 0 <= incoming["x-guest-downtime"] < 5000, incoming
    await check_destination_guest(src, dst)


@asynctest
async def test_migrate_tcp_default_speed(launch):
    """The default 32 MiB/s limit (no migrate_set_speed): the rate limiter and the
    downtime test must still converge with the guest dirtying 16 MiB/s."""
    uri = tcp_uri()
    src = launch("src")
    dst = launch("dst", incoming=uri)
    info = await migrate(src, dst, uri, speed=None)
    assert info["ram"]["dirty-sync-count"] >= 2, f"a 32 MiB working set at 32 MiB/s took one pass? {info}"
    await check_destination_guest(src, dst)


@asynctest
async def test_migrate_unix(launch):
    src = launch("src")
    path = str(src.workdir / "migration.sock")
    dst = launch("dst", incoming=f"unix:{path}")
    await dst.until(lambda: os.path.exists(path), "the destination's listening socket")
    await migrate(src, dst, f"unix:{path}")
    await check_destination_guest(src, dst)


@pytest.fixture(scope="module")
def saved_stream(tmp_path_factory):
    """A stream saved through `migrate exec:cat > FILE`, with what the source reported and the
    source's memory digest once it had completed (postmigrate: its RAM no longer changes)."""
    path = tmp_path_factory.mktemp("stream") / "saved.tern"
    src = VM("saver")
    try:
        async def save():
            async with session(src) as s:
                await src.wait_passes(1)
                await execute(s, "migrate_set_speed", {"value": UNLIMITED})
                await execute(s, "migrate", {"uri": f"exec:cat > {path}"})
                info = await wait_migration(s, src)
                await check_source_completed(s, src, info)
                digest = await execute(s, "x-query-memory-digest", timeout=20)
                return info, digest
        info, digest = asyncio.run(save())
        data = path.read_bytes()
        return {"path": path, "info": info, "data": data, "last_pass": src.passes()[-1][0],
                "records": parse_stream(data), "digest": digest}
    finally:
        src.stop()
        src.remove()


@asynctest
async def test_migrate_exec_save_and_restore(launch, saved_stream):
    info, data = saved_stream["info"], saved_stream["data"]
    assert len(data) == info["ram"]["transferred"], \
        f"the file holds {len(data)} bytes, the source reported {info['ram']['transferred']} transferred"
    assert stream_version(data) == 2, f"tern should write stream version 2, the file says {stream_version(data)}"
    # Every record's CRC32C checks out, and the framing is what tern documents.
    records = parse_stream(data, verify_checksums=True)
    kinds = [r.kind for r in records]
    assert kinds[0] == CONFIGURATION and kinds[-1] == END and SECTION_DATA in kinds, kinds[:5]
    assert all(r.crc_at is not None for r in records), "x-checksum is on by default: every record carries a CRC"
    assert records[0].required and records[-1].required, (records[0], records[-1])
    assert records[-1].values["count"] == len(records) - 1, f"END counts {records[-1].values['count']} of {len(records) - 1}"
    config = records.configuration
    assert config["ram_size"] == MEMORY_BYTES and config["page_size"] == PAGE and config["cpu_count"] == 1, config
    assert not config["return_path"], f"a pipe has no return path: {config}"
    assert config["capabilities"] == [] and set(config["encodings"]) == {ENC_ZERO, ENC_RAW}, config
    assert sorted(name for name, _ in config["sections"].values()) == ["devices", "ram"], config
    assert {r.values["name_text"] for r in records.devices} == set(config["devices"]), \
        f"the device records do not match the configuration's list: {config['devices']}"
    assert {r.encoding for r in records.ram} == {ENC_ZERO, ENC_RAW}, {r.encoding for r in records.ram}
    assert sum(r.values["count"] for r in records.ram if r.encoding == ENC_RAW) == info["ram"]["normal"], \
        "the raw pages in the file are not the source's ram.normal"
    # The RAM the file carries is the RAM the source held when it completed.
    image = hashlib.sha256(ram_image(data, records)).hexdigest()
    assert image == saved_stream["digest"]["sha256"], \
        f"the RAM in the saved stream ({image}) is not the source's ({saved_stream['digest']})"
    dst = launch("dst", incoming=f"exec:cat {saved_stream['path']}")
    async with session(dst) as d:
        await wait_status(d, dst, "running", timeout=15)
        incoming = await wait_migration(d, dst, wanted=("completed",), timeout=5)
        assert incoming.get("status") == "completed" and incoming.get("x-bytes-read") == len(data), incoming
    await dst.assert_guest_continues(saved_stream["last_pass"])


@asynctest
async def test_restore_version1_stream(launch, saved_stream, tmp_path):
    """A VM saved by a tern that wrote stream version 1 still restores: the saved version 2
    stream rewritten as the equivalent version 1 one loads, with the same RAM, and the guest
    runs on with its self-check passing."""
    old = to_version1(saved_stream["data"])
    assert stream_version(old) == 1
    converted = parse_stream(old)
    assert [r.kind for r in converted][0] == V1_RAM_LAYOUT and converted[-1].kind == V1_END, converted[:3]
    assert hashlib.sha256(ram_image(old, converted)).hexdigest() == saved_stream["digest"]["sha256"], \
        "the conversion to version 1 lost RAM contents"
    path = tmp_path / "saved-v1.tern"
    path.write_bytes(old)
    dst = launch("dst", incoming=f"exec:cat {path}", paused=True)
    async with session(dst) as d:
        await wait_status(d, dst, "paused", timeout=15)
        incoming = await wait_migration(d, dst, wanted=("completed",), timeout=5)
        assert incoming.get("status") == "completed" and incoming.get("x-bytes-read") == len(old), incoming
        digest = await execute(d, "x-query-memory-digest", timeout=20)
        assert digest == saved_stream["digest"], f"RAM after a version 1 load {digest}, saved {saved_stream['digest']}"
        await execute(d, "cont")
        await wait_status(d, dst, "running")
    await dst.assert_guest_continues(saved_stream["last_pass"])


@asynctest
async def test_saved_stream_without_checksums_restores(launch, tmp_path):
    """x-checksum false: records carry no CRC32C (flags bit 1 clear) and the stream still loads."""
    path = tmp_path / "nocrc.tern"
    src = launch("src")
    async with session(src) as s:
        await src.wait_passes(1)
        assert (await execute(s, "query-migrate-parameters"))["x-checksum"] is True
        await execute(s, "migrate-set-parameters", {"x-checksum": False, "max-bandwidth": UNLIMITED})
        assert (await execute(s, "query-migrate-parameters"))["x-checksum"] is False
        await execute(s, "migrate", {"uri": f"exec:cat > {path}"})
        await wait_migration(s, src)
        digest = await execute(s, "x-query-memory-digest", timeout=20)
    data = path.read_bytes()
    records = parse_stream(data)
    assert all(r.crc_at is None and not r.flags & CHECKSUM for r in records), \
        f"with x-checksum false some records still carry a CRC: {[r for r in records if r.crc_at is not None][:3]}"
    assert hashlib.sha256(ram_image(data, records)).hexdigest() == digest["sha256"]
    dst = launch("dst", incoming=f"exec:cat {path}")
    async with session(dst) as d:
        await wait_status(d, dst, "running", timeout=15)
    await dst.assert_guest_continues(src.passes()[-1][0])


@asynctest
async def test_migrate_fd(launch):
    ours, theirs = socket.socketpair()
    try:
        src = launch("src")
        dst = launch("dst", incoming=f"fd:{theirs.fileno()}", pass_fds=[theirs.fileno()])
        theirs.close()
        async with session(src) as s:
            s.send_fd_scm(ours.fileno())
            assert await execute(s, "getfd", {"fdname": "migration"}) == {}
        ours.close()
        await migrate(src, dst, "fd:migration")
        await check_destination_guest(src, dst)
    finally:
        ours.close()
        theirs.close()


@asynctest
async def test_migrate_paused_source(launch):
    """A stopped source: the destination loads it paused (the recorded run state wins over
    autostart, as in QEMU) with identical RAM, and runs the guest on cont."""
    uri = tcp_uri()
    src = launch("src")
    dst = launch("dst", incoming=uri)
    async with session(src) as s:
        await src.wait_passes(1)
        await execute(s, "stop")
        await wait_status(s, src, "paused")
    await migrate(src, dst, uri, dst_state="paused")
    async with session(src) as s, session(dst) as d:
        source = await execute(s, "x-query-memory-digest", timeout=20)
        destination = await execute(d, "x-query-memory-digest", timeout=20)
        assert source == destination, f"a stopped guest's RAM changed in migration: {source} vs {destination}"
        await execute(d, "cont")
        await wait_status(d, dst, "running")
    await check_destination_guest(src, dst)


@asynctest
async def test_ping_pong(launch):
    """A -> B, then B -> A2 (a fresh process in A's place): the guest survives both hops."""
    first, second = tcp_uri(), tcp_uri()
    a = launch("A")
    b = launch("B", incoming=first)
    await migrate(a, b, first)
    last_on_a = a.passes()[-1][0]
    await b.wait_passes(1, timeout=10)
    # A2 is held paused (-S) so its RAM can be compared with B's: the second hop must carry
    # every page, including those B loaded and never dirtied itself.
    a2 = launch("A2", incoming=second, paused=True)
    await migrate(b, a2, second, dst_state="paused")
    async with session(b) as qb, session(a2) as qa:
        on_b = await execute(qb, "x-query-memory-digest", timeout=20)
        on_a2 = await execute(qa, "x-query-memory-digest", timeout=20)
        assert on_b == on_a2, f"RAM differs after the second hop: B {on_b}, A2 {on_a2}"
        await execute(qa, "cont")
        await wait_status(qa, a2, "running")
    last_on_b = b.passes()[-1][0]
    assert b.passes()[0][0] > last_on_a, "B did not continue A's guest" + b.diagnostics()
    await check_destination_guest(b, a2)
    assert a2.passes()[0][0] > last_on_b


# ----- memory digests ------------------------------------------------------------------------

async def migrate_to_paused_and_digest(src: VM, dst: VM, uri: str, speed) -> tuple[dict, dict]:
    await migrate(src, dst, uri, dst_state="paused", speed=speed)
    async with session(src) as s, session(dst) as d:
        source = await execute(s, "x-query-memory-digest", timeout=20)
        destination = await execute(d, "x-query-memory-digest", timeout=20)
    assert source["size"] == destination["size"] == MEMORY_BYTES, (source, destination)
    return source, destination


@pytest.mark.parametrize("speed", [UNLIMITED, None], ids=["unlimited", "default-speed"])
@asynctest
async def test_digest_matches_after_migration(launch, speed):
    """At the default 32 MiB/s the final stop-and-copy carries many dirty pages; unlimited,
    the last passes are tiny. Either way the destination's RAM must equal the source's."""
    uri = tcp_uri()
    src = launch("src")
    dst = launch("dst", incoming=uri, paused=True)
    source, destination = await migrate_to_paused_and_digest(src, dst, uri, speed)
    assert source["sha256"] == destination["sha256"], \
        f"guest RAM differs after migration: source {source}, destination {destination}" + src.diagnostics()
    async with session(dst) as d:
        await execute(d, "cont")
        await wait_status(d, dst, "running")
    await check_destination_guest(src, dst)


@asynctest
async def test_dropped_dirty_page_is_caught_by_digest(launch):
    """TERN_TEST_DROP_DIRTY_PAGE=1 makes the source leave one dirty page out of the final
    copy: the digests must differ, or the digest comparison above proves nothing.

    At the default speed the final copy has dirty pages to leave out (unlimited, the last sync
    often finds none and the hook has nothing to drop)."""
    uri = tcp_uri()
    src = launch("src", env={"TERN_TEST_DROP_DIRTY_PAGE": "1"})
    dst = launch("dst", incoming=uri, paused=True)
    source, destination = await migrate_to_paused_and_digest(src, dst, uri, None)
    assert "TEST HOOK: dropped dirty page" in src.stderr_text(), (
        "TERN_TEST_DROP_DIRTY_PAGE=1 was set on the source, but it never logged dropping a page"
        + src.diagnostics())
    assert source["sha256"] != destination["sha256"], (
        "the source dropped a dirty page (TERN_TEST_DROP_DIRTY_PAGE=1) but the digests are equal" + src.diagnostics())


# ----- cancel and failure --------------------------------------------------------------------

async def start_slow_migration(s, src: VM, uri: str) -> dict:
    """Starts a 1 MiB/s migration and checks query-migrate's members while it is active."""
    await src.wait_passes(1)
    await execute(s, "migrate_set_speed", {"value": SLOW})
    await execute(s, "migrate", {"uri": uri})
    info = await wait_migration(s, src, wanted=("active",), timeout=10)
    for member in ("total-time", "expected-downtime", "setup-time", "ram"):
        assert member in info, f"an active query-migrate lacks {member!r}: {info}"
    assert "downtime" not in info, f"an active query-migrate has no downtime yet: {info}"
    ram = info["ram"]
    for member in ("transferred", "remaining", "total", "duplicate", "skipped", "normal", "normal-bytes",
                   "dirty-pages-rate", "mbps", "dirty-sync-count"):
        assert member in ram, f"active ram statistics lack {member!r}: {info}"
    assert ram["total"] == MEMORY_BYTES and ram["remaining"] > 0, info
    assert await status(s) == "running", "the source's guest must keep running while it migrates"
    return info


@asynctest
async def test_cancel_while_active(launch):
    uri = tcp_uri()
    src = launch("src")
    dst = launch("dst", incoming=uri)
    async with session(src) as s:
        await start_slow_migration(s, src, uri)
        assert await execute(s, "migrate_cancel") == {}
        await wait_migration(s, src, wanted=("cancelled",), timeout=10)
        await wait_status(s, src, "running")
        seen = len(src.passes())
        await src.wait_passes(3, after=seen, timeout=10)
        src.assert_healthy()
        assert (await execute(s, "query-migrate"))["status"] == "cancelled"
    # The destination saw a stream that stopped short: it fails its load and exits 1.
    rc = await dst.wait_exit(timeout=10)
    assert rc == 1 and "load of migration failed" in dst.stderr_text(), \
        f"a destination whose source cancelled should fail its load and exit 1, got {rc}" + dst.diagnostics()


@asynctest
async def test_destination_killed_mid_stream(launch):
    uri = tcp_uri()
    src = launch("src")
    dst = launch("dst", incoming=uri)
    async with session(src) as s:
        await start_slow_migration(s, src, uri)
        dst.kill()
        info = await wait_migration(s, src, wanted=("failed",), timeout=15)
        assert isinstance(info.get("error-desc"), str) and info["error-desc"], \
            f"a failed migration should say why (error-desc): {info}"
        await wait_status(s, src, "running")
        seen = len(src.passes())
        await src.wait_passes(3, after=seen, timeout=10)
        src.assert_healthy()
    # And the source can still migrate afterwards.
    retry = tcp_uri()
    dst2 = launch("dst2", incoming=retry)
    await migrate(src, dst2, retry)
    await check_destination_guest(src, dst2)


# ----- damaged streams -----------------------------------------------------------------------

async def restore_must_fail(launch, data: bytes, workdir, what: str, reason: Optional[str] = None) -> str:
    """Feeds `data` to a fresh destination: it must exit 1 (not by a signal) and say
    'load of migration failed' (followed by `reason`, if given). Returns its stderr."""
    path = workdir / "damaged.tern"
    path.write_bytes(data)
    dst = launch("dst", incoming=f"exec:cat {path}")
    rc = await dst.wait_exit(timeout=15)
    stderr = dst.stderr_text()
    assert rc is not None and rc >= 0, f"{what}: tern died from signal {-rc}" + dst.diagnostics()
    assert rc == 1, f"{what}: expected exit status 1, got {rc}" + dst.diagnostics()
    assert "load of migration failed" in stderr, f"{what}: no 'load of migration failed' on stderr" + dst.diagnostics()
    if reason is not None:
        assert reason in stderr, f"{what}: the load failed, but not because of {reason!r}" + dst.diagnostics()
    return stderr


async def restore_must_succeed(launch, data: bytes, workdir, last_pass: int, what: str) -> None:
    path = workdir / "restore.tern"
    path.write_bytes(data)
    dst = launch("dst", incoming=f"exec:cat {path}")
    async with session(dst) as d:
        try:
            await wait_status(d, dst, "running", timeout=15)
        except AssertionError as error:
            raise AssertionError(f"{what}: the destination did not load the stream: {error}") from None
        incoming = await wait_migration(d, dst, wanted=("completed",), timeout=5)
        assert incoming.get("status") == "completed" and incoming.get("x-bytes-read") == len(data), (what, incoming)
    await dst.assert_guest_continues(last_pass)


def cut_points(records, size):
    device = records.devices[len(records.devices) // 2]
    raw = middle_record(records, ENC_RAW)
    end = records[-1]
    return {
        "empty": 0,
        "inside-magic": 5,
        "header-only": HEADER,
        "inside-record-header": records[1].start + 3,
        "after-configuration": records[1].start,
        "inside-page-data": raw.fields["data"] + PAGE + 100,
        "before-page-checksum": raw.crc_at,
        "half": size // 2,
        "inside-device-state": device.fields["payload"] + 3,
        "before-end-record": end.start,
        "inside-end-checksum": end.crc_at + 2,
        "one-byte-short": size - 1,
    }


CUTS = ["empty", "inside-magic", "header-only", "inside-record-header", "after-configuration", "inside-page-data",
        "before-page-checksum", "half", "inside-device-state", "before-end-record", "inside-end-checksum",
        "one-byte-short"]


@pytest.mark.parametrize("cut", CUTS)
@asynctest
async def test_truncated_stream(launch, saved_stream, tmp_path, cut):
    data = saved_stream["data"]
    at = cut_points(saved_stream["records"], len(data))[cut]
    await restore_must_fail(launch, data[:at], tmp_path, f"stream cut at byte {at} ({cut})")


def middle_record(records, encoding=None, section="ram"):
    """A RAM record (of `encoding`) or a device record from the middle of the stream."""
    matching = records.of(SECTION_DATA, section, encoding)
    assert matching, f"the stream has no {section} record in encoding {encoding}"
    return matching[len(matching) // 2]


def put(data: bytearray, at: int, form: str, value) -> None:
    struct.pack_into(form, data, at, value)


#: Damage to one field, then the record's CRC recomputed (as a writer that produced those bytes
#: would have), so each case exercises the loader's own check of that field. The reason is a
#: part of what the loader must say (on stderr, after 'load of migration failed').
FIELD_CORRUPTIONS = {
    "magic": "bad magic",
    "version": "stream version 3 is not supported",
    "ram-size": "the source has 256 MiB of RAM, this machine 128 MiB",
    "page-size": "8192-byte pages",
    "vcpu-count": "the source has 2 vCPUs, this machine 1",
    "configuration-not-first": "does not begin with its configuration record",
    "second-configuration": "a second configuration record",
    "record-type-in-middle": "a required record of unknown type 0x55",
    "unknown-flags": "has unknown flags 0x83",
    "record-length-huge": "claims 4294967295 bytes",
    "section-id-unknown": "live section 7, which the configuration does not list",
    "page-encoding-unknown": "unknown page encoding 0x9",
    "page-encoding-unannounced": "page encoding 'xbzrle', which the source did not announce",
    "page-offset-past-ram": "lies outside guest RAM",
    "page-offset-overflows": "lies outside guest RAM",
    "page-offset-misaligned": "is malformed",
    "page-count-huge": "is malformed",
    "page-count-zero": "is malformed",
    "zero-run-past-ram": "lies outside guest RAM",
    "device-name-length": "of 255 bytes (at most 64)",
    "device-unknown-name": "unknown section 'zzzzz'",
    "device-version": "has version 4294967295",
    "device-payload-length": "claims 4294967295 bytes",
    "device-payload-short": "bytes left over",
    "end-record-count": "the source wrote",
}

#: Damage the CRC is there to catch: the bytes change, the CRC stays as written.
CHECKSUM_CORRUPTIONS = {
    "page-data-bit-flip": "fails its checksum",
    "page-data-last-byte": "fails its checksum",
    "device-payload-bit-flip": "fails its checksum",
    "configuration-ram-size-unchecked": "fails its checksum",
    "record-length-grown": "fails its checksum",
    "end-count-unchecked": "fails its checksum",
}


def corrupt(case: str, data: bytearray, records) -> None:
    configuration = records[0]
    pages = middle_record(records, ENC_RAW)
    zero = middle_record(records, ENC_ZERO)
    device = next(r for r in records.devices if r.values["name_text"].startswith("cpu/"))
    end = records[-1]
    damaged = None  # the record whose CRC is recomputed
    if case == "magic":
        data[0] ^= 0xFF
    elif case == "version":
        put(data, 8, "<I", 3)
    elif case in ("ram-size", "configuration-ram-size-unchecked"):
        put(data, configuration.fields["ram_size"], "<Q", MEMORY_BYTES * 2)
        damaged = configuration if case == "ram-size" else None
    elif case == "page-size":
        put(data, configuration.fields["page_size"], "<I", 8192)
        damaged = configuration
    elif case == "vcpu-count":
        put(data, configuration.fields["cpu_count"], "<I", 2)
        damaged = configuration
    elif case == "configuration-not-first":
        data[configuration.start] = PASS_END
        damaged = configuration
    elif case == "second-configuration":
        data[pages.start] = CONFIGURATION
        damaged = pages
    elif case == "record-type-in-middle":
        data[pages.start] = 0x55
        damaged = pages
    elif case == "unknown-flags":
        data[pages.fields["flags"]] |= 0x80
        damaged = pages
    elif case == "record-length-huge":
        put(data, pages.fields["length"], "<I", 0xFFFF_FFFF)
        damaged = pages
    elif case == "section-id-unknown":
        put(data, pages.fields["section"], "<H", 7)
        damaged = pages
    elif case == "page-encoding-unknown":
        data[pages.fields["encoding"]] = 0x09
        damaged = pages
    elif case == "page-encoding-unannounced":
        data[pages.fields["encoding"]] = ENC_XBZRLE
        damaged = pages
    elif case == "page-offset-past-ram":
        put(data, pages.fields["offset"], "<Q", MEMORY_BYTES)
        damaged = pages
    elif case == "page-offset-overflows":
        put(data, pages.fields["offset"], "<Q", 0xFFFF_FFFF_FFFF_F000)
        damaged = pages
    elif case == "page-offset-misaligned":
        put(data, pages.fields["offset"], "<Q", pages.values["offset"] + 1)
        damaged = pages
    elif case == "page-count-huge":
        put(data, pages.fields["count"], "<I", 0xFFFF_FFFF)
        damaged = pages
    elif case == "page-count-zero":
        put(data, pages.fields["count"], "<I", 0)
        damaged = pages
    elif case == "zero-run-past-ram":
        put(data, zero.fields["offset"], "<Q", MEMORY_BYTES - PAGE)
        put(data, zero.fields["count"], "<I", 2)
        damaged = zero
    elif case == "device-name-length":
        data[device.fields["name_length"]] = 0xFF
        damaged = device
    elif case == "device-unknown-name":
        start, stop = device.fields["name"], device.fields["version"]
        data[start:stop] = b"z" * (stop - start)
        damaged = device
    elif case == "device-version":
        put(data, device.fields["version"], "<I", 0xFFFF_FFFF)
        damaged = device
    elif case == "device-payload-length":
        put(data, device.fields["length"], "<I", 0xFFFF_FFFF)
        damaged = device
    elif case == "device-payload-short":
        # The section claims fewer bytes than its record carries.
        put(data, device.fields["length"], "<I", device.values["payload_length"] // 2)
        damaged = device
    elif case in ("end-record-count", "end-count-unchecked"):
        put(data, end.fields["count"], "<Q", end.values["count"] + 1)
        damaged = end if case == "end-record-count" else None
    elif case == "page-data-bit-flip":
        data[pages.fields["data"] + 3 * PAGE + 1234] ^= 0x10
    elif case == "page-data-last-byte":
        data[pages.crc_at - 1] ^= 0xFF
    elif case == "device-payload-bit-flip":
        data[device.fields["payload"] + device.values["payload_length"] // 2] ^= 0x01
    elif case == "record-length-grown":
        # The reader takes the CRC and 4 bytes of the next record as the body.
        put(data, pages.fields["length"], "<I", pages.length + 4)
    else:
        raise ValueError(case)
    if damaged is not None:
        fix_crc(data, damaged)


@pytest.mark.parametrize("case", list(FIELD_CORRUPTIONS) + list(CHECKSUM_CORRUPTIONS))
@asynctest
async def test_corrupted_stream(launch, saved_stream, tmp_path, case):
    data = bytearray(saved_stream["data"])
    corrupt(case, data, saved_stream["records"])
    reason = FIELD_CORRUPTIONS.get(case) or CHECKSUM_CORRUPTIONS[case]
    await restore_must_fail(launch, bytes(data), tmp_path, f"corruption {case}", reason)


# Version 1 (what older terns saved) is still read: its loader must refuse damage as before.

@pytest.fixture(scope="module")
def saved_v1(saved_stream):
    data = to_version1(saved_stream["data"])
    return {"data": data, "records": parse_stream(data)}


def corrupt_v1(case: str, data: bytearray, records) -> None:
    layout = records[0]
    pages = [r for r in records if r.kind == V1_RAM_PAGES]
    pages = pages[len(pages) // 2]
    device = next(r for r in records if r.kind == V1_DEVICE and r.fields["name_text"].startswith("cpu/"))
    end = records[-1]
    if case == "magic":
        data[0] ^= 0xFF
    elif case == "version":
        put(data, 8, "<I", 3)
    elif case == "ram-size":
        put(data, layout.fields["size"], "<Q", MEMORY_BYTES * 2)
    elif case == "page-size":
        put(data, layout.fields["page_size"], "<I", 8192)
    elif case == "record-type-in-middle":
        data[pages.start] = 0x55
    elif case == "page-offset-past-ram":
        put(data, pages.fields["offset"], "<Q", MEMORY_BYTES)
    elif case == "page-offset-overflows":
        put(data, pages.fields["offset"], "<Q", 0xFFFF_FFFF_FFFF_F000)
    elif case == "page-offset-misaligned":
        put(data, pages.fields["offset"], "<Q", struct.unpack_from("<Q", data, pages.fields["offset"])[0] + 1)
    elif case == "page-count-huge":
        put(data, pages.fields["count"], "<I", 0xFFFF_FFFF)
    elif case == "page-count-zero":
        put(data, pages.fields["count"], "<I", 0)
    elif case == "device-name-length":
        put(data, device.fields["name_length"], "<H", 0xFFFF)
    elif case == "device-unknown-name":
        start, stop = device.fields["name"], device.fields["version"]
        data[start:stop] = b"z" * (stop - start)
    elif case == "device-version":
        put(data, device.fields["version"], "<I", 0xFFFF_FFFF)
    elif case == "device-payload-length":
        put(data, device.fields["length"], "<I", 0xFFFF_FFFF)
    elif case == "device-payload-short":
        # The section claims fewer bytes than its state needs; what follows is read as records.
        put(data, device.fields["length"], "<I", device.fields["payload_length"] // 2)
    elif case == "end-page-count":
        put(data, end.fields["pages"], "<Q", struct.unpack_from("<Q", data, end.fields["pages"])[0] + 1)
    else:
        raise ValueError(case)


V1_CORRUPTIONS = {
    "magic": "bad magic",
    "version": "stream version 3 is not supported",
    "ram-size": "the source has 256 MiB of RAM, this machine 128 MiB",
    "page-size": "page size 8192",
    "record-type-in-middle": "unknown record type 0x55",
    "page-offset-past-ram": "lies outside guest RAM",
    "page-offset-overflows": "lies outside guest RAM",
    "page-offset-misaligned": "is malformed",
    "page-count-huge": "is malformed",
    "page-count-zero": "is malformed",
    "device-name-length": "a device section name of 65535 bytes",
    "device-unknown-name": "unknown section 'zzzzz'",
    "device-version": "has version 4294967295",
    "device-payload-length": "claims 4294967295 bytes",
    "device-payload-short": None,  # what follows is misread: any refusal will do
    "end-page-count": "pages but",
}


@pytest.mark.parametrize("case", list(V1_CORRUPTIONS))
@asynctest
async def test_corrupted_v1_stream(launch, saved_v1, tmp_path, case):
    data = bytearray(saved_v1["data"])
    corrupt_v1(case, data, saved_v1["records"])
    await restore_must_fail(launch, bytes(data), tmp_path, f"version 1 corruption {case}", V1_CORRUPTIONS[case])


@pytest.mark.parametrize("cut", ["header-only", "half", "inside-device-state", "before-end-record", "one-byte-short"])
@asynctest
async def test_truncated_v1_stream(launch, saved_v1, tmp_path, cut):
    data, records = saved_v1["data"], saved_v1["records"]
    device = next(r for r in records if r.kind == V1_DEVICE)
    at = {"header-only": HEADER, "half": len(data) // 2, "inside-device-state": device.fields["payload"] + 3,
          "before-end-record": records[-1].start, "one-byte-short": len(data) - 1}[cut]
    await restore_must_fail(launch, data[:at], tmp_path, f"version 1 stream cut at byte {at} ({cut})")


@asynctest
async def test_unknown_optional_record_is_skipped(launch, saved_stream, tmp_path):
    """A record type this tern does not know, not flagged required (flags 0: no CRC either), as
    a newer tern might write: the loader skips it and the load succeeds. The newer writer would
    count it in END, so the END count is raised by one."""
    records = saved_stream["records"]
    extra = encode_record(0x60, b"from a newer tern" * 5, flags=0)
    data = insert_record(saved_stream["data"], middle_record(records, ENC_RAW), extra)
    # And one with a CRC, optional too, just before END.
    extra_checked = encode_record(0x61, struct.pack("<QQ", 1, 2), flags=CHECKSUM)
    data = insert_record(data, parse_stream(data)[-1], extra_checked)
    assert [r.kind for r in parse_stream(data)].count(0x60) == 1
    await restore_must_succeed(launch, data, tmp_path, saved_stream["last_pass"], "unknown optional records")


@asynctest
async def test_unknown_required_record_is_refused(launch, saved_stream, tmp_path):
    """The same record flagged required: the loader must refuse the stream, naming the type."""
    extra = encode_record(0x60, b"from a newer tern" * 5, flags=REQUIRED | CHECKSUM)
    data = insert_record(saved_stream["data"], middle_record(saved_stream["records"], ENC_RAW), extra)
    await restore_must_fail(launch, data, tmp_path, "unknown required record",
                            "a required record of unknown type 0x60")


@asynctest
async def test_restore_into_other_memory_size(launch, saved_stream):
    """A destination must be started with the source's -m: a 256M one refuses a 128M stream."""
    dst = launch("dst", memory="256M", incoming=f"exec:cat {saved_stream['path']}")
    rc = await dst.wait_exit(timeout=15)
    stderr = dst.stderr_text()
    assert rc == 1 and "load of migration failed" in stderr, \
        f"a 256M destination loading a 128M stream should exit 1, got {rc}" + dst.diagnostics()
    assert "the source has 128 MiB of RAM, this machine 256 MiB" in stderr, dst.diagnostics()


@asynctest
async def test_restore_into_fewer_cpus(launch, tmp_path):
    """A stream from a 2-vCPU source into a 1-vCPU destination must be refused, not run with a
    vCPU missing."""
    path = tmp_path / "smp2.tern"
    src = launch("src", smp=2)
    async with session(src) as s:
        await src.wait_passes(1)
        await execute(s, "migrate_set_speed", {"value": UNLIMITED})
        await execute(s, "migrate", {"uri": f"exec:cat > {path}"})
        await wait_migration(s, src)
    assert parse_stream(path.read_bytes()).configuration["cpu_count"] == 2
    dst = launch("dst", smp=1, incoming=f"exec:cat {path}")
    dst.expect_exit = True
    deadline = time.monotonic() + 10
    while dst.alive() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    rc = dst.proc.poll()
    assert rc == 1 and "load of migration failed" in dst.stderr_text(), (
        f"a 1-vCPU destination loading a 2-vCPU stream should fail its load and exit 1; "
        f"it is {'still running' if rc is None else f'exited {rc}'}" + dst.diagnostics())
    assert "the source has 2 vCPUs, this machine 1" in dst.stderr_text(), dst.diagnostics()


def garbage_device_payloads(version: int, saved) -> bytes:
    """The saved stream (as version 2, or converted to version 1) with every device section's
    payload overwritten with a pattern; in version 2 each record's CRC is recomputed, so the
    device-state loaders, not the checksum, meet the garbage."""
    data = bytearray(saved["data"] if version == 2 else to_version1(saved["data"]))
    records = parse_stream(data)
    for record in records:
        if version == 2 and record.kind == SECTION_DATA and record.section_name == "devices":
            start, length = record.fields["payload"], record.values["payload_length"]
        elif version == 1 and record.kind == V1_DEVICE:
            start, length = record.fields["payload"], record.fields["payload_length"]
        else:
            continue
        for i in range(start, start + length):
            data[i] = (i * 167 + 13) & 0xFF
        if version == 2:
            fix_crc(data, record)
    return bytes(data)


@pytest.mark.parametrize("version", [2, 1], ids=["v2", "v1"])
@asynctest
async def test_garbage_device_payloads_do_not_crash(launch, saved_stream, tmp_path, version):
    """Every device section's payload overwritten with a pattern: tern may refuse the state
    (exit 1) or even accept it, but it must not die from a signal, and must not hang."""
    path = tmp_path / "garbage.tern"
    path.write_bytes(garbage_device_payloads(version, saved_stream))
    dst = launch("dst", incoming=f"exec:cat {path}")
    dst.expect_exit = True
    deadline = time.monotonic() + 8
    while dst.alive() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    rc = dst.proc.poll()
    if rc is None:
        assert dst.stop() is not None, "tern would not stop" + dst.diagnostics()
    else:
        assert rc >= 0, f"tern died from signal {-rc} loading garbage device state" + dst.diagnostics()
        assert rc == 0 or "load of migration failed" in dst.stderr_text(), dst.diagnostics()
        assert "fails its checksum" not in dst.stderr_text(), \
            "the CRCs were recomputed: the device loaders should have met the garbage" + dst.diagnostics()


# ----- QMP errors ----------------------------------------------------------------------------

@asynctest
async def test_migrate_while_active_is_refused(launch):
    uri = tcp_uri()
    src = launch("src")
    launch("dst", incoming=uri).expect_exit = True  # fails its load when we cancel
    async with session(src) as s:
        await start_slow_migration(s, src, uri)
        await execute_error(s, "migrate", {"uri": tcp_uri()}, desc="There's a migration process in progress")
        await execute_error(s, "migrate-set-capabilities",
                            {"capabilities": [{"capability": "events", "state": True}]},
                            desc="There's a migration process in progress")
        assert (await execute(s, "query-migrate"))["status"] == "active", "the refused migrate disturbed the first"
        await execute(s, "migrate_cancel")
        await wait_migration(s, src, wanted=("cancelled",), timeout=10)


@pytest.mark.parametrize("incoming", ["tcp", "defer"])
@asynctest
async def test_migrate_on_incoming_process_is_refused(launch, incoming):
    vm = launch("dst", incoming=tcp_uri() if incoming == "tcp" else "defer")
    async with session(vm) as q:
        assert await status(q) == "inmigrate"
        await execute_error(q, "migrate", {"uri": tcp_uri()}, desc="Guest is waiting for an incoming migration")


@asynctest
async def test_migrate_bad_scheme(launch):
    vm = launch("src")
    async with session(vm) as q:
        await execute_error(q, "migrate", {"uri": "bogus:1234"},
                            desc="Parameter 'uri' expects a valid migration protocol")
        info = await execute(q, "query-migrate")
        assert info.get("status") == "failed", f"after a bad scheme query-migrate should say failed: {info}"
        assert await status(q) == "running"


@asynctest
async def test_invtsc_blocks_migration(launch):
    vm = launch("src", extra=["-cpu", "host,+invtsc"])
    deadline = time.monotonic() + 3
    while not os.path.exists(vm.sock) and vm.alive() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if not vm.alive() and "invariant TSC" in vm.stderr_text():
        vm.expect_exit = True
        pytest.skip("this host's KVM does not offer the invariant TSC")
    async with session(vm) as q:
        await execute_error(q, "migrate", {"uri": tcp_uri()},
                            desc="State blocked by non-migratable CPU device (invtsc flag)")
        assert await execute(q, "query-migrate") == {}, "a blocked migrate must not start a migration"


@pytest.mark.parametrize("incoming", [None, "tcp"])
@asynctest
async def test_migrate_incoming_without_defer(launch, incoming):
    vm = launch("vm", incoming=tcp_uri() if incoming else None)
    async with session(vm) as q:
        await execute_error(q, "migrate-incoming", {"uri": tcp_uri()}, desc="For use with '-incoming defer'")


@asynctest
async def test_capabilities(launch):
    vm = launch("vm")
    async with session(vm) as q:
        listed = {c["capability"]: c["state"] for c in await execute(q, "query-migrate-capabilities")}
        assert set(listed) == {"xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "compress", "events",
                               "x-postcopy-ram", "postcopy-ram", "return-path", "multifd"}, listed
        assert not any(listed.values()), f"every capability starts off: {listed}"
        for unimplemented in ("rdma-pin-all",):
            await execute_error(q, "migrate-set-capabilities",
                                {"capabilities": [{"capability": unimplemented, "state": True}]},
                                desc=f"Capability '{unimplemented}' is not supported by tern yet")
        await execute_error(q, "migrate-set-capabilities", {"capabilities": [{"capability": "no-such", "state": True}]})
        # A refused change applies nothing, even the valid entries before it.
        await execute_error(q, "migrate-set-capabilities", {"capabilities": [
            {"capability": "events", "state": True}, {"capability": "rdma-pin-all", "state": True}]})
        listed = {c["capability"]: c["state"] for c in await execute(q, "query-migrate-capabilities")}
        assert not any(listed.values()), f"a refused migrate-set-capabilities changed {listed}"
        # migrate_cancel with nothing to cancel is not an error.
        assert await execute(q, "migrate_cancel") == {}
        assert await execute(q, "query-migrate") == {}
        # Turning an unimplemented capability off is fine; events can be turned on.
        assert await execute(q, "migrate-set-capabilities", {"capabilities": [
            {"capability": "rdma-pin-all", "state": False}, {"capability": "events", "state": True}]}) == {}
        listed = {c["capability"]: c["state"] for c in await execute(q, "query-migrate-capabilities")}
        assert listed["events"] is True and listed["rdma-pin-all"] is False, listed


PARAMETER_ERRORS = [
    ({"compress-level": 10}, "Parameter 'compress_level' expects is invalid, it should be in the range of 0 to 9"),
    ({"compress-level": -1}, "Parameter 'compress_level' expects is invalid, it should be in the range of 0 to 9"),
    ({"compress-threads": 0}, "Parameter 'compress_threads' expects is invalid, it should be in the range of 1 to 255"),
    ({"compress-threads": 256}, "Parameter 'compress_threads' expects is invalid, it should be in the range of 1 to 255"),
    ({"decompress-threads": 0},
     "Parameter 'decompress_threads' expects is invalid, it should be in the range of 1 to 255"),
    ({"x-cpu-throttle-initial": 0}, "Parameter 'x_cpu_throttle_initial' expects an integer in the range of 1 to 99"),
    ({"x-cpu-throttle-increment": 100},
     "Parameter 'x_cpu_throttle_increment' expects an integer in the range of 1 to 99"),
    # Several at once: the first check wins, nothing is applied, and (unlike QEMU 2015, which
    # aborted on two bad throttle values) the process survives.
    ({"compress-level": 5, "compress-threads": 0},
     "Parameter 'compress_threads' expects is invalid, it should be in the range of 1 to 255"),
    ({"x-cpu-throttle-initial": 0, "x-cpu-throttle-increment": 100},
     "Parameter 'x_cpu_throttle_initial' expects an integer in the range of 1 to 99"),
]


@asynctest
async def test_parameters_out_of_range(launch):
    vm = launch("vm")
    async with session(vm) as q:
        before = await execute(q, "query-migrate-parameters")
        for arguments, desc in PARAMETER_ERRORS:
            await execute_error(q, "migrate-set-parameters", arguments, desc=desc)
            after = await execute(q, "query-migrate-parameters")
            assert after == before, f"a refused {arguments} changed the parameters: {before} -> {after}"
        assert await execute(q, "migrate-set-parameters", {"compress-level": 9, "x-cpu-throttle-initial": 99}) == {}
        after = await execute(q, "query-migrate-parameters")
        assert after["compress-level"] == 9 and after["x-cpu-throttle-initial"] == 99, after
    assert vm.alive()


# ----- events --------------------------------------------------------------------------------

async def collect(listener, until, timeout: float) -> list[dict]:
    events = []
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no final event within {timeout:.0f} s; saw {events}")
        try:
            event = await asyncio.wait_for(listener.get(), remaining)
        except asyncio.TimeoutError:
            raise AssertionError(f"no final event within {timeout:.0f} s; saw {events}") from None
        events.append(dict(event))
        if until(event):
            return events


@asynctest
async def test_migration_events(launch):
    uri = tcp_uri()
    src = launch("src")
    dst = launch("dst", incoming=uri)
    async with session(src) as s:
        await src.wait_passes(1)
        await execute(s, "migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
        # Slow enough for a few passes to be visible, fast enough to finish in a few seconds.
        await execute(s, "migrate_set_speed", {"value": 64 << 20})
        with s.listener(("MIGRATION", "MIGRATION_PASS")) as listener:
            await execute(s, "migrate", {"uri": uri})
            events = await collect(listener, lambda e: e["event"] == "MIGRATION" and
                                   e["data"]["status"] in ("completed", "failed", "cancelled"), 30)
    statuses = [e["data"]["status"] for e in events if e["event"] == "MIGRATION"]
    assert statuses == ["setup", "active", "completed"], f"MIGRATION statuses {statuses}; events {events}"
    passes = [e["data"]["pass"] for e in events if e["event"] == "MIGRATION_PASS"]
    assert passes, f"no MIGRATION_PASS event: {events}"
    assert passes == sorted(passes) and all(isinstance(p, int) and p >= 1 for p in passes), passes
    for event in events:
        assert set(event) <= {"event", "data", "timestamp"} and set(event["timestamp"]) == {"seconds", "microseconds"}, event
    await check_destination_guest(src, dst)


@asynctest
async def test_destination_events(launch):
    """docs/migration-reference.md §2.4: with events on (set on a deferred destination), the
    destination emits MIGRATION setup (ungated, at migrate-incoming), active when loading
    starts, and completed when done."""
    uri = tcp_uri()
    src = launch("src")
    dst = launch("dst", incoming="defer")
    async with session(dst) as d:
        await execute(d, "migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
        with d.listener("MIGRATION") as listener:
            await execute(d, "migrate-incoming", {"uri": uri})
            await migrate(src, dst, uri)
            events = await collect(listener, lambda e: e["data"]["status"] in ("completed", "failed"), 10)
    statuses = [e["data"]["status"] for e in events]
    assert statuses == ["setup", "active", "completed"], f"destination MIGRATION statuses {statuses}"
