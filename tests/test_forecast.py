"""The convergence forecast (`x-forecast` in the source's query-migrate), SLO escalation
(`x-slo-downtime`, `x-slo-total-time`, `x-escalations`, X_MIGRATION_ESCALATION) and the SVG
report of `tern migrate --report` and `tern demo --report`, with real migrations between tern
processes driven over QMP with qemu.qmp (and the tern CLI as a subprocess).

The guests are built to need what is tested (guest/README.md's tokens): one that dirties its
working set faster than the link carries it (the forecast must say so by the end of pass 2, and
escalation must throttle it, or switch to postcopy, or cancel in time), one that dirties slowly
(the forecast must converge, with an ETA the migration keeps), one that rewrites a single
64-byte line per page (XBZRLE's case) and one whose pages compress about 4:1 (compression's).
On this host the guest dirties at most about 50-80 MiB/s while dirty logging is on, so "faster
than the link" means a link of 30 MiB/s here.

Every migration that completes is checked at the destination: the guest's own self-check (pass
numbers carried on from the source, every line ok), and where escalation changed the page
encoding, the destination's RAM against the source's (x-query-memory-digest, destination held
paused by -S). A migration escalation cancels must leave the source guest running and healthy.

Skipped, loudly, without /dev/kvm or the tern binary (TERN_BINARY, default .build/debug/tern).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterable, Optional

import pytest

from migration_support import (
    EventLog,
    TERN_BINARY, VM, asynctest, execute, execute_error, session, skip_reason, wait_migration, wait_status,
)
from tern_harness import check_event_shape
from test_capabilities import Watch, compare_and_resume, set_capabilities
from test_migration import check_destination_guest, launch, tcp_uri  # noqa: F401 - launch is a fixture

_SKIP = skip_reason()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

MiB = 1 << 20
#: A link the fast dirtier outruns (the guest manages 50-80 MiB/s under dirty logging).
LINK = 30 * MiB
#: 64 MiB of random pages rewritten as fast as the guest can: every pass finds it all dirty again.
FAST = "wss=64M rate=200M"
#: The same, over 32 MiB: a pass takes about 1 s at LINK.
FAST_SMALL = "wss=32M rate=200M"
#: Dirties an eighth of its working set per pass at 32 MiB/s: converges in a few passes.
SLOW_DIRTIER = "wss=64M rate=16M"
SLOW_LINK = 32 * MiB
#: A rewrite changes only the page's first 64-byte line: XBZRLE deltas are a few bytes.
ONE_LINE = "wss=32M rate=200M lines=1"
#: Pages that zlib level 1 compresses about 4:1.
# A working set larger than the 64 MiB XBZRLE cache: deltas would thrash it, so compression is
# the encoder that pays.
COMPRESSIBLE = "wss=80M rate=200M pattern=compressible ratio=4"

#: The members of x-forecast.
FORECAST_MEMBERS = {"converges", "passes", "eta-ms", "expected-downtime-ms", "bandwidth", "dirty-rate",
                    "dirty-set", "basis"}
STEPS = ("xbzrle", "compress", "throttle", "postcopy", "cancel")

SLO_DOWNTIME_RANGE = "Parameter 'x-slo-downtime' expects an integer in the range of 0 to 2000000 milliseconds"
SLO_TOTAL_RANGE = "Parameter 'x-slo-total-time' expects an integer in the range of 0 to 86400000 milliseconds"


# ----- helpers -------------------------------------------------------------------------------

def check_forecast(info: dict) -> dict:
    """An active query-migrate's x-forecast, with its members' types checked."""
    forecast = info.get("x-forecast")
    assert isinstance(forecast, dict), f"an active source's query-migrate lacks x-forecast: {info}"
    assert set(forecast) == FORECAST_MEMBERS, f"x-forecast members: {forecast}"
    assert isinstance(forecast["converges"], bool), forecast
    for name in FORECAST_MEMBERS - {"converges", "basis"}:
        assert isinstance(forecast[name], int) and forecast[name] >= 0, f"x-forecast.{name}: {forecast}"
    assert forecast["basis"] in ("first-pass", "sample", "passes"), forecast
    return forecast


def forecasts(watch: Watch) -> list[tuple[float, int, dict]]:
    """(time sampled, passes done, x-forecast) of every active sample that had one."""
    return [(sample["_at"], sample.get("ram", {}).get("dirty-sync-count", 0), check_forecast(sample))
            for sample in watch.active if "x-forecast" in sample]


def escalations(info: dict) -> list[dict]:
    """x-escalations, checked: each {step, detail, at-ms}, steps known, at-ms in order."""
    steps = info.get("x-escalations", [])
    assert isinstance(steps, list), f"x-escalations must be a list: {info}"
    last = 0
    for step in steps:
        assert isinstance(step, dict) and set(step) == {"step", "detail", "at-ms"}, f"an x-escalations entry: {step}"
        assert step["step"] in STEPS, f"unknown escalation step: {step}"
        assert isinstance(step["detail"], str) and step["detail"], f"an escalation without a detail: {step}"
        assert isinstance(step["at-ms"], int) and step["at-ms"] >= last, f"at-ms out of order: {steps}"
        last = step["at-ms"]
    return steps


def step_names(info: dict) -> list[str]:
    return [step["step"] for step in escalations(info)]


class Escalations(EventLog):
    """X_MIGRATION_ESCALATION events (and MIGRATION statuses) a qemu.qmp listener heard."""

    def steps(self) -> list[dict]:
        return [event["data"] for event in self.take() if event["event"] == "X_MIGRATION_ESCALATION"]

    async def settle(self, count: int, timeout: float = 3) -> None:
        """Waits until `count` escalation events have arrived (they may trail query-migrate)."""
        deadline = time.monotonic() + timeout
        while len(self.steps()) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def check_against(self, info: dict) -> None:
        """The events are x-escalations, one for one, each in QEMU's event format."""
        for event in self.take():
            if event["event"] == "X_MIGRATION_ESCALATION":
                check_event_shape(event, "X_MIGRATION_ESCALATION")
        assert self.steps() == escalations(info), \
            f"X_MIGRATION_ESCALATION events {self.steps()} are not query-migrate's x-escalations {escalations(info)}"


