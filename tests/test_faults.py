"""Fault injection: real tern processes migrating while something goes wrong at a random point.

Each test says what it injects and checks what must survive: the source's guest runs on with
its self-check passing, or the destination's does, never neither (a killed source excepted:
then the destination either holds the whole guest or refuses to run a partial one). Run state
and vCPU reality must agree (a `running` machine's vCPU threads are on a CPU, a stopped one's
are not), and a long-lived source holds no more descriptors or threads after many migrations
than before.

The random points come from one seed, printed in each test's output; set TERN_FAULT_SEED to
replay a run. bench/soak runs the same faults for as long as you like.

Skipped, loudly, without /dev/kvm or the tern binary (TERN_BINARY, default .build/debug/tern).
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import subprocess
import tempfile
import threading
import time

import pytest
from qemu.qmp import ExecuteError

from migration_support import (END, UNLIMITED, VM, asynctest, execute, execute_error, session, skip_reason, status,
                               wait_status)
from test_migration import launch, tcp_uri  # noqa: F401 - launch is a fixture
from test_postcopy import FakeDestination

_SKIP = skip_reason()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

FINAL = ("completed", "failed", "cancelled")
#: A small guest that keeps dirtying and checking its memory (the rest of its RAM is zero pages,
#: which cost the link almost nothing) ...
SMALL = dict(memory="64M", append="wss=16M rate=16M")
#: ... migrated at 32 MiB/s: about 0.6 s, so random points in the first 0.8 s land in setup,
#: active and completion.
SMALL_BANDWIDTH = 32 << 20
FAULT_WINDOW = 0.8


def fault_seed() -> int:
    seed = int(os.environ.get("TERN_FAULT_SEED", "0")) or random.randrange(1, 1 << 31)
    print(f"fault seed {seed} (TERN_FAULT_SEED={seed} replays it)")
    return seed


async def final_status(qmp, vm: VM, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = await execute(qmp, "query-migrate")
        if info.get("status") in FINAL:
            return info
        assert time.monotonic() < deadline, f"{vm.label}: migration not over after {timeout} s: {info}" + vm.diagnostics()
        await asyncio.sleep(0.02)


async def assert_state_matches_vcpus(qmp, vm: VM) -> str:
    """query-status and what the vCPU threads do agree; returns the status."""
    reported = await execute(qmp, "query-status")
    busy = await vm.vcpu_busy_fraction(0.5)
    again = await execute(qmp, "query-status")
    if reported["status"] != again["status"]:
        return again["status"]  # it changed while we watched (a late request): nothing to compare
    if reported["running"]:
        assert busy > 0.4, f"{vm.label} says {reported['status']} but its vCPUs ran {busy:.0%} of the time" + vm.diagnostics()
    else:
        assert busy < 0.1, f"{vm.label} says {reported['status']} but its vCPUs ran {busy:.0%} of the time" + vm.diagnostics()
    return reported["status"]


async def guest_runs_on(qmp, vm: VM, lines: int = 2, timeout: float = 15) -> None:
    """`cont` (the guest may have been left paused) and wait for `lines` more pass lines from a
    guest whose self-check passes (a system_reset may have restarted it: it counts afresh)."""
    await execute(qmp, "cont")
    await wait_status(qmp, vm, "running")
    seen = len(vm.passes())
    await vm.wait_passes(lines, after=seen, timeout=timeout)
    vm.assert_healthy()


async def listening(dst: VM) -> None:
    """Waits until a destination listens for the migration (its QMP socket comes first)."""
    await dst.until(lambda: "incoming: waiting on" in dst.stderr_text(), f"{dst.label} to listen")


def retire(vm: VM) -> None:
    """Stops a process the test is done with (the launch fixture would call its exit a death)."""
    vm.expect_exit = True
    vm.stop()
    vm.remove()


def counts(pid: int) -> tuple[int, int]:
    """Open descriptors and threads of a process."""
    return len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))


# ----- requests that change the machine's life, racing a migration -----------------------------

async def chaos(vm: VM, rng: random.Random, done: asyncio.Event, log: list[str]) -> None:
    """A second QMP client, as a user at another terminal: stop, cont and system_reset at random
    every few milliseconds. Refusals are answers too; only a missing answer is a failure."""
    async with session(vm, "chaos") as c:
        while not done.is_set():
            # Each round sends all three in a random order, so even a short migration meets
            # every kind (a random pick of each left out system_reset in 14 picks, CI 2026-12-06).
            commands = ["stop", "cont", "system_reset"]
            rng.shuffle(commands)
            for command in commands:
                try:
                    await execute(c, command)
                    log.append(command)
                except ExecuteError as error:
                    log.append(f"{command}: {error.error.error.desc}")
                await asyncio.sleep(rng.uniform(0, 0.03))
                if done.is_set():
                    break


@asynctest
async def test_request_storm_without_migration(launch):
    """Injected: 300 random stop, cont and system_reset requests, 0-30 ms apart, to one guest.
    Survives: tern and the guest (each reset restarts it). Before a vCPU completed its I/O exit
    before parking, a reset could meet registers KVM had still to step past an OUT, and the
    guest triple-faulted within a few hundred requests (every run of three)."""
    rng = random.Random(fault_seed())
    vm = launch("vm", memory="128M")
    async with session(vm) as s:
        await vm.wait_passes(1)
        refused = 0
        for _ in range(300):
            try:
                await execute(s, rng.choice(["stop", "cont", "system_reset"]))
            except ExecuteError:
                refused += 1
            await asyncio.sleep(rng.uniform(0, 0.03))
        assert vm.alive(), "tern died under the request storm" + vm.diagnostics()
        await assert_state_matches_vcpus(s, vm)
        await guest_runs_on(s, vm)
        print(f"storm: 300 requests, {refused} refused, {vm.log_text().count('tern-guest: start')} starts")


@asynctest
async def test_lifecycle_requests_race_migrations(launch):
    """Injected: stop, cont and system_reset from a second client at random every 0-30 ms while
    a 128 MiB guest migrates (six trials). Survives: both processes (no crash, no triple fault);
    each request gets an answer; the side that holds the guest runs it on with its self-check
    passing; run state and vCPUs agree on both sides at the end."""
    rng = random.Random(fault_seed())
    for trial in range(6):
        uri = tcp_uri()
        src = launch(f"src{trial}", memory="128M")
        dst = launch(f"dst{trial}", memory="128M", incoming=uri)
        async with session(src) as s:
            await src.wait_passes(1)
            await listening(dst)
            assert await execute(s, "migrate-set-parameters", {"max-bandwidth": 256 << 20}) == {}
            done, log = asyncio.Event(), []
            racer = asyncio.create_task(chaos(src, rng, done, log))
            await asyncio.sleep(rng.uniform(0, 0.2))
            assert await execute(s, "migrate", {"uri": uri}) == {}
            info = await final_status(s, src)
            done.set()
            await asyncio.wait_for(racer, 10)
            assert src.alive(), f"trial {trial}: the source died; requests {log}" + src.diagnostics()
            assert "system_reset" in " ".join(log) and "stop" in " ".join(log), f"the racer sent too little: {log}"
            if info["status"] == "completed":
                await assert_state_matches_vcpus(s, src)
                async with session(dst) as d:
                    await assert_state_matches_vcpus(d, dst)
                    await guest_runs_on(d, dst)
            else:
                assert info["status"] == "failed", f"trial {trial}: nobody cancelled: {info}"
                dst.expect_exit = True
                await assert_state_matches_vcpus(s, src)
                await guest_runs_on(s, src)
            print(f"trial {trial}: {info['status']} after {len(log)} requests "
                  f"({sum('system_reset' == r for r in log)} resets, {sum(':' in r for r in log)} refused)")
        retire(src)
        retire(dst)


# ----- cancels at random points, and a leak count over many migrations ----------------------------

@asynctest
async def test_random_cancels_and_no_leaks(launch):
    """Injected: migrate_cancel at a random point after migrate, 30 times from one source (each
    to a fresh destination), timed from a first, uncancelled migration so that the cancels land
    in setup, active and at the completion. Survives: the source's guest every time (or, when the migration won the race,
    the destination's); the source holds as many descriptors and threads as before the first
    migration, and its memory grew by less than 16 MiB."""
    rng = random.Random(fault_seed())
    src = launch("src", **SMALL)
    landed: dict[str, int] = {}
    async with session(src) as s:
        await src.wait_passes(1)
        assert await execute(s, "migrate-set-parameters", {"max-bandwidth": SMALL_BANDWIDTH}) == {}
        baseline, took = None, None
        for trial in range(31):
            uri = tcp_uri()
            dst = launch(f"dst{trial}", incoming=uri, **SMALL)
            dst.expect_exit = True  # it fails its load when the source cancels
            await listening(dst)
            if baseline is None:
                await asyncio.sleep(0.2)
                baseline = counts(src.pid), src.rss_kib()
            assert await execute(s, "migrate", {"uri": uri}) == {}
            if took is not None:
                # A third of the cancels at once (setup), a third anywhere, a third around
                # the time the first, uncancelled migration took (the completion).
                await asyncio.sleep(rng.choice([rng.uniform(0, 0.003), rng.uniform(0, took),
                                                rng.uniform(0.85 * took, 1.15 * took)]))
                before = (await execute(s, "query-migrate")).get("status")
                assert await execute(s, "migrate_cancel") == {}
            else:
                before = "uncancelled"
            info = await final_status(s, src)
            if took is None:
                took = info["total-time"] / 1000
            landed[f"{before}->{info['status']}"] = landed.get(f"{before}->{info['status']}", 0) + 1
            if info["status"] == "completed":
                async with session(dst) as d:
                    await guest_runs_on(d, dst, lines=1)
                assert await status(s) == "postmigrate"
                assert await execute(s, "cont") == {}  # the source runs on for the next trial
            else:
                assert info["status"] == "cancelled", f"trial {trial}: {info}" + src.diagnostics()
            await wait_status(s, src, "running")
            await src.until(lambda: not dst.alive() or info["status"] == "completed",
                            f"destination {trial} to give up after the cancel", timeout=10)
            retire(dst)
        await assert_state_matches_vcpus(s, src)
        seen = len(src.passes())
        await src.wait_passes(1, after=seen, timeout=10)
        src.assert_healthy()
        await asyncio.sleep(0.3)  # the last migration's threads finish after its final status
        (fds, threads), rss = counts(src.pid), src.rss_kib()
        (fds0, threads0), rss0 = baseline
        print(f"cancel points: {landed}; descriptors {fds0} -> {fds}, threads {threads0} -> {threads}, "
              f"RSS {rss0} -> {rss} KiB")
        assert fds <= fds0, f"the source leaked descriptors over 30 migrations: {fds0} -> {fds}"
        assert threads <= threads0, f"the source leaked threads over 30 migrations: {threads0} -> {threads}"
        assert rss - rss0 < 16 << 10, f"the source's memory grew by {(rss - rss0) >> 10} MiB over 30 migrations"
    assert any(k.startswith("active") for k in landed), f"no cancel landed while active: {landed}"


# ----- kill -9 at random points ---------------------------------------------------------------------

@asynctest
async def test_destination_killed_at_random_points(launch):
    """Injected: SIGKILL of the destination 0-800 ms into the migration (eight trials).
    Survives: the source's guest, running again with its self-check passing, the migration
    failed with a reason (or completed before the kill landed)."""
    rng = random.Random(fault_seed())
    src = launch("src", **SMALL)
    async with session(src) as s:
        await src.wait_passes(1)
        assert await execute(s, "migrate-set-parameters", {"max-bandwidth": SMALL_BANDWIDTH}) == {}
        for trial in range(8):
            uri = tcp_uri()
            dst = launch(f"dst{trial}", incoming=uri, **SMALL)
            await listening(dst)
            assert await execute(s, "migrate", {"uri": uri}) == {}
            await asyncio.sleep(rng.uniform(0, FAULT_WINDOW))
            dst.kill()
            info = await final_status(s, src)
            if info["status"] == "completed":
                assert await execute(s, "cont") == {}  # the killed destination held the guest; run it here again
            else:
                assert info["status"] == "failed" and info.get("error-desc"), f"trial {trial}: {info}"
            await wait_status(s, src, "running")
            await assert_state_matches_vcpus(s, src)
            seen = len(src.passes())
            await src.wait_passes(1, after=seen, timeout=10)
            src.assert_healthy()
            retire(dst)


@asynctest
async def test_source_killed_at_random_points(launch):
    """Injected: SIGKILL of the source 0-1200 ms into the migration (eight trials). Survives:
    the destination never runs a partial guest: it either loaded everything and its guest runs
    on with its self-check passing, or it refuses the cut stream, says why and exits with a
    failure status."""
    rng = random.Random(fault_seed())
    outcomes: dict[str, int] = {}
    for trial in range(8):
        uri = tcp_uri()
        src = launch(f"src{trial}", **SMALL)
        dst = launch(f"dst{trial}", incoming=uri, **SMALL)
        async with session(src) as s:
            await src.wait_passes(1)
            await listening(dst)
            assert await execute(s, "migrate-set-parameters", {"max-bandwidth": SMALL_BANDWIDTH}) == {}
            assert await execute(s, "migrate", {"uri": uri}) == {}
            # Up to well past the usual completion, so some kills come too late to matter.
            await asyncio.sleep(rng.uniform(0, FAULT_WINDOW * 1.5))
        src.kill()
        # The destination decides: loaded (and runs), or the stream was cut (and exits).
        deadline = time.monotonic() + 15
        outcome = None
        while outcome is None:
            assert time.monotonic() < deadline, f"trial {trial}: the destination neither ran nor gave up" + dst.diagnostics()
            if not dst.alive():
                outcome = "refused"
            else:
                try:
                    async with session(dst) as d:
                        if (await execute(d, "query-migrate")).get("status") == "completed":
                            await guest_runs_on(d, dst, lines=1)
                            outcome = "loaded"
                except Exception:  # noqa: BLE001 - it exited while we asked (qemu.qmp's ConnectError, EOF)
                    if dst.alive():
                        raise
            await asyncio.sleep(0.05)
        if outcome == "refused":
            dst.expect_exit = True
            assert dst.proc.returncode != 0, f"trial {trial}: a cut stream must end with a failure status" + dst.diagnostics()
            assert "incoming" in dst.stderr_text() or "migration" in dst.stderr_text(), dst.diagnostics()
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        retire(dst)
        src.remove()
    print(f"source killed: {outcomes}")


# ----- a full disk, and a destination that stops reading --------------------------------------------

@pytest.fixture
def tiny_filesystem():
    """A 4 MiB tmpfs: a 64 MiB guest's saved state cannot fit."""
    where = tempfile.mkdtemp(prefix="tern-full-")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", where],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        os.rmdir(where)
        pytest.skip(f"SKIPPED LOUDLY: cannot mount a tmpfs for the full-disk test: {mounted.stderr.strip()}")
    yield where
    subprocess.run(["umount", where], check=False)
    shutil.rmtree(where, ignore_errors=True)


