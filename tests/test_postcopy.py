"""Postcopy live migration between tern processes, driven over QMP with qemu.qmp.

The guests have 256 MiB of RAM and a working set that they rewrite faster than the link carries
it (downtime-limit 1 ms on top), so pre-copy can never converge and only the switch to postcopy
ends the migration. Each migration is checked from both ends: the statuses (polled and as
MIGRATION events, with the MIGRATION_PASS events before the switch), the source's query-migrate
(`ram.postcopy-requests`, `downtime`), the destination's (`x-postcopy-faults`), the run states
during postcopy (the guest runs on the destination, never again on the source), and the guest:
with the destination held paused (-S) its RAM must equal the source's (x-query-memory-digest);
running, the guest's own self-check must pass on the destination (pass numbers carried on from
the source, every line ok, no CORRUPT line: a page lost or stale in postcopy is caught by the
guest's sweep, a page never delivered stalls it).

Covered: migrate-start-postcopy after the first pass over tcp and unix, -smp 1 and 2, and into a
paused destination; the automatic switch (x-postcopy-after-passes); the QMP refusals and the
capability rules; cancel before the switch and its refusal after; a link cut during postcopy
(a Python proxy between the two, then migrate-recover and migrate resume directly) into a
running and a paused destination; a source killed during postcopy; and hostile return-path
messages from a fake destination (this test plays it: it drains the stream and writes crafted
messages back on the same socket), each of which must fail the migration with its reason while
the source's guest runs on; and a fake destination that stops reading once postcopy has started,
which must not wedge the source (QMP answers, migrate-pause breaks the link).

Skipped, loudly, without /dev/kvm or the tern binary (TERN_BINARY, default .build/debug/tern).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import socket
import struct
import tempfile
import termios
import threading
import time
from typing import Callable, Optional

import pytest

from migration_support import (
    LinkProxy,
    EventLog,
    CONFIGURATION, END, PING, RP_FAILED, RP_LOADED, RP_PONG, RP_REQ_PAGES, SLOW, STEP, UNLIMITED, VM,
    StreamFollower, asynctest, execute, execute_error, free_tcp_port, request_pages, return_path_message,
    session, skip_reason, status, wait_migration, wait_status,
)
from test_capabilities import set_capabilities
from test_migration import check_destination_guest, launch, tcp_uri  # noqa: F401 - launch is a fixture

_SKIP = skip_reason()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

MiB = 1 << 20
GiB = 1 << 30
POSTCOPY_MEMORY = "256M"
POSTCOPY_MEMORY_BYTES = 256 * MiB
#: 128 MiB rewritten at 96 MiB/s over a 64 MiB/s link: each pass takes about 2 s, and the
#: whole working set is dirty again at the switch (about 2 s of postcopy).
APPEND = "wss=128M rate=96M"
BANDWIDTH = 64 * MiB
#: For the tests that act during postcopy: the switch comes at once, then about 3 s of
#: postcopy, because SLOW_POSTCOPY also caps the background pages (max-postcopy-bandwidth;
#: unlimited, postcopy ended within 0.6 s on a quiet machine, before a test could act).
SLOW_APPEND = "wss=96M rate=64M"
SLOW_BANDWIDTH = 32 * MiB
SLOW_POSTCOPY = {"max-postcopy-bandwidth": SLOW_BANDWIDTH}
#: A source whose migration to a fake destination stays active for seconds (64 MiB at 20 MiB/s).
FAKE_APPEND = "wss=64M rate=16M"
FAKE_BANDWIDTH = 20 * MiB
#: The working set's first page (guest/README.md's memory map).
WORKING_SET_BASE = 0x1000000

ENABLE_FIRST = "Enable postcopy with migration_set_capability before the start of migration"
NOT_STARTED = "Postcopy must be started after migration has been started"
NO_RETURN_PATH = "Unable to open return-path for postcopy"
NOTHING_PAUSED = "Cannot resume if there is no paused migration"
RECOVER_NOT_PAUSED = "Migrate recover can only be run when postcopy is paused."
NO_CANCEL = "Postcopy has started: the guest runs on the destination and cannot be cancelled"
IN_PROGRESS = "There's a migration process in progress"
OFF_HERE = "the source uses capability 'postcopy-ram' but it is off here"

#: What both ends report, as MIGRATION events, for a postcopy migration.
POSTCOPY_STATUSES = ["setup", "active", "postcopy-active", "completed"]
#: ... and for one whose link was cut during postcopy and recovered.
RECOVERED_STATUSES = ["setup", "active", "postcopy-active", "postcopy-paused", "postcopy-recover",
                      "postcopy-active", "completed"]


# ----- helpers -------------------------------------------------------------------------------

async def check_both_completed(s, d, src: VM, dst: VM, info: dict, incoming: dict, paused: bool) -> None:
    """Both ends completed as postcopy completes; a paused destination's RAM is the source's,
    a running one runs on."""
    await check_source_completed(s, src, info, requests_expected=not paused)
    check_incoming_completed(incoming, faults_expected=not paused)
    if paused:
        await compare_digests_and_continue(s, d, src, dst)
    else:
        await wait_status(d, dst, "running")


async def listen_for_postcopy(d, dst: VM, uri: str) -> None:
    """A deferred destination: postcopy-ram and events on before the stream can arrive."""
    assert await status(d) == "inmigrate"
    await set_capabilities(d, ["postcopy-ram", "events"])
    assert await execute(d, "migrate-incoming", {"uri": uri}) == {}
    if uri.startswith("unix:"):
        path = uri[len("unix:"):]
        await dst.until(lambda: os.path.exists(path), "the destination's listening socket")


async def prepare_source(s, src: VM, *, bandwidth: int, parameters: Optional[dict] = None) -> None:
    """postcopy-ram and events on; the bandwidth limit and downtime-limit 1 ms (so pre-copy cannot
    converge), plus `parameters`."""
    await src.wait_passes(1)
    await set_capabilities(s, ["postcopy-ram", "events"])
    values = {"max-bandwidth": bandwidth, "downtime-limit": 1}
    values.update(parameters or {})
    assert await execute(s, "migrate-set-parameters", values) == {}


async def wait_passes_done(s, src: VM, count: int, timeout: float = 20) -> int:
    """Waits, while the migration is in pre-copy, until `count` passes are done (the source's
    ram.dirty-sync-count); returns the count seen."""
    deadline = time.monotonic() + timeout
    while True:
        info = await execute(s, "query-migrate")
        assert info.get("status") in ("setup", "active"), \
            f"the migration left pre-copy before {count} passes were done: {info}" + src.diagnostics()
        done = info.get("ram", {}).get("dirty-sync-count", 0)
        if done >= count:
            return done
        assert time.monotonic() < deadline, f"{count} passes not done within {timeout:.0f} s: {info}" + src.diagnostics()
        await asyncio.sleep(0.05)


def check_faults(incoming: dict, *, expected: bool) -> dict:
    """The destination's x-postcopy-faults: count and latencies in microseconds."""
    faults = incoming.get("x-postcopy-faults")
    assert isinstance(faults, dict), f"the destination's query-migrate lacks x-postcopy-faults in postcopy: {incoming}"
    assert {"count", "p50-us", "p99-us", "max-us"} <= set(faults), f"x-postcopy-faults members: {faults}"
    assert isinstance(faults["count"], int) and faults["count"] >= 0, faults
    for name in ("p50-us", "p99-us", "max-us"):
        assert isinstance(faults[name], (int, float)) and faults[name] >= 0, faults
    if faults["count"] > 0:
        assert faults["p50-us"] <= faults["p99-us"] <= faults["max-us"], f"percentiles out of order: {faults}"
    if expected:
        assert faults["count"] >= 1 and faults["max-us"] > 0, \
            f"a guest running on the destination during postcopy must have faulted on missing pages: {faults}"
    return faults