async def migrate_and_watch(s, src: VM, uri: str, *, bandwidth: int, parameters: Optional[dict] = None,
                            capabilities: Iterable[str] = (), timeout: float = 30,
                            wanted: Iterable[str] = ("completed",), until=None,
                            watch: Optional[Watch] = None) -> tuple[dict, Watch]:
    """Sets the source up, migrates, and polls query-migrate (every 0.1 s, each sample stamped
    with `_at`, monotonic seconds since `migrate`) until its status is in `wanted`, or
    `until(sample)` is true; fails at once on another final status. Returns the last sample and
    the watch (`watch.started`: when `migrate` was sent)."""
    await src.wait_passes(1)
    await set_capabilities(s, capabilities)
    values = {"max-bandwidth": bandwidth}
    values.update(parameters or {})
    assert await execute(s, "migrate-set-parameters", values) == {}
    watch = watch if watch is not None else Watch()
    watch.started = time.monotonic()
    assert await execute(s, "migrate", {"uri": uri}) == {}
    wanted = set(wanted)
    deadline = watch.started + timeout
    while True:
        info = await execute(s, "query-migrate")
        info["_at"] = time.monotonic() - watch.started
        watch.samples.append(info)
        current = info.get("status")
        if current in wanted or (until is not None and until(info)):
            return info, watch
        if current in ("completed", "failed", "cancelled"):
            raise AssertionError(f"the migration ended {current}, wanted {sorted(wanted)}: {info}" + src.diagnostics())
        assert time.monotonic() < deadline, \
            f"the migration is still {current} after {timeout:.0f} s: {info}" + src.diagnostics()
        await asyncio.sleep(0.1)


async def check_source_runs_on(s, src: VM) -> None:
    """After a migration that did not complete: the source guest runs and stays healthy."""
    await wait_status(s, src, "running")
    seen = len(src.passes())
    await src.wait_passes(2, after=seen, timeout=10)
    src.assert_healthy()


async def expect_failed_load(dst: VM) -> None:
    """A destination whose source gave up fails its load and exits 1."""
    rc = await dst.wait_exit(timeout=10)
    assert rc == 1 and "load of migration failed" in dst.stderr_text(), \
        f"the destination of a cancelled migration should fail its load and exit 1, got {rc}" + dst.diagnostics()


# ----- the forecast --------------------------------------------------------------------------