@asynctest
async def test_full_disk_under_exec(launch, tiny_filesystem):
    """Injected: `exec:cat > FILE` on a file system that fills up part way (ENOSPC). Survives:
    the source's guest, running again; the migration failed saying the command failed."""
    src = launch("src", **SMALL)
    async with session(src) as s:
        await src.wait_passes(1)
        assert await execute(s, "migrate-set-parameters", {"max-bandwidth": UNLIMITED}) == {}
        assert await execute(s, "migrate", {"uri": f"exec:cat > {tiny_filesystem}/state"}) == {}
        info = await final_status(s, src)
        assert info["status"] == "failed", f"a full disk must fail the migration: {info}"
        assert "exited with status" in info.get("error-desc", "") or "Broken pipe" in info.get("error-desc", ""), info
        await wait_status(s, src, "running")
        await assert_state_matches_vcpus(s, src)
        seen = len(src.passes())
        await src.wait_passes(1, after=seen, timeout=10)
        src.assert_healthy()


@asynctest
async def test_destination_that_stops_reading(launch):
    """Injected: a destination that accepts and then never reads (its socket stays open).
    Survives: the source's guest; the migration stays active (nothing moves) until
    migrate_cancel, which ends it within a second however full the socket is."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    src = launch("src", **SMALL)
    try:
        async with session(src) as s:
            await src.wait_passes(1)
            assert await execute(s, "migrate", {"uri": f"tcp:127.0.0.1:{port}"}) == {}
            peer, _ = await asyncio.get_running_loop().run_in_executor(None, server.accept)
            await asyncio.sleep(1.5)
            first = (await execute(s, "query-migrate"))
            await asyncio.sleep(0.5)
            second = (await execute(s, "query-migrate"))
            assert second["status"] == "active", second
            assert second["ram"]["transferred"] == first["ram"]["transferred"], \
                f"nothing can move to a peer that does not read: {first['ram']} -> {second['ram']}"
            started = time.monotonic()
            assert await execute(s, "migrate_cancel") == {}
            info = await final_status(s, src, timeout=5)
            took = time.monotonic() - started
            assert info["status"] == "cancelled" and took < 1.0, f"cancel took {took:.2f} s: {info}"
            await assert_state_matches_vcpus(s, src)
            src.assert_healthy()
            peer.close()
    finally:
        server.close()


# ----- the link: cut and restored, slowed (network namespaces and a veth pair) ------------------------

class Link:
    """A veth pair between this namespace (10.77.N.1) and a new network namespace (10.77.N.2),
    so a destination can run behind a link the test can cut, restore and slow."""

    def __init__(self, index: int):
        self.namespace = f"tern-fault-{os.getpid()}-{index}"
        self.outside, self.inside = f"tf{os.getpid() % 10000}o{index}", f"tf{os.getpid() % 10000}i{index}"
        self.subnet = f"10.77.{index}"
        self.address = f"{self.subnet}.2"
        steps = [
            ["ip", "netns", "add", self.namespace],
            ["ip", "link", "add", self.outside, "type", "veth", "peer", "name", self.inside],
            ["ip", "link", "set", self.inside, "netns", self.namespace],
            ["ip", "addr", "add", f"{self.subnet}.1/24", "dev", self.outside],
            ["ip", "link", "set", self.outside, "up"],
            ["ip", "netns", "exec", self.namespace, "ip", "addr", "add", f"{self.address}/24", "dev", self.inside],
            ["ip", "netns", "exec", self.namespace, "ip", "link", "set", self.inside, "up"],
            ["ip", "netns", "exec", self.namespace, "ip", "link", "set", "lo", "up"],
        ]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode != 0:
                self.remove()
                raise RuntimeError(f"{' '.join(step)}: {done.stderr.strip()}")

    def run(self, *command: str) -> None:
        subprocess.run(list(command), check=True, capture_output=True)

    def cut(self) -> None:
        self.run("ip", "link", "set", self.outside, "down")

    def restore(self) -> None:
        self.run("ip", "link", "set", self.outside, "up")

    def slow(self, rate: str) -> None:
        """Shapes traffic towards the destination with a token bucket (netem is not in every
        kernel; tbf is)."""
        self.run("tc", "qdisc", "add", "dev", self.outside, "root", "tbf", "rate", rate, "burst", "64kb", "latency", "200ms")

    def remove(self) -> None:
        subprocess.run(["ip", "link", "del", self.outside], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.namespace], capture_output=True)


@pytest.fixture
def link():
    links: list[Link] = []

    def make() -> Link:
        try:
            made = Link(len(links) + 1)
        except (RuntimeError, FileNotFoundError) as error:
            pytest.skip(f"SKIPPED LOUDLY: cannot build a veth pair in a network namespace here: {error}")
        links.append(made)
        return made

    yield make
    for made in links:
        made.remove()


#: For the link tests: a guest that dirties slower than the shaped or limited link carries.
CALM = dict(memory="64M", append="wss=16M rate=2M")


def behind(link: Link, port: int) -> dict:
    """Launch options for a destination inside the link's namespace."""
    return dict(incoming=f"tcp:{link.address}:{port}", wrapper=["ip", "netns", "exec", link.namespace])