async def check_source_completed(s, src: VM, info: dict, *, requests_expected: bool) -> None:
    """What a source that completed in postcopy must show; it ends postmigrate."""
    for member in ("total-time", "downtime", "setup-time", "ram"):
        assert member in info, f"completed query-migrate lacks {member!r}: {info}"
    ram = info["ram"]
    assert ram["total"] == POSTCOPY_MEMORY_BYTES and ram["remaining"] == 0 and ram["transferred"] > 0, info
    requests = ram.get("postcopy-requests")
    assert isinstance(requests, int) and requests >= 0, f"ram.postcopy-requests missing or not a count: {info}"
    if requests_expected:
        assert requests >= 1, f"the destination faulted, but the source served no page request: {info}"
    downtime = info["downtime"]
    assert isinstance(downtime, int) and 0 <= downtime <= info["total-time"] and downtime < 5000, \
        f"postcopy downtime (vCPU pause to device state sent) is implausible: {info}"
    await wait_status(s, src, "postmigrate")


def check_incoming_completed(incoming: dict, *, faults_expected: bool) -> None:
    assert incoming.get("status") == "completed", f"destination query-migrate: {incoming}"
    check_faults(incoming, expected=faults_expected)


async def follow_to_completion(s, d, src: VM, dst: VM, *, destination_runs: bool,
                               timeout: float = 30) -> tuple[dict, dict]:
    """Polls both ends until the source has completed, checking on the way (once each end is in
    postcopy-active): the source's ram.postcopy-requests, the destination's x-postcopy-faults,
    the destination's run state (running, or paused with -S), and, once the destination runs the
    guest, that the source no longer does. Returns both final query-migrate replies."""
    checked_source = checked_destination = False
    seen: list[tuple[str, str]] = []
    deadline = time.monotonic() + timeout
    while True:
        info = await execute(s, "query-migrate")
        incoming = await execute(d, "query-migrate")
        for side, reply in (("source", info), ("destination", incoming)):
            if reply.get("status") and (side, reply["status"]) not in seen:
                seen.append((side, reply["status"]))
        current = info.get("status")
        if current == "postcopy-active" and not checked_source:
            assert "postcopy-requests" in info.get("ram", {}), f"postcopy-active query-migrate lacks ram.postcopy-requests: {info}"
            checked_source = True
        if incoming.get("status") == "postcopy-active" and not checked_destination:
            check_faults(incoming, expected=False)
            run = await status(d)
            assert run == ("running" if destination_runs else "paused"), \
                f"the destination's run state in postcopy is {run!r}" + dst.diagnostics()
            run = await status(s)
            assert run != "running", f"the guest runs on both ends in postcopy (source: {run})" + src.diagnostics()
            checked_destination = True
        if current == "completed":
            break
        assert current not in ("failed", "cancelled", "postcopy-paused"), \
            f"the source's migration went {current}: {info}; seen {seen}" + src.diagnostics() + dst.diagnostics()
        assert incoming.get("status") not in ("failed", "postcopy-paused"), \
            f"the destination's migration went {incoming.get('status')}: {incoming}" + dst.diagnostics()
        assert time.monotonic() < deadline, \
            f"not completed within {timeout:.0f} s: {info}; destination {incoming}; seen {seen}" + src.diagnostics()
        await asyncio.sleep(0.1)
    assert checked_source and checked_destination, \
        f"postcopy-active was never seen on both ends (statuses seen: {seen}); was it shorter than 0.1 s?"
    incoming = await wait_migration(d, dst, timeout=10)
    return info, incoming