@asynctest
async def test_forecast_does_not_converge(launch):
    """A guest that rewrites 64 MiB of random pages faster than a 30 MiB/s link carries them:
    during the first pass the forecast rests on the first pass (converging assumed, an ETA that
    counts down); by the end of pass 2 it says pre-copy does not converge, with the measured
    link and dirty rates and the whole working set as the dirty set. The test cancels; the
    source guest runs on."""
    uri = tcp_uri()
    src = launch("src", append=FAST)
    dst = launch("dst", incoming=uri)
    async with session(src) as s:
        info, watch = await migrate_and_watch(
            s, src, uri, bandwidth=LINK, parameters={"downtime-limit": 50}, wanted=(),
            until=lambda sample: sample.get("ram", {}).get("dirty-sync-count", 0) >= 2, timeout=15)
        assert await execute(s, "migrate_cancel") == {}
        await wait_migration(s, src, wanted=("cancelled",), timeout=10)
        await check_source_runs_on(s, src)
    seen = forecasts(watch)
    first = [f for _, passes, f in seen if passes == 0]
    later = [(at, passes, f) for at, passes, f in seen if passes >= 1]
    assert first, f"no x-forecast during the first pass: {watch.active[:3]}"
    unsampled = [f for f in first if f["basis"] == "first-pass"]
    sampled = [f for f in first if f["basis"] == "sample"]
    assert len(unsampled) + len(sampled) == len(first), f"unexpected basis in the first pass: {first}"
    for forecast in unsampled:
        assert forecast["converges"] is True and forecast["dirty-rate"] == 0 and forecast["passes"] == 1, \
            f"before any dirty rate the forecast rests on the first pass and assumes convergence: {forecast}"
    # A quarter second into the (2 s) first pass the mid-pass sample measures the dirty rate:
    # from then on the forecast already knows this guest will not converge.
    assert sampled, f"no mid-pass sample during a 2 s first pass: {first}"
    for forecast in sampled:
        assert forecast["converges"] is False and forecast["dirty-rate"] >= LINK, \
            f"the sampled dirty rate is far above the link: {forecast}"
    assert later, f"no x-forecast after the first pass: {watch.samples[-3:]}"
    for at, passes, forecast in later:
        assert forecast["basis"] == "passes", f"after pass {passes} the basis must be 'passes': {forecast}"
        assert forecast["converges"] is False, \
            f"after pass {passes} ({at:.1f} s in) the forecast says this guest converges: {forecast}"
        assert forecast["passes"] == 0 and forecast["eta-ms"] == 0, f"no ETA when it does not converge: {forecast}"
        assert 0.6 * LINK <= forecast["bandwidth"] <= 1.4 * LINK, f"bandwidth is not the 30 MiB/s link: {forecast}"
        assert forecast["dirty-rate"] >= 0.6 * LINK, f"the guest dirties its 64 MiB every pass: {forecast}"
        assert 48 * MiB <= forecast["dirty-set"] <= 66 * MiB, f"the dirty set should be the 64 MiB working set: {forecast}"
    # "By the end of pass 2": the very first sample after pass 1 already said so.
    assert min(passes for _, passes, _ in later) == 1, f"no sample between pass 1 and pass 2: {later[:2]}"
    await expect_failed_load(dst)


@asynctest
async def test_forecast_converges_with_eta(launch):
    """A guest that dirties 16 MiB/s of a 64 MiB working set over a 32 MiB/s link: each pass
    halves the next, so the forecast after pass 1 converges, with a positive ETA, a stop
    within the downtime limit, and the migration completes within three times that ETA (and
    not in a third of it). The ETA shrinks as the passes go."""
    uri = tcp_uri()
    src = launch("src", append=SLOW_DIRTIER)
    dst = launch("dst", incoming=uri)
    async with session(src) as s:
        info, watch = await migrate_and_watch(s, src, uri, bandwidth=SLOW_LINK, timeout=25)
        assert "x-escalations" not in info, f"no SLO is set: nothing may escalate: {info}"
        assert "x-forecast" not in info, f"x-forecast is for active migrations only: {info}"
        await wait_status(s, src, "postmigrate")
    ended = info["_at"]
    later = [(at, passes, f) for at, passes, f in forecasts(watch) if f["basis"] == "passes"]
    assert later, f"no forecast resting on passes before completion: {watch.samples}" + src.diagnostics()
    at, passes, forecast = later[0]
    assert passes == 1, f"the first forecast on passes should come right after pass 1: {later[:2]}"
    assert forecast["converges"] is True, f"the slow dirtier's forecast says it does not converge: {forecast}"
    eta = forecast["eta-ms"] / 1000
    assert forecast["eta-ms"] > 0 and forecast["passes"] >= 1, f"a converging forecast needs an ETA: {forecast}"
    assert forecast["expected-downtime-ms"] <= 300, f"the stop must fit the 300 ms downtime limit: {forecast}"
    taken = ended - at
    assert taken <= 3 * eta + 0.3, f"the ETA after pass 1 was {eta:.2f} s, the migration took {taken:.2f} s more"
    assert taken >= eta / 3 - 0.2, f"the ETA after pass 1 was {eta:.2f} s, the migration took only {taken:.2f} s more"
    assert all(f["converges"] for _, _, f in later), f"the forecast wavered: {[f for _, _, f in later]}"
    assert later[-1][2]["eta-ms"] < forecast["eta-ms"], f"the ETA should shrink: {[f['eta-ms'] for _, _, f in later]}"
    await check_destination_guest(src, dst)