@asynctest
async def test_link_cut_and_restored(launch, link):
    """Injected: the link to the destination goes down for 3 s mid-migration, then comes back.
    Survives: the migration (TCP carries on where it stopped; nothing is resent or lost): it
    completes and the destination's guest runs on with its self-check passing; while the link
    is down the source's guest keeps running."""
    net = link()
    port = 4500
    src = launch("src", **CALM)
    dst = launch("dst", **CALM, **behind(net, port))
    async with session(src) as s:
        await src.wait_passes(1)
        await listening(dst)
        assert await execute(s, "migrate-set-parameters", {"max-bandwidth": 16 << 20}) == {}
        assert await execute(s, "migrate", {"uri": f"tcp:{net.address}:{port}"}) == {}
        await asyncio.sleep(0.4)
        net.cut()
        before = len(src.passes())
        await asyncio.sleep(3)
        assert (await execute(s, "query-migrate"))["status"] == "active"
        assert await status(s) == "running" and len(src.passes()) > before, "the source's guest stalled with the link"
        net.restore()
        info = await final_status(s, src, timeout=60)
        assert info["status"] == "completed", f"the migration did not survive a 3 s cut: {info}" + src.diagnostics()
    async with session(dst) as d:
        await guest_runs_on(d, dst)


@asynctest
async def test_link_cut_for_good(launch, link):
    """Injected: the link goes down mid-migration and stays down. Survives: the source's guest:
    migrate_cancel ends the stuck migration within a second and the guest runs on."""
    net = link()
    port = 4501
    src = launch("src", **CALM)
    dst = launch("dst", **CALM, **behind(net, port))
    dst.expect_exit = True
    async with session(src) as s:
        await src.wait_passes(1)
        await listening(dst)
        assert await execute(s, "migrate-set-parameters", {"max-bandwidth": 16 << 20}) == {}
        assert await execute(s, "migrate", {"uri": f"tcp:{net.address}:{port}"}) == {}
        await asyncio.sleep(0.4)
        net.cut()
        await asyncio.sleep(1.5)
        started = time.monotonic()
        assert await execute(s, "migrate_cancel") == {}
        info = await final_status(s, src, timeout=5)
        took = time.monotonic() - started
        assert info["status"] == "cancelled" and took < 1.0, f"cancel over a dead link took {took:.2f} s: {info}"
        await wait_status(s, src, "running")
        seen = len(src.passes())
        await src.wait_passes(1, after=seen, timeout=10)
        src.assert_healthy()