async def compare_digests_and_continue(s, d, src: VM, dst: VM) -> None:
    """The paused destination's RAM equals the completed source's; then it runs the guest on."""
    await wait_status(d, dst, "paused", timeout=10)
    source = await execute(s, "x-query-memory-digest", timeout=20)
    destination = await execute(d, "x-query-memory-digest", timeout=20)
    assert source["size"] == destination["size"] == POSTCOPY_MEMORY_BYTES, (source, destination)
    assert source["sha256"] == destination["sha256"], \
        f"guest RAM differs after postcopy: source {source}, destination {destination}" + dst.diagnostics()
    assert await execute(d, "cont") == {}
    await wait_status(d, dst, "running")


async def reach_postcopy(s, d, src: VM, dst: VM, uri: str) -> None:
    """Starts the source's migration to `uri`, asks for postcopy at once (the switch comes at the
    end of the first pass) and waits until both ends are postcopy-active."""
    assert await execute(s, "migrate", {"uri": uri}) == {}
    await wait_migration(s, src, wanted=("active",), timeout=10)
    assert await execute(s, "migrate-start-postcopy") == {}
    await wait_migration(s, src, wanted=("postcopy-active",), timeout=20)
    await wait_migration(d, dst, wanted=("postcopy-active",), timeout=10)


# ----- postcopy to completion ----------------------------------------------------------------

@pytest.mark.parametrize("transport,smp,paused", [
    pytest.param("tcp", 1, False, id="tcp-smp1"),
    pytest.param("unix", 2, False, id="unix-smp2"),
    pytest.param("tcp", 2, False, id="tcp-smp2"),
    pytest.param("unix", 1, False, id="unix-smp1"),
    pytest.param("tcp", 1, True, id="tcp-smp1-paused-destination"),
])
@asynctest
async def test_postcopy_completes(launch, transport, smp, paused):
    """migrate-start-postcopy once the first pass is done: the source switches at once (within the
    pass under way), the guest runs on the destination (faulting on pages it lacks, which the source
    sends on request) and both ends complete. Into a paused destination (-S) the guest waits
    while every page arrives, and the RAM must then be the source's."""
    src = launch("src", memory=POSTCOPY_MEMORY, append=APPEND, smp=smp)
    dst = launch("dst", memory=POSTCOPY_MEMORY, append=APPEND, smp=smp, incoming="defer", paused=paused)
    uri = tcp_uri() if transport == "tcp" else f"unix:{dst.workdir / 'migration.sock'}"
    async with session(src) as s, session(dst) as d:
        with s.listener(("MIGRATION", "MIGRATION_PASS")) as source_events, d.listener("MIGRATION") as destination_events:
            source_log, destination_log = EventLog(source_events), EventLog(destination_events)
            await listen_for_postcopy(d, dst, uri)
            await prepare_source(s, src, bandwidth=BANDWIDTH)
            assert await execute(s, "migrate", {"uri": uri}) == {}
            before = await wait_passes_done(s, src, 1)
            assert await execute(s, "migrate-start-postcopy") == {}
            after = (await execute(s, "query-migrate")).get("ram", {}).get("dirty-sync-count", 0)
            info, incoming = await follow_to_completion(s, d, src, dst, destination_runs=not paused)
            await source_log.wait_for("completed")
            await destination_log.wait_for("completed")
            assert source_log.statuses() == POSTCOPY_STATUSES, f"source MIGRATION statuses: {source_log.events}"
            assert destination_log.statuses() == POSTCOPY_STATUSES, \
                f"destination MIGRATION statuses: {destination_log.events}"
            passes = source_log.passes_before("postcopy-active")
            assert passes and passes == list(range(1, len(passes) + 1)), \
                f"MIGRATION_PASS events before the switch: {passes}; events {source_log.events}"
            assert before <= passes[-1] <= max(before, after) + 1, \
                (f"postcopy was requested after pass {before}, so the switch comes at once (QEMU's loop checks "
                 f"the request at every iteration); the passes before it were {passes}")
            await check_both_completed(s, d, src, dst, info, incoming, paused)
    await check_destination_guest(src, dst)


@asynctest
async def test_postcopy_after_passes(launch):
    """x-postcopy-after-passes 2: without migrate-start-postcopy, a migration that does not
    converge switches to postcopy by itself after its second pass, and completes."""
    uri = tcp_uri()
    src = launch("src", memory=POSTCOPY_MEMORY, append=APPEND)
    dst = launch("dst", memory=POSTCOPY_MEMORY, append=APPEND, incoming="defer")
    async with session(src) as s, session(dst) as d:
        with s.listener(("MIGRATION", "MIGRATION_PASS")) as source_events:
            source_log = EventLog(source_events)
            await listen_for_postcopy(d, dst, uri)
            await prepare_source(s, src, bandwidth=BANDWIDTH, parameters={"x-postcopy-after-passes": 2})
            assert (await execute(s, "query-migrate-parameters"))["x-postcopy-after-passes"] == 2
            assert await execute(s, "migrate", {"uri": uri}) == {}
            info, incoming = await follow_to_completion(s, d, src, dst, destination_runs=True)
            await source_log.wait_for("completed")
            assert source_log.statuses() == POSTCOPY_STATUSES, f"source MIGRATION statuses: {source_log.events}"
            assert source_log.passes_before("postcopy-active") == [1, 2], \
                f"x-postcopy-after-passes 2 should switch after the second pass: {source_log.events}"
            await check_source_completed(s, src, info, requests_expected=True)
            check_incoming_completed(incoming, faults_expected=True)
            await wait_status(d, dst, "running")
    await check_destination_guest(src, dst)