# ----- escalation ----------------------------------------------------------------------------

@asynctest
async def test_escalation_throttles(launch):
    """A 30 s budget, random pages (XBZRLE and compression cannot pay) dirtied faster than the
    link: escalation throttles, first at cpu-throttle-initial (or what the rates need), then by
    at least cpu-throttle-increment a pass, until the forecast is met; the migration completes
    within the budget and the guest runs on, healthy, at the destination."""
    uri = tcp_uri()
    src = launch("src", append=FAST_SMALL)
    dst = launch("dst", incoming=uri)
    async with session(src) as s:
        with s.listener("X_MIGRATION_ESCALATION") as listener:
            heard = Escalations(listener)
            info, watch = await migrate_and_watch(
                s, src, uri, bandwidth=LINK, capabilities=["events"], timeout=30,
                parameters={"x-slo-total-time": 30000, "cpu-throttle-initial": 60, "cpu-throttle-increment": 10})
            steps = escalations(info)
            await heard.settle(len(steps))
            heard.check_against(info)
        await wait_status(s, src, "postmigrate")
    names = [step["step"] for step in steps]
    assert names and set(names) == {"throttle"}, \
        f"random pages: escalation should only throttle (XBZRLE and compression do not pay): {steps}"
    percents = [int(re.match(r"vCPUs throttled to (\d+)%", step["detail"]).group(1)) for step in steps]
    assert percents[0] >= 60, f"the first throttle is at least cpu-throttle-initial: {steps}"
    assert all(b >= a + 10 or b == 99 for a, b in zip(percents, percents[1:])), \
        f"each step adds the increment (or reaches the maximum, 99): {percents}"
    # One step per pass at most (a pass over 32 MiB at 30 MiB/s takes about 1 s).
    assert len(steps) <= info["ram"]["dirty-sync-count"], f"more steps than passes: {steps} {info}"
    assert all(b["at-ms"] - a["at-ms"] >= 500 for a, b in zip(steps, steps[1:])), f"two steps in one pass: {steps}"
    assert percents[-1] <= 99, percents
    assert set(watch.throttles()) <= set(percents) and watch.throttles(), \
        f"cpu-throttle-percentage should show the escalation's throttle: {watch.throttles()} vs {percents}"
    assert info.get("x-cpu-throttle-maximum") == percents[-1], info
    assert "xbzrle-cache" not in info and "compression" not in info, f"no encoder was turned on: {info}"
    assert info["total-time"] <= 30000 and steps[-1]["at-ms"] <= info["total-time"], info
    await check_destination_guest(src, dst)


@asynctest
async def test_escalation_turns_xbzrle_on(launch):
    """A guest that rewrites one 64-byte line per page, faster than the link carries whole pages:
    the sampled deltas are tiny, so the first step is XBZRLE (no capability set), its statistics
    show in query-migrate, and the destination (xbzrle off there too) ends with the source's RAM."""
    uri = tcp_uri()
    src = launch("src", append=ONE_LINE)
    dst = launch("dst", incoming=uri, paused=True)
    async with session(src) as s:
        info, _ = await migrate_and_watch(s, src, uri, bandwidth=LINK, parameters={"x-slo-total-time": 30000},
                                          timeout=30)
        await wait_status(s, src, "postmigrate")
    steps = escalations(info)
    assert steps and steps[0]["step"] == "xbzrle", \
        f"one changed line per page: XBZRLE should be the first escalation step, got {steps}" + src.diagnostics()
    assert steps[0]["detail"].startswith("XBZRLE on"), steps[0]
    assert "xbzrle-cache" in info and info["xbzrle-cache"]["pages"] > 0, \
        f"escalation turned XBZRLE on: xbzrle-cache must show pages sent as deltas: {info}"
    await compare_and_resume(src, dst)