@asynctest
async def test_slowed_link(launch, link):
    """Injected: a link shaped to 80 Mbit/s (about 10 MB/s) with tc's token bucket, and tern's
    own limit lifted. Survives: the migration completes, and the throughput tern reports is
    what the link allowed (within a factor of two), not what it asked for."""
    net = link()
    net.slow("80mbit")
    port = 4502
    src = launch("src", **CALM)
    dst = launch("dst", **CALM, **behind(net, port))
    async with session(src) as s:
        await src.wait_passes(1)
        await listening(dst)
        assert await execute(s, "migrate-set-parameters", {"max-bandwidth": UNLIMITED}) == {}
        assert await execute(s, "migrate", {"uri": f"tcp:{net.address}:{port}"}) == {}
        info = await final_status(s, src, timeout=60)
        assert info["status"] == "completed", info
        mbps = info["ram"]["mbps"]
        print(f"slowed link: {mbps:.1f} Mbit/s reported, {info['total-time']} ms, downtime {info['downtime']} ms")
        assert 40 <= mbps <= 90, f"the link carries 80 Mbit/s; tern reports {mbps:.1f}: {info}"
    async with session(dst) as d:
        await guest_runs_on(d, dst)


# ----- requests during a switchover that waits for its verdict --------------------------------------