# ----- QMP: capabilities, parameters, refusals -----------------------------------------------

async def capability_states(q) -> dict:
    return {c["capability"]: c["state"] for c in await execute(q, "query-migrate-capabilities")}


def capabilities(*pairs) -> dict:
    return {"capabilities": [{"capability": name, "state": state} for name, state in pairs]}


@asynctest
async def test_postcopy_commands(launch):
    """The two capability names are one capability; compress turns it off again; the parameter's
    range; migrate-start-postcopy, migrate resume and migrate-recover refused when they cannot
    apply, with nothing started."""
    vm = launch("vm")
    dst = launch("dst", incoming="defer")
    async with session(vm) as q:
        listed = await capability_states(q)
        assert listed.get("postcopy-ram") is False and listed.get("x-postcopy-ram") is False, \
            f"query-migrate-capabilities must list postcopy-ram and x-postcopy-ram, both off: {listed}"
        await execute_error(q, "migrate-start-postcopy", desc=ENABLE_FIRST)
        for name, other in (("postcopy-ram", "x-postcopy-ram"), ("x-postcopy-ram", "postcopy-ram")):
            assert await execute(q, "migrate-set-capabilities", capabilities((name, True))) == {}
            listed = await capability_states(q)
            assert listed[name] is True and listed[other] is True, f"setting {name} must set {other} too: {listed}"
            assert await execute(q, "migrate-set-capabilities", capabilities((other, False))) == {}
            listed = await capability_states(q)
            assert listed[name] is False and listed[other] is False, f"clearing {other} must clear {name}: {listed}"
        await set_capabilities(q, ["postcopy-ram"])
        await execute_error(q, "migrate-start-postcopy", desc=NOT_STARTED)
        # Postcopy is not compatible with compression: turning compress on turns postcopy off,
        # however the two arrive, and the reply is still {}.
        for changes in ([("compress", True)], [("postcopy-ram", True)],
                        [("compress", False), ("postcopy-ram", True), ("compress", True)]):
            assert await execute(q, "migrate-set-capabilities", capabilities(*changes)) == {}
            listed = await capability_states(q)
            assert listed["compress"] is True and listed["postcopy-ram"] is False and listed["x-postcopy-ram"] is False, \
                f"after {changes}, compress must have turned postcopy off: {listed}"
        assert await execute(q, "migrate-set-capabilities", capabilities(("compress", False), ("postcopy-ram", True))) == {}
        listed = await capability_states(q)
        assert listed["postcopy-ram"] is True and listed["compress"] is False, listed
        # x-postcopy-after-passes: 0 (only on request) by default, 0..1000.
        before = await execute(q, "query-migrate-parameters")
        assert before.get("x-postcopy-after-passes") == 0, f"x-postcopy-after-passes should default to 0: {before}"
        for bad in (-1, 1001, "2"):
            await execute_error(q, "migrate-set-parameters", {"x-postcopy-after-passes": bad})
            assert await execute(q, "query-migrate-parameters") == before, f"a refused {bad!r} changed the parameters"
        for good in (1000, 1, 0):
            assert await execute(q, "migrate-set-parameters", {"x-postcopy-after-passes": good}) == {}
            assert (await execute(q, "query-migrate-parameters"))["x-postcopy-after-passes"] == good
        # Nothing is paused: resume and recover are refused, and nothing starts.
        await execute_error(q, "migrate", {"uri": tcp_uri(), "resume": True}, desc=NOTHING_PAUSED)
        assert await execute(q, "query-migrate") == {}, "a refused resume must not start a migration"
        await execute_error(q, "migrate-recover", {"uri": tcp_uri()}, desc=RECOVER_NOT_PAUSED)
        await execute_error(q, "migrate-start-postcopy", desc=NOT_STARTED)
        assert await status(q) == "running"
    async with session(dst) as d:
        await set_capabilities(d, ["postcopy-ram"])
        await execute_error(d, "migrate-recover", {"uri": tcp_uri()}, desc=RECOVER_NOT_PAUSED)
        await execute_error(d, "migrate", {"uri": tcp_uri(), "resume": True}, desc=NOTHING_PAUSED)
        assert await status(d) == "inmigrate"
    assert vm.alive() and dst.alive()


@asynctest
async def test_postcopy_needs_return_path(launch, tmp_path):
    """Postcopy's page requests need a return path, which a pipe cannot carry: migrate to exec:
    (or to an fd: that is a pipe) with postcopy-ram on is refused and the guest runs on."""
    vm = launch("src")
    async with session(vm) as q:
        await vm.wait_passes(1)
        await set_capabilities(q, ["postcopy-ram"])
        await execute_error(q, "migrate", {"uri": f"exec:cat > {tmp_path / 'stream'}"}, desc=NO_RETURN_PATH)
        info = await execute(q, "query-migrate")
        assert info.get("status") not in ("setup", "active", "postcopy-active"), \
            f"a refused migrate must not leave a migration running: {info}"
        assert await status(q) == "running"
        read_end, write_end = os.pipe()
        try:
            q.send_fd_scm(write_end)
            assert await execute(q, "getfd", {"fdname": "pipe"}) == {}
        finally:
            os.close(write_end)
        try:
            await execute_error(q, "migrate", {"uri": "fd:pipe"}, desc=NO_RETURN_PATH)
        finally:
            os.close(read_end)
        assert await status(q) == "running"
        seen = len(vm.passes())
        await vm.wait_passes(2, after=seen, timeout=10)
        vm.assert_healthy()