@pytest.mark.parametrize("method", ["zlib", "zstd"])
@asynctest
async def test_escalation_turns_compression_on(launch, method):
    """Pages that compress about 4:1, dirtied faster than the link carries them: the first step
    is compression (zlib, or zstd with multifd-compression=zstd), without the compress
    capability at either end; compressed pages show in query-migrate, the migration completes
    and the destination's RAM is the source's."""
    uri = tcp_uri()
    src = launch("src", append=COMPRESSIBLE)
    dst = launch("dst", incoming=uri, paused=True)
    parameters = {"x-slo-total-time": 30000}
    if method == "zstd":
        parameters["multifd-compression"] = "zstd"
    async with session(src) as s:
        info, _ = await migrate_and_watch(s, src, uri, bandwidth=LINK, parameters=parameters, timeout=30)
        capabilities = {c["capability"]: c["state"] for c in await execute(s, "query-migrate-capabilities")}
        assert capabilities["compress"] is False, f"escalation must not turn the capability itself on: {capabilities}"
        await wait_status(s, src, "postmigrate")
    steps = escalations(info)
    names = [step["step"] for step in steps]
    assert names and names[0] == "compress", f"compressible pages: compression should come first: {steps}"
    assert steps[0]["detail"].startswith(f"{method} compression on"), steps[0]
    assert "xbzrle" not in names, f"a working set over the XBZRLE cache: XBZRLE does not pay: {steps}"
    compression = info.get("compression")
    assert compression and compression["pages"] > 1000, f"compressed pages should show in query-migrate: {info}"
    assert compression["compression-rate"] > 2, f"pages made to compress 4:1: {compression}"
    await compare_and_resume(src, dst)


@asynctest
async def test_escalation_switches_to_postcopy(launch):
    """postcopy-ram at both ends, max-cpu-throttle 20 (throttling cannot catch a guest that
    dirties its whole working set every pass), a 20 s budget: escalation throttles to 20%,
    then switches to postcopy; the migration completes through postcopy-active and the guest
    runs on at the destination, healthy."""
    uri = tcp_uri()
    src = launch("src", append=FAST)
    dst = launch("dst", incoming="defer")
    async with session(dst) as d:
        await set_capabilities(d, ["postcopy-ram"])
        assert await execute(d, "migrate-incoming", {"uri": uri}) == {}
    async with session(src) as s:
        with s.listener(("X_MIGRATION_ESCALATION", "MIGRATION")) as listener:
            heard = Escalations(listener)
            info, watch = await migrate_and_watch(
                s, src, uri, bandwidth=LINK, capabilities=["postcopy-ram", "events"], timeout=30,
                parameters={"x-slo-total-time": 20000, "max-cpu-throttle": 20, "downtime-limit": 50})
            steps = escalations(info)
            await heard.settle(len(steps))
            heard.check_against(info)
            statuses = heard.statuses()
        await wait_status(s, src, "postmigrate")
    assert [step["step"] for step in steps] == ["throttle", "postcopy"], \
        f"with the throttle capped at 20%, escalation should throttle to 20% and then switch to postcopy: {steps}"
    assert steps[0]["detail"].startswith("vCPUs throttled to 20%"), steps[0]
    assert steps[1]["detail"].startswith("switching to postcopy"), steps[1]
    assert "postcopy-active" in statuses and statuses[-1] == "completed", f"MIGRATION statuses: {statuses}"
    assert any(sample.get("status") == "postcopy-active" for sample in watch.samples), \
        f"query-migrate never said postcopy-active: {[s.get('status') for s in watch.samples]}"
    assert info["total-time"] <= 20000, info
    await check_destination_guest(src, dst)