class VerdictWithheld(FakeDestination):
    """A fake destination that reads the whole stream, answers PINGs, and never says LOADED: the
    source stays in its switchover (finish-migrate, vCPUs stopped) until the verdict wait ends,
    which close() brings about at once."""

    def __init__(self):
        super().__init__("tcp")
        self.ended = threading.Event()

    def _record(self, kind: int, body: bytes) -> None:
        if kind == END:
            self.ended.set()
            return
        super()._record(kind, body)


@pytest.mark.parametrize("stop", [False, True], ids=["no-stop", "stop-meanwhile"])
@asynctest
async def test_requests_during_a_switchover(launch, stop):
    """Injected: cont, system_reset (and, in one case, stop) while the source waits, vCPUs
    stopped, for a verdict that never comes; then the destination goes away. Survives: cont and
    system_reset are refused with a reason (starting or resetting the guest mid-switchover would
    fork it); the failed migration restarts the source's guest, unless a stop came meanwhile,
    which it honours: the guest stays paused until cont."""
    src = launch("src", **SMALL)
    fake = VerdictWithheld()
    try:
        async with session(src) as s:
            await src.wait_passes(1)
            assert await execute(s, "migrate-set-parameters", {"max-bandwidth": UNLIMITED}) == {}
            assert await execute(s, "migrate", {"uri": fake.uri}) == {}
            await fake.until(fake.ended.is_set, "the END record", timeout=20)
            await wait_status(s, src, "finish-migrate")
            desc = await execute_error(s, "cont")
            assert "finish-migrate" in desc, desc
            desc = await execute_error(s, "system_reset")
            assert "switchover" in desc, desc
            if stop:
                assert await execute(s, "stop") == {}
            assert await status(s) == "finish-migrate", "a refused request changed the run state"
            fake.close()
            info = await final_status(s, src, timeout=40)
            assert info["status"] == "failed" and "confirm" in info.get("error-desc", ""), info
            if stop:
                await wait_status(s, src, "paused")
                assert await assert_state_matches_vcpus(s, src) == "paused"
                assert await execute(s, "cont") == {}
            await wait_status(s, src, "running")
            await assert_state_matches_vcpus(s, src)
            seen = len(src.passes())
            await src.wait_passes(1, after=seen, timeout=10)
            src.assert_healthy()
    finally:
        fake.close()