@asynctest
async def test_destination_must_enable_postcopy(launch):
    """A destination without postcopy-ram refuses a source that uses it, at the configuration
    record: the source's migration fails naming the capability, its guest runs on, and the
    destination fails its load and exits 1."""
    uri = tcp_uri()
    src = launch("src")
    dst = launch("dst", incoming="defer")
    dst.expect_exit = True
    async with session(dst) as d:
        assert await execute(d, "migrate-incoming", {"uri": uri}) == {}
    async with session(src) as s:
        await src.wait_passes(1)
        await set_capabilities(s, ["postcopy-ram"])
        assert await execute(s, "migrate-set-parameters", {"max-bandwidth": SLOW}) == {}
        assert await execute(s, "migrate", {"uri": uri}) == {}
        info = await wait_migration(s, src, wanted=("failed",), timeout=15)
        assert OFF_HERE in info.get("error-desc", ""), f"the error-desc should name the capability: {info}"
        await wait_status(s, src, "running")
        seen = len(src.passes())
        await src.wait_passes(2, after=seen, timeout=10)
        src.assert_healthy()
    rc = await dst.wait_exit(timeout=10)
    assert rc == 1 and "load of migration failed" in dst.stderr_text() and OFF_HERE in dst.stderr_text(), \
        f"the destination should fail its load naming postcopy-ram, exit status {rc}" + dst.diagnostics()


@asynctest
async def test_cancel_before_switch(launch):
    """With postcopy-ram on but no switch asked for (and x-postcopy-after-passes 0), a migration
    that cannot converge stays in pre-copy pass after pass, and migrate_cancel cancels it as in
    pre-copy: the source's guest runs on, the destination fails its load."""
    uri = tcp_uri()
    append = "wss=16M rate=64M"
    src = launch("src", append=append)
    dst = launch("dst", append=append, incoming="defer")
    dst.expect_exit = True
    async with session(dst) as d:
        await listen_for_postcopy(d, dst, uri)
    async with session(src) as s:
        with s.listener("MIGRATION") as events:
            log = EventLog(events)
            await prepare_source(s, src, bandwidth=16 * MiB, parameters={"downtime-limit": 0})
            assert await execute(s, "migrate", {"uri": uri}) == {}
            await wait_passes_done(s, src, 3)
            assert (await execute(s, "query-migrate"))["status"] == "active"
            assert await status(s) == "running"
            assert await execute(s, "migrate_cancel") == {}
            await wait_migration(s, src, wanted=("cancelled",), timeout=10)
            await wait_status(s, src, "running")
            await log.wait_for("cancelled")
            assert log.statuses() == ["setup", "active", "cancelling", "cancelled"], log.events
            seen = len(src.passes())
            await src.wait_passes(3, after=seen, timeout=10)
            src.assert_healthy()
    rc = await dst.wait_exit(timeout=10)
    assert rc == 1 and "load of migration failed" in dst.stderr_text(), \
        f"a destination whose source cancelled before postcopy should fail its load and exit 1, got {rc}" + dst.diagnostics()


@asynctest
async def test_cancel_refused_during_postcopy(launch):
    """Once postcopy has started the guest runs on the destination: migrate_cancel is refused
    (as are another migrate, a resume, a capability change and migrate-recover), the migration
    goes on undisturbed and completes."""
    uri = tcp_uri()
    src = launch("src", memory=POSTCOPY_MEMORY, append=SLOW_APPEND)
    dst = launch("dst", memory=POSTCOPY_MEMORY, append=SLOW_APPEND, incoming="defer")
    async with session(src) as s, session(dst) as d:
        with s.listener("MIGRATION") as source_events:
            source_log = EventLog(source_events)
            await listen_for_postcopy(d, dst, uri)
            await prepare_source(s, src, bandwidth=SLOW_BANDWIDTH, parameters=SLOW_POSTCOPY)
            await reach_postcopy(s, d, src, dst, uri)
            await execute_error(s, "migrate_cancel", desc=NO_CANCEL)
            assert (await execute(s, "query-migrate"))["status"] == "postcopy-active", "the refused cancel changed the status"
            await execute_error(s, "migrate", {"uri": tcp_uri(), "resume": True}, desc=NOTHING_PAUSED)
            await execute_error(s, "migrate", {"uri": tcp_uri()}, desc=IN_PROGRESS)
            await execute_error(s, "migrate-set-capabilities", capabilities(("xbzrle", False)), desc=IN_PROGRESS)
            await execute_error(d, "migrate-recover", {"uri": tcp_uri()}, desc=RECOVER_NOT_PAUSED)
            assert await execute(s, "migrate-start-postcopy") == {}, "asking again during postcopy is not an error"
            assert (await execute(s, "query-migrate"))["status"] == "postcopy-active", \
                "the postcopy phase should last seconds at this bandwidth; it ended during the refusals"
            assert await execute(s, "migrate-set-parameters", {"max-bandwidth": UNLIMITED}) == {}
            info = await wait_migration(s, src, timeout=30)
            incoming = await wait_migration(d, dst, timeout=10)
            await source_log.wait_for("completed")
            assert source_log.statuses() == POSTCOPY_STATUSES, f"source MIGRATION statuses: {source_log.events}"
            await check_source_completed(s, src, info, requests_expected=True)
            check_incoming_completed(incoming, faults_expected=True)
            await wait_status(d, dst, "running")
    await check_destination_guest(src, dst)