@asynctest
async def test_budget_running_out_switches_to_postcopy(launch):
    """A 3 s budget that pre-copy cannot meet, postcopy-ram at both ends: when the budget is
    about to run out, escalation switches to postcopy (within a window, not waiting for a pass
    end) instead of cancelling, before the budget is spent; the migration completes and the
    guest runs on at the destination, healthy."""
    uri = tcp_uri()
    src = launch("src", append=FAST)
    dst = launch("dst", incoming="defer")
    budget = 3000
    async with session(dst) as d:
        await set_capabilities(d, ["postcopy-ram"])
        assert await execute(d, "migrate-incoming", {"uri": uri}) == {}
    async with session(src) as s:
        info, watch = await migrate_and_watch(s, src, uri, bandwidth=LINK, capabilities=["postcopy-ram"],
                                              parameters={"x-slo-total-time": budget}, timeout=20)
        await wait_status(s, src, "postmigrate")
    steps = escalations(info)
    names = [step["step"] for step in steps]
    assert "postcopy" in names and "cancel" not in names, f"postcopy is allowed: switch, do not cancel: {steps}"
    switch = steps[names.index("postcopy")]
    assert "budget is about to run out" in switch["detail"], f"the window's switch says why: {switch}"
    assert switch["at-ms"] <= budget, f"the switch to postcopy came after the budget: {steps}"
    assert any(sample.get("status") == "postcopy-active" for sample in watch.samples), \
        f"query-migrate never said postcopy-active: {[s.get('status') for s in watch.samples]}"
    await check_destination_guest(src, dst)


@asynctest
async def test_escalation_cancels_an_impossible_budget(launch):
    """A 3 s budget for 64 MiB dirtied faster than a 30 MiB/s link, no postcopy: escalation
    cancels before the budget runs out (status cancelling, then cancelled), with an error-desc
    that starts "SLO: " and a cancel step, reported as X_MIGRATION_ESCALATION; the source guest
    runs on, healthy."""
    uri = tcp_uri()
    src = launch("src", append=FAST)
    dst = launch("dst", incoming=uri)
    budget = 3000
    async with session(src) as s:
        with s.listener(("X_MIGRATION_ESCALATION", "MIGRATION")) as listener:
            heard = Escalations(listener)
            info, watch = await migrate_and_watch(s, src, uri, bandwidth=LINK, capabilities=["events"],
                                                  parameters={"x-slo-total-time": budget}, wanted=("cancelled",),
                                                  timeout=10)
            elapsed = info["_at"]
            steps = escalations(info)
            await heard.settle(len(steps))
            heard.check_against(info)
            deadline = time.monotonic() + 3
            while "cancelled" not in heard.statuses() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            statuses = heard.statuses()
        await check_source_runs_on(s, src)
        assert (await execute(s, "query-migrate"))["status"] == "cancelled"
    assert isinstance(info.get("error-desc"), str) and info["error-desc"].startswith("SLO: "), \
        f"an SLO cancel must say why, starting 'SLO: ': {info}"
    assert steps and steps[-1]["step"] == "cancel", f"the last escalation step should be the cancel: {steps}"
    assert steps[-1]["detail"].startswith("cancelled: "), steps[-1]
    assert steps[-1]["at-ms"] <= budget, f"the cancel came after the budget: {steps}"
    assert "postcopy" not in [step["step"] for step in steps], f"postcopy is off: {steps}"
    assert elapsed < budget / 1000 + 1, f"cancelled {elapsed:.1f} s after migrate, budget {budget / 1000:.0f} s"
    assert statuses[-2:] == ["cancelling", "cancelled"], f"MIGRATION statuses: {statuses}"
    assert any(event["step"] == "cancel" for event in heard.steps()), heard.events
    await expect_failed_load(dst)


# ----- parameters ----------------------------------------------------------------------------

@asynctest
async def test_slo_parameters(launch):
    vm = launch("vm")
    async with session(vm) as q:
        before = await execute(q, "query-migrate-parameters")
        assert before.get("x-slo-downtime") == 0 and before.get("x-slo-total-time") == 0, \
            f"x-slo-downtime and x-slo-total-time default to 0 (off): {before}"
        for arguments, desc in [({"x-slo-downtime": -1}, SLO_DOWNTIME_RANGE),
                                ({"x-slo-downtime": 2000001}, SLO_DOWNTIME_RANGE),
                                ({"x-slo-downtime": 1 << 40}, SLO_DOWNTIME_RANGE),
                                ({"x-slo-total-time": -1}, SLO_TOTAL_RANGE),
                                ({"x-slo-total-time": 86400001}, SLO_TOTAL_RANGE),
                                ({"x-slo-total-time": 5000, "x-slo-downtime": 2000001}, SLO_DOWNTIME_RANGE)]:
            await execute_error(q, "migrate-set-parameters", arguments, desc=desc)
            after = await execute(q, "query-migrate-parameters")
            assert after == before, f"a refused {arguments} changed the parameters: {before} -> {after}"
        for arguments in ({"x-slo-downtime": "5"}, {"x-slo-total-time": 1.5}, {"x-slo-total-time": True}):
            await execute_error(q, "migrate-set-parameters", arguments)
            assert await execute(q, "query-migrate-parameters") == before, arguments
        for downtime, total in [(2000000, 86400000), (1, 1), (250, 60000), (0, 0)]:
            assert await execute(q, "migrate-set-parameters", {"x-slo-downtime": downtime, "x-slo-total-time": total}) == {}
            after = await execute(q, "query-migrate-parameters")
            assert (after["x-slo-downtime"], after["x-slo-total-time"]) == (downtime, total), after
            assert after["downtime-limit"] == before["downtime-limit"], "x-slo-downtime must not rewrite downtime-limit"
    assert vm.alive()


@asynctest
async def test_slo_downtime_replaces_downtime_limit(launch):
    """downtime-limit 1 ms would never let a guest that dirties 16 MiB/s switch over; with
    x-slo-downtime 500 the forecast models a 500 ms stop, converges, and the migration
    completes with a stop in that range, without escalating."""
    uri = tcp_uri()
    src = launch("src", append="wss=32M rate=16M")
    dst = launch("dst", incoming=uri)
    async with session(src) as s:
        info, watch = await migrate_and_watch(s, src, uri, bandwidth=SLOW_LINK,
                                              parameters={"downtime-limit": 1, "x-slo-downtime": 500}, timeout=20)
        await wait_status(s, src, "postmigrate")
    later = [f for _, _, f in forecasts(watch) if f["basis"] == "passes"]
    assert later and all(f["converges"] for f in later), f"the forecast under a 500 ms stop: {later}"
    assert all(f["expected-downtime-ms"] <= 500 for f in later), later
    assert "x-escalations" not in info, f"nothing to escalate: {info}"
    assert info["downtime"] <= 1500, f"the stop should be about the 500 ms target: {info}"
    await check_destination_guest(src, dst)


# ----- the report ----------------------------------------------------------------------------

SVG = "{http://www.w3.org/2000/svg}"


def svg_texts(path: Path) -> tuple[ET.Element, list[ET.Element]]:
    """The report parsed as XML, and its <text> elements."""
    assert path.is_file() and path.stat().st_size > 0, f"no report at {path}"
    root = ET.parse(path).getroot()
    assert root.tag == f"{SVG}svg", f"the report's root is {root.tag}, not an SVG <svg>"
    return root, list(root.iter(f"{SVG}text"))


def pass_labels(texts: list[ET.Element]) -> list[int]:
    """The pass numbers the report writes on the remaining panel (small grey labels)."""
    return [int(t.text) for t in texts if t.get("font-size") == "9" and t.get("fill") == "#888"]