# ----- a broken link, a dead source ----------------------------------------------------------

@pytest.mark.parametrize("destination", ["running", "paused"])
@asynctest
async def test_link_cut_and_recovery(launch, destination):
    """The link breaks during postcopy (a proxy between the two is cut): both ends go
    postcopy-paused, say why, stay alive and answer QMP, and the source's guest stays stopped.
    migrate-recover on the destination and migrate resume on the source, directly to it, go
    back to postcopy-active and complete, with the guest intact: running, its self-check passes
    (pages lost in flight at the cut were sent again); paused, its RAM is the source's."""
    paused = destination == "paused"
    destination_port = free_tcp_port()
    src = launch("src", memory=POSTCOPY_MEMORY, append=SLOW_APPEND)
    dst = launch("dst", memory=POSTCOPY_MEMORY, append=SLOW_APPEND, incoming="defer", paused=paused)
    proxy: Optional[LinkProxy] = None
    try:
        async with session(src) as s, session(dst) as d:
            with s.listener("MIGRATION") as source_events, d.listener("MIGRATION") as destination_events:
                source_log, destination_log = EventLog(source_events), EventLog(destination_events)
                await listen_for_postcopy(d, dst, f"tcp:127.0.0.1:{destination_port}")
                proxy = LinkProxy(destination_port)
                await prepare_source(s, src, bandwidth=SLOW_BANDWIDTH, parameters=SLOW_POSTCOPY)
                await reach_postcopy(s, d, src, dst, proxy.uri)
                await asyncio.sleep(0.5)  # pages and page requests in flight
                info = await execute(s, "query-migrate")
                assert info["status"] == "postcopy-active", \
                    f"postcopy ended before the link could be cut; the test needs a slower link: {info}"
                proxy.cut()
                source_paused = await wait_migration(s, src, wanted=("postcopy-paused",), timeout=10)
                destination_paused = await wait_migration(d, dst, wanted=("postcopy-paused",), timeout=10)
                for side, reply in (("source", source_paused), ("destination", destination_paused)):
                    assert isinstance(reply.get("error-desc"), str) and reply["error-desc"], \
                        f"the {side}'s postcopy-paused query-migrate should say why (error-desc): {reply}"
                await asyncio.sleep(1)
                for side, q, vm in (("source", s, src), ("destination", d, dst)):
                    assert vm.alive(), f"the {side} exited after the link broke" + vm.diagnostics()
                    assert (await execute(q, "query-migrate"))["status"] == "postcopy-paused", f"the {side} left postcopy-paused"
                    assert isinstance(await status(q), str)
                run = await status(s)
                assert run != "running", f"the source's guest runs again after postcopy started ({run})" + src.diagnostics()
                recover = tcp_uri()
                assert await execute(d, "migrate-recover", {"uri": recover}) == {}
                assert await execute(s, "migrate", {"uri": recover, "resume": True}) == {}
                info = await wait_migration(s, src, timeout=30)
                incoming = await wait_migration(d, dst, timeout=15)
                await source_log.wait_for("completed")
                await destination_log.wait_for("completed")
                assert source_log.statuses() == RECOVERED_STATUSES, f"source MIGRATION statuses: {source_log.events}"
                assert destination_log.statuses() == RECOVERED_STATUSES, \
                    f"destination MIGRATION statuses: {destination_log.events}"
                await check_both_completed(s, d, src, dst, info, incoming, paused)
        await check_destination_guest(src, dst)
    finally:
        if proxy is not None:
            proxy.cut()


@asynctest
async def test_source_killed_during_postcopy(launch):
    """SIGKILL to the source during postcopy: the destination holds the running guest and its
    missing pages are gone with the source, so it must not exit: it goes postcopy-paused, says
    the source is lost, answers QMP, and still accepts migrate-recover."""
    uri = tcp_uri()
    src = launch("src", memory=POSTCOPY_MEMORY, append=SLOW_APPEND)
    dst = launch("dst", memory=POSTCOPY_MEMORY, append=SLOW_APPEND, incoming="defer")
    async with session(dst) as d:
        await listen_for_postcopy(d, dst, uri)
        async with session(src) as s:
            await prepare_source(s, src, bandwidth=SLOW_BANDWIDTH, parameters=SLOW_POSTCOPY)
            await reach_postcopy(s, d, src, dst, uri)
            await asyncio.sleep(0.3)
            assert (await execute(s, "query-migrate"))["status"] == "postcopy-active", \
                "postcopy ended before the source could be killed; the test needs a slower link"
        src.kill()
        paused = await wait_migration(d, dst, wanted=("postcopy-paused",), timeout=10)
        desc = paused.get("error-desc")
        assert isinstance(desc, str) and "source" in desc.lower(), \
            f"the destination's error-desc should say the source was lost: {paused}"
        assert isinstance(await status(d), str)
        await asyncio.sleep(1.5)
        assert dst.alive(), "the destination exited after its source died in postcopy" + dst.diagnostics()
        again = await execute(d, "query-migrate")
        assert again["status"] == "postcopy-paused", f"the destination left postcopy-paused with no source: {again}"
        assert await execute(d, "migrate-recover", {"uri": tcp_uri()}) == {}
        assert isinstance(await status(d), str)
    assert dst.alive(), dst.diagnostics()


# ----- a hostile destination -----------------------------------------------------------------

class FakeDestination:
    """Plays a migration destination, to send the source return-path messages a tern destination
    never would: listens on tcp or unix, accepts the source's connection, and drains the stream in
    a thread (following it record by record). It behaves as tern's destination does where that
    costs nothing: PONG for each PING, LOADED once the END record is in, so a migration to it can
    complete. `send` writes raw bytes back on the same socket."""

    def __init__(self, transport: str = "tcp"):
        self.workdir: Optional[str] = None
        if transport == "tcp":
            self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.listener.bind(("127.0.0.1", 0))
            self.uri = f"tcp:127.0.0.1:{self.listener.getsockname()[1]}"
        else:
            self.workdir = tempfile.mkdtemp(prefix="tern-fake-", dir="/tmp")
            path = os.path.join(self.workdir, "fake.sock")
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(path)
            self.uri = f"unix:{path}"
        self.listener.listen(1)
        self.listener.settimeout(20)
        self.connection: Optional[socket.socket] = None
        self.connected = threading.Event()
        self.finished = threading.Event()
        self.send_lock = threading.Lock()
        self.follower = StreamFollower(self._record, keep=(PING, END))
        self.problem: Optional[str] = None
        self.thread = threading.Thread(target=self._run, name="fake-destination", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            try:
                connection, _ = self.listener.accept()
            except OSError as error:
                self.problem = f"no source connected: {error}"
                return
            connection.settimeout(None)
            self.connection = connection
            self.connected.set()
            while True:
                try:
                    chunk = connection.recv(1 << 20)
                except OSError:
                    break
                if not chunk:
                    break
                self.follower.feed(chunk)
        finally:
            self.finished.set()

    def _record(self, kind: int, body: bytes) -> None:
        with contextlib.suppress(OSError):
            if kind == PING and len(body) == 4:
                self.send(return_path_message(RP_PONG, body))
            elif kind == END:
                self.send(return_path_message(RP_LOADED))

    def send(self, data: bytes) -> None:
        assert self.connection is not None, "no source has connected"
        with self.send_lock:
            self.connection.sendall(data)

    async def until(self, condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, \
                f"fake destination: no {what} within {timeout:.0f} s ({self.problem or self.follower.error or 'waiting'})"
            await asyncio.sleep(0.02)

    def close(self) -> None:
        for sock in (self.connection, self.listener):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(timeout=5)
        for sock in (self.connection, self.listener):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


async def migrate_to_fake(s, src: VM, fake: FakeDestination) -> None:
    """A postcopy-ram source migrating slowly to `fake`: active, its configuration record in."""
    await src.wait_passes(1)
    await set_capabilities(s, ["postcopy-ram"])
    assert await execute(s, "migrate-set-parameters", {"max-bandwidth": FAKE_BANDWIDTH}) == {}
    assert await execute(s, "migrate", {"uri": fake.uri}) == {}
    await fake.until(fake.connected.is_set, "connection from the source")
    await wait_migration(s, src, wanted=("active",), timeout=10)
    await fake.until(lambda: fake.follower.counts.get(CONFIGURATION, 0) == 1, "configuration record")


#: Return-path messages a destination must never send, and what the source's error-desc must
#: then say (compared case-insensitively).
HOSTILE_MESSAGES = {
    "misaligned-request": (request_pages(4097, 4096), "Misaligned page request"),
    "request-outside-ram": (request_pages(POSTCOPY_MEMORY_BYTES, 4096), "outside guest RAM"),
    "request-too-long": (request_pages(0, GiB), "too long"),
    "request-wrong-length": (return_path_message(RP_REQ_PAGES, struct.pack("<QI", 0, 4096)[:11]), "length"),
    "unknown-type": (return_path_message(99, b"\x00" * 4), "unknown return-path message type"),
    "bad-checksum": (request_pages(0, 4096, bad_checksum=True), "checksum"),
    # Not hostile: a refusal, as a destination sends it. It shows that the framing above is what
    # the source reads (a framing mistake here would fail on the checksum instead).
    "refusal": (return_path_message(RP_FAILED, b"the fake destination says no"), "the fake destination says no"),
}


@pytest.mark.parametrize("case", list(HOSTILE_MESSAGES))
@asynctest
async def test_hostile_return_path_message(launch, case):
    """A bad message on the return path fails the migration with its reason; the source neither
    crashes nor stops its guest, which runs on with its self-check passing."""
    message, reason = HOSTILE_MESSAGES[case]
    src = launch("src", memory=POSTCOPY_MEMORY, append=FAKE_APPEND)
    fake = FakeDestination()
    try:
        async with session(src) as s:
            await migrate_to_fake(s, src, fake)
            fake.send(message)
            info = await wait_migration(s, src, wanted=("failed",), timeout=10)
            desc = info.get("error-desc", "")
            assert reason.lower() in desc.lower(), f"{case}: the error-desc should say {reason!r}: {info}" + src.diagnostics()
            await wait_status(s, src, "running")
            seen = len(src.passes())
            await src.wait_passes(2, after=seen, timeout=10)
            src.assert_healthy()
            assert await status(s) == "running"
    finally:
        fake.close()
    assert src.alive(), src.diagnostics()


@asynctest
async def test_valid_page_request_before_switchover(launch):
    """Page requests that are well formed do not fail a migration that has not switched yet (the
    source serves or ignores them): it stays active, and, with the bandwidth limit lifted, it
    completes against the fake destination's LOADED."""
    src = launch("src", memory=POSTCOPY_MEMORY, append=FAKE_APPEND)
    fake = FakeDestination()
    try:
        async with session(src) as s:
            await migrate_to_fake(s, src, fake)
            fake.send(request_pages(0, 4096))
            fake.send(request_pages(WORKING_SET_BASE, 2 * 4096))
            until = time.monotonic() + 1.5
            while time.monotonic() < until:
                info = await execute(s, "query-migrate")
                assert info.get("status") == "active", f"well-formed page requests disturbed the migration: {info}" + src.diagnostics()
                await asyncio.sleep(0.1)
            assert await execute(s, "migrate-set-parameters", {"max-bandwidth": UNLIMITED}) == {}
            info = await wait_migration(s, src, timeout=30)
            assert fake.follower.ended and fake.follower.error is None, \
                f"the source completed, but the fake destination saw no END record ({fake.follower.error})"
            await wait_status(s, src, "postmigrate")
    finally:
        fake.close()


# ----- a stalled destination -----------------------------------------------------------------

#: The record that closes the switchover package (MigrationStreamFormat.swift): once it is in,
#: the destination runs the guest.
POSTCOPY_RUN = 0x07


class StalledDestination(FakeDestination):
    """A fake destination that stops reading once the POSTCOPY_RUN record is in, and keeps the
    socket open: its thread waits in the record callback until close(). The guest is then the
    destination's, and whatever the source sends after it piles up unread in the socket."""

    def __init__(self, transport: str = "tcp"):
        super().__init__(transport)
        self.stalled = threading.Event()
        self.release = threading.Event()
        # Nothing arrives before the test migrates, so the follower is replaced in time.
        self.follower = StreamFollower(self._record, keep=(PING, END, POSTCOPY_RUN))

    def _record(self, kind: int, body: bytes) -> None:
        if kind == POSTCOPY_RUN and not self.stalled.is_set():
            self.stalled.set()
            self.release.wait(timeout=60)
            return
        super()._record(kind, body)

    def unread(self) -> int:
        """Bytes the source has sent that wait, unread, in the fake's socket."""
        assert self.connection is not None, "no source has connected"
        return struct.unpack("i", fcntl.ioctl(self.connection.fileno(), termios.FIONREAD, b"\0" * 4))[0]

    def close(self) -> None:
        self.release.set()
        super().close()


@asynctest
async def test_stalled_destination_does_not_wedge_the_source(launch):
    """A destination that stops reading once postcopy has started (the socket stays open, nothing
    comes back) blocks the source's sends, but must not wedge the source: QMP answers at once,
    migrate_cancel is refused (the guest runs on the destination), and migrate-pause breaks the
    link, so the source goes postcopy-paused with its reason, stays alive, and does not run the
    guest again."""
    src = launch("src", memory=POSTCOPY_MEMORY, append=FAKE_APPEND)
    fake = StalledDestination()
    try:
        async with session(src) as s:
            assert await execute(s, "migrate-set-parameters", {"max-postcopy-bandwidth": 0}) == {}
            await migrate_to_fake(s, src, fake)
            await wait_passes_done(s, src, 1)
            assert await execute(s, "migrate-start-postcopy") == {}
            await fake.until(fake.stalled.is_set, "POSTCOPY_RUN record", timeout=20)
            await wait_migration(s, src, wanted=("postcopy-active",), timeout=10)
            await fake.until(lambda: fake.unread() >= 64 * 1024, "backlog of unread pages from the source")
            for _ in range(5):
                try:
                    info = await execute(s, "query-migrate", timeout=1)
                except asyncio.TimeoutError:
                    raise AssertionError("query-migrate went unanswered for 1 s while the source's sends to a "
                                         f"stalled destination block ({fake.unread()} bytes unread)"
                                         + src.diagnostics()) from None
                assert info.get("status") == "postcopy-active", \
                    f"the source left postcopy-active with its destination stalled: {info}" + src.diagnostics()
                await asyncio.sleep(0.2)
            run = await status(s)
            assert run != "running", f"the guest runs on the source after postcopy started ({run})" + src.diagnostics()
            await execute_error(s, "migrate_cancel", desc=NO_CANCEL)
            assert (await execute(s, "query-migrate"))["status"] == "postcopy-active", "the refused cancel changed the status"
            assert await execute(s, "migrate-pause") == {}
            try:
                paused = await wait_migration(s, src, wanted=("postcopy-paused",), timeout=5)
            except AssertionError as error:
                raise AssertionError(f"migrate-pause did not break the link to the stalled destination: {error}") from None
            desc = paused.get("error-desc")
            assert isinstance(desc, str) and desc, f"the source's postcopy-paused query-migrate should say why (error-desc): {paused}"
            await asyncio.sleep(1)
            assert src.alive(), "the source exited after migrate-pause" + src.diagnostics()
            again = await execute(s, "query-migrate")
            assert again["status"] == "postcopy-paused", f"the source left postcopy-paused: {again}" + src.diagnostics()
            run = await status(s)
            assert run != "running", f"the source's guest runs again after postcopy started ({run})" + src.diagnostics()
    finally:
        fake.close()
    assert src.alive(), src.diagnostics()