def run_cli(arguments: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Runs the tern CLI; on a timeout its whole process group is killed and the test fails."""
    process = subprocess.Popen([TERN_BINARY] + arguments, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate(timeout=5)
        raise AssertionError(f"tern {' '.join(arguments)} did not finish within {timeout:.0f} s\n"
                             f"--- stdout:\n{out[-2000:]}\n--- stderr:\n{err[-2000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@asynctest
async def test_migrate_report(launch, tmp_path):
    """`tern migrate --slo-total-time 30000 --report FILE` on the fast dirtier: the progress
    lines show the forecast and the escalation, the summary lists the escalation steps, and
    FILE is an SVG that parses, with the remaining panel, the pass numbers (up to the last
    pass) and the escalation marked. It exits 0 and says where the report is."""
    uri = tcp_uri()
    src = launch("src", append=FAST_SMALL)
    dst = launch("dst", incoming=uri)
    report = tmp_path / "migration.svg"
    async with session(src) as s:
        await src.wait_passes(1)
        assert await execute(s, "migrate-set-parameters", {"cpu-throttle-initial": 60}) == {}
    result = await asyncio.to_thread(run_cli, ["migrate", "--qmp", src.sock, "--speed", str(LINK),
                                               "--slo-total-time", "30000", "--report", str(report), uri], 35)
    output = f"\n--- stdout:\n{result.stdout[-3000:]}\n--- stderr:\n{result.stderr[-3000:]}"
    assert result.returncode == 0, f"tern migrate exited {result.returncode}" + output + src.diagnostics()
    assert "migration completed" in result.stdout, output
    assert f"report written to {report}" in result.stdout, output
    assert re.search(r"ETA \d+\.\d s, stop ~\d+ ms|forecast: does not converge", result.stderr), \
        "no forecast (ETA or 'does not converge') in the progress lines" + output
    assert "escalated: throttle" in result.stderr, "the progress lines should show the escalation" + output
    assert re.search(r"^  escalation +at \d+ ms: throttle: vCPUs throttled to \d+%", result.stdout, re.MULTILINE), \
        "the summary should list the escalation steps" + output
    passes = int(re.search(r"^  passes +(\d+) dirty-log syncs", result.stdout, re.MULTILINE).group(1))
    root, texts = svg_texts(report)
    words = [t.text or "" for t in texts]
    assert "remaining (MiB)" in words, f"the report lacks its remaining panel: {words}"
    assert "tern: migration completed" in words, words
    labels = pass_labels(texts)
    assert labels and labels[0] >= 1 and labels == sorted(set(labels)), f"the pass labels: {labels}"
    assert labels[-1] == passes, f"the last pass label is {labels[-1]}, the migration made {passes} passes"
    assert len(labels) >= 3, f"a migration of {passes} passes, each over 0.1 s, but only labels {labels}"
    assert any(w.startswith("throttle: vCPUs throttled to") for w in words), f"the escalation is not marked: {words}"
    assert any(w.strip().startswith("escalation") for w in words), f"the summary lines lack the escalation: {words}"
    assert len(list(root.iter(f"{SVG}path"))) >= 3, "the report should draw its series as paths"
    async with session(dst) as d:
        await wait_status(d, dst, "running", timeout=10)
    await check_destination_guest(src, dst)


@asynctest
async def test_migrate_cli_cancelled_by_slo(launch, tmp_path):
    """`tern migrate` with a budget nothing can meet: the migration is cancelled, the summary
    says why ("SLO: ...") and lists the cancel, the report is still written, and it exits 1."""
    uri = tcp_uri()
    src = launch("src", append=FAST)
    dst = launch("dst", incoming=uri)
    report = tmp_path / "cancelled.svg"
    await src.wait_passes(1)
    result = await asyncio.to_thread(run_cli, ["migrate", "--qmp", src.sock, "--speed", str(LINK),
                                               "--slo-total-time", "3000", "--report", str(report), uri], 20)
    output = f"\n--- stdout:\n{result.stdout[-3000:]}\n--- stderr:\n{result.stderr[-3000:]}"
    assert result.returncode == 1, f"a cancelled migration should exit 1, got {result.returncode}" + output
    assert "migration cancelled" in result.stdout and "  error: SLO: " in result.stdout, output
    assert re.search(r"^  escalation +at \d+ ms: cancel: cancelled: ", result.stdout, re.MULTILINE), output
    assert f"report written to {report}" in result.stdout, output
    _, texts = svg_texts(report)
    assert "tern: migration cancelled" in [t.text for t in texts]
    async with session(src) as s:
        await check_source_runs_on(s, src)
    await expect_failed_load(dst)


def test_demo_report(tmp_path):
    """`tern demo --report FILE` writes the picture there and says so."""
    report = tmp_path / "demo.svg"
    result = run_cli(["demo", "--report", str(report), "-m", "128M", "-append", "wss=16M rate=8M"], 30)
    output = f"\n--- stdout:\n{result.stdout[-3000:]}\n--- stderr:\n{result.stderr[-3000:]}"
    assert result.returncode == 0, f"tern demo exited {result.returncode}" + output
    assert f"demo: wrote a picture of the migration to {report}" in result.stdout, output
    _, texts = svg_texts(report)
    words = [t.text for t in texts]
    assert "remaining (MiB)" in words and "tern: migration completed" in words, words
    assert pass_labels(texts), f"no pass label in the demo's report: {words}"
