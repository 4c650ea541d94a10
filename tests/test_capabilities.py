"""The migration capabilities xbzrle, compress and auto-converge, with real migrations between
tern processes driven over QMP with qemu.qmp, and the QMP commands and parameters that go with
them (migrate-set-cache-size, query-migrate-cache-size, xbzrle-cache-size, multifd-compression,
cpu-throttle-*, max-cpu-throttle).

Each migration is checked from both ends: the source's query-migrate (status, the capability's
own statistics, which must show that it did its work), the destination's RAM against the
source's (x-query-memory-digest, with the destination held paused by -S), and the destination
guest's self-check (pass lines carried on from the source, all ok). Where a saved stream is
read back, the pages in it are decoded in Python (XBZRLE deltas, zlib and zstd frames) and the
RAM they make must be the source's.

The guest's `lines=N` token (a rewrite changes only the first N 64-byte lines of a page: what
XBZRLE is for) and `pattern=compressible ratio=R` (pages that zlib level 1 compresses about R:1)
are documented in guest/README.md.

Skipped, loudly, without /dev/kvm or the tern binary (TERN_BINARY, default .build/debug/tern).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from typing import Iterable, Optional

import pytest

from migration_support import (
    ENC_XBZRLE, ENC_ZLIB, ENC_ZSTD, MEMORY_BYTES, PAGE, SECTION_DATA, SLOW, UNLIMITED, VM,
    ZstdUnavailable, asynctest, execute, execute_error, parse_stream, ram_image, session, skip_reason, status,
    wait_migration, wait_status,
)
from test_migration import check_destination_guest, launch, tcp_uri  # noqa: F401 - launch is a fixture

_SKIP = skip_reason()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

MiB = 1 << 20
#: XBZRLE's case: 32 MiB rewritten at 32 MiB/s, each rewrite changing two 64-byte lines.
XBZRLE_APPEND = "wss=32M rate=32M lines=2"
#: Pages that zlib level 1 compresses about 3:1 (guest/README.md's table).
COMPRESSIBLE_APPEND = "wss=32M rate=16M pattern=compressible ratio=3"
#: A guest that dirties four times faster than AUTO_CONVERGE_BANDWIDTH carries: the migration
#: cannot converge unless its vCPUs are throttled.
AUTO_CONVERGE_APPEND = "wss=8M rate=32M"
AUTO_CONVERGE_BANDWIDTH = 8 * MiB
#: What the guest dirties when nothing throttles it, in MiB/s (AUTO_CONVERGE_APPEND's rate).
AUTO_CONVERGE_RATE = 32


async def set_capabilities(qmp, names: Iterable[str], state: bool = True) -> None:
    names = list(names)
    if names:
        assert await execute(qmp, "migrate-set-capabilities",
                             {"capabilities": [{"capability": n, "state": state} for n in names]}) == {}
    listed = {c["capability"]: c["state"] for c in await execute(qmp, "query-migrate-capabilities")}
    for name in names:
        assert listed[name] is state, f"capability {name} should be {state}: {listed}"


async def deferred_destination(launch, uri: str, capabilities: Iterable[str] = (), label: str = "dst",
                               **options) -> VM:
    """A destination started with -incoming defer: capabilities set, then migrate-incoming."""
    dst = launch(label, incoming="defer", **options)
    async with session(dst) as d:
        assert await status(d) == "inmigrate"
        await set_capabilities(d, capabilities)
        assert await execute(d, "migrate-incoming", {"uri": uri}) == {}
    return dst


class Watch:
    """What the source's query-migrate said while the migration ran."""

    def __init__(self):
        self.samples: list[dict] = []

    @property
    def active(self) -> list[dict]:
        return [s for s in self.samples if s.get("status") == "active"]

    def throttles(self) -> list[int]:
        return [s["cpu-throttle-percentage"] for s in self.active if "cpu-throttle-percentage" in s]


async def run_migration(s, src: VM, uri: str, *, bandwidth: Optional[int], capabilities: Iterable[str] = (),
                        parameters: Optional[dict] = None, cache_size: Optional[int] = None,
                        timeout: float = 30, watch: Optional[Watch] = None,
                        wanted: Iterable[str] = ("completed",)) -> dict:
    """Sets the source up (bandwidth None: the default 32 MiB/s), migrates, and polls
    query-migrate until the status is one of `wanted` (failing at once on another final
    status); returns the final query-migrate."""
    await src.wait_passes(1)
    await set_capabilities(s, capabilities)
    if cache_size is not None:
        assert await execute(s, "migrate-set-cache-size", {"value": cache_size}) == {}
    parameters = dict(parameters or {})
    if bandwidth is not None:
        parameters["max-bandwidth"] = bandwidth
    if parameters:
        assert await execute(s, "migrate-set-parameters", parameters) == {}
    watch = watch if watch is not None else Watch()
    await execute(s, "migrate", {"uri": uri})
    wanted = set(wanted)
    deadline = time.monotonic() + timeout
    while True:
        info = await execute(s, "query-migrate")
        watch.samples.append(info)
        current = info.get("status")
        if current in wanted:
            return info
        if current in ("completed", "failed", "cancelled"):
            raise AssertionError(f"the migration ended {current}, wanted {sorted(wanted)}: {info}" + src.diagnostics())
        if time.monotonic() > deadline:
            raise AssertionError(f"the migration is still {current} after {timeout:.0f} s: {info}" + src.diagnostics())
        await asyncio.sleep(0.1)


async def check_completed(s, src: VM, info: dict) -> None:
    for member in ("total-time", "downtime", "setup-time", "ram"):
        assert member in info, f"completed query-migrate lacks {member!r}: {info}"
    ram = info["ram"]
    assert ram["total"] == MEMORY_BYTES and ram["remaining"] == 0 and ram["transferred"] > 0, info
    await wait_status(s, src, "postmigrate")


async def compare_and_resume(src: VM, dst: VM) -> None:
    """The paused destination's RAM equals the completed source's; then the destination runs
    the guest on, and its self-check passes."""
    async with session(src) as s, session(dst) as d:
        await wait_status(d, dst, "paused", timeout=10)
        incoming = await wait_migration(d, dst, wanted=("completed",), timeout=5)
        assert incoming.get("status") == "completed", f"destination query-migrate: {incoming}"
        source = await execute(s, "x-query-memory-digest", timeout=20)
        destination = await execute(d, "x-query-memory-digest", timeout=20)
        assert source["size"] == destination["size"] == MEMORY_BYTES, (source, destination)
        assert source["sha256"] == destination["sha256"], \
            f"guest RAM differs after migration: source {source}, destination {destination}" + dst.diagnostics()
        await execute(d, "cont")
        await wait_status(d, dst, "running")
    await check_destination_guest(src, dst)


def rates(vm: VM) -> list[int]:
    """The rate (MiB/s) of each of the guest's pass lines."""
    return [int(m.group(1)) for m in re.finditer(r"^tern-guest: pass \d+ rate (\d+)MiB/s", vm.log_text(), re.MULTILINE)]


# ----- XBZRLE --------------------------------------------------------------------------------

def check_xbzrle_statistics(info: dict, cache_size: int, compress: bool = False) -> dict:
    assert "xbzrle-cache" in info, f"with the xbzrle capability on, query-migrate must show xbzrle-cache: {info}"
    assert compress or "compression" not in info, f"compress is off: no compression member: {info}"
    xbzrle = info["xbzrle-cache"]
    assert set(xbzrle) == {"cache-size", "bytes", "pages", "cache-miss", "cache-miss-rate", "overflow"}, xbzrle
    assert xbzrle["cache-size"] == cache_size, f"xbzrle-cache.cache-size should be the size set: {xbzrle}"
    assert isinstance(xbzrle["cache-miss-rate"], (int, float)) and 0 <= xbzrle["cache-miss-rate"] <= 1, xbzrle
    return xbzrle


@asynctest
async def test_xbzrle_migration(launch):
    """A guest that rewrites two cache lines per page, a 16 MiB/s link so the dirty pages of
    the first pass go again as deltas: XBZRLE sends pages, far fewer bytes than whole pages would
    take, and the destination's RAM is the source's."""
    uri = tcp_uri()
    src = launch("src", append=XBZRLE_APPEND)
    dst = launch("dst", incoming=uri, paused=True)
    async with session(src) as s:
        info = await run_migration(s, src, uri, bandwidth=16 * MiB, capabilities=["xbzrle"], cache_size=32 * MiB)
        assert await execute(s, "query-migrate-cache-size") == 32 * MiB
        await check_completed(s, src, info)
    ram = info["ram"]
    xbzrle = check_xbzrle_statistics(info, 32 * MiB)
    assert ram["dirty-sync-count"] >= 2, f"the 16 MiB/s link should take more than one pass: {info}"
    assert xbzrle["pages"] > 1000, f"the second pass's dirty pages should have gone as XBZRLE deltas: {info}"
    assert 0 < xbzrle["bytes"] < xbzrle["pages"] * 512, \
        f"a page with two rewritten 64-byte lines should encode in well under 512 bytes: {xbzrle}"
    assert xbzrle["overflow"] == 0, f"two changed lines never make a delta larger than the page: {xbzrle}"
    assert xbzrle["cache-miss"] >= ram["normal"] // 2, f"the first pass misses the cache: {info}"
    whole_pages = (ram["normal"] + xbzrle["pages"]) * PAGE
    assert ram["transferred"] < whole_pages * 0.75, \
        f"XBZRLE saved little: {ram['transferred']} bytes sent for {whole_pages} bytes of pages: {info}"
    await compare_and_resume(src, dst)


@asynctest
async def test_xbzrle_tiny_cache_misses(launch):
    """A 64 KiB cache holds 16 pages of a 32 MiB working set: nearly every dirty page misses it
    and goes whole, and query-migrate says so. The migration still completes, with the
    destination's RAM the source's."""
    uri = tcp_uri()
    src = launch("src", append="wss=32M rate=8M lines=2")
    dst = launch("dst", incoming=uri, paused=True)
    async with session(src) as s:
        info = await run_migration(s, src, uri, bandwidth=16 * MiB, capabilities=["xbzrle"], cache_size=64 << 10)
        assert await execute(s, "query-migrate-cache-size") == 64 << 10
        await check_completed(s, src, info)
    ram = info["ram"]
    xbzrle = check_xbzrle_statistics(info, 64 << 10)
    assert ram["dirty-sync-count"] >= 2, info
    assert xbzrle["cache-miss"] > 0, f"a 16-page cache must miss: {info}"
    # The first pass (about 8200 pages with data) misses in any cache; here the later passes'
    # pages miss too, and go whole.
    assert xbzrle["cache-miss"] > 8192 + 1000, f"the later passes should have missed the tiny cache too: {info}"
    assert xbzrle["pages"] < xbzrle["cache-miss"] // 10, f"a 16-page cache cannot hit often: {info}"
    assert ram["normal"] >= xbzrle["cache-miss"] - 64, f"every miss goes as a whole page: {info}"
    await compare_and_resume(src, dst)


@asynctest
async def test_xbzrle_saved_stream(launch, tmp_path):
    """XBZRLE into a file: the stream carries XBZRLE records (announced in its configuration),
    the pages decoded from it in Python (zero runs, raw pages, then the deltas applied on top)
    are the source's RAM, and the file restores."""
    path = tmp_path / "xbzrle.tern"
    src = launch("src", append=XBZRLE_APPEND)
    async with session(src) as s:
        info = await run_migration(s, src, f"exec:cat > {path}", bandwidth=16 * MiB, capabilities=["xbzrle"])
        await check_completed(s, src, info)
        digest = await execute(s, "x-query-memory-digest", timeout=20)
    xbzrle = check_xbzrle_statistics(info, 64 * MiB)  # QEMU's default cache size
    data = path.read_bytes()
    assert len(data) == info["ram"]["transferred"], (len(data), info)
    records = parse_stream(data)
    assert "xbzrle" in records.configuration["capabilities"], records.configuration
    assert ENC_XBZRLE in records.configuration["encodings"], records.configuration
    deltas = records.of(SECTION_DATA, "ram", ENC_XBZRLE)
    assert deltas, f"the stream has no XBZRLE record, though query-migrate counted {xbzrle['pages']} pages"
    assert sum(r.values["count"] for r in deltas) == xbzrle["pages"], (len(deltas), xbzrle)
    assert sum(length for r in deltas for _, _, length in r.values["entries"]) == xbzrle["bytes"], xbzrle
    image = hashlib.sha256(ram_image(data, records)).hexdigest()
    assert image == digest["sha256"], "the RAM decoded from the XBZRLE stream is not the source's"
    dst = launch("dst", incoming=f"exec:cat {path}")
    async with session(dst) as d:
        await wait_status(d, dst, "running", timeout=15)
    await dst.assert_guest_continues(src.passes()[-1][0])


@asynctest
async def test_xbzrle_cache_resized_during_migration(launch):
    """migrate-set-cache-size while an XBZRLE migration runs: the migration takes the new size
    at its next pass (xbzrle-cache.cache-size shows it), every page misses the fresh cache once,
    and the destination's RAM is still the source's."""
    uri = tcp_uri()
    src = launch("src", append=XBZRLE_APPEND)
    dst = launch("dst", incoming=uri, paused=True)
    async with session(src) as s:
        info = await run_migration(s, src, uri, bandwidth=16 * MiB, capabilities=["xbzrle"], cache_size=32 * MiB,
                                   wanted=("active",))
        assert info["xbzrle-cache"]["cache-size"] == 32 * MiB, info
        assert await execute(s, "migrate-set-cache-size", {"value": 8 * MiB}) == {}
        assert await execute(s, "query-migrate-cache-size") == 8 * MiB
        deadline = time.monotonic() + 15
        while info.get("xbzrle-cache", {}).get("cache-size") != 8 * MiB:
            assert info["status"] == "active", f"the migration ended before it took the new cache size: {info}"
            assert time.monotonic() < deadline, f"the new cache size never showed: {info}" + src.diagnostics()
            await asyncio.sleep(0.1)
            info = await execute(s, "query-migrate")
        misses = info["xbzrle-cache"]["cache-miss"]
        await execute(s, "migrate_set_speed", {"value": UNLIMITED})  # now let it finish
        info = await wait_migration(s, src, timeout=20)
        await check_completed(s, src, info)
    xbzrle = check_xbzrle_statistics(info, 8 * MiB)
    assert xbzrle["cache-miss"] > misses, f"the fresh cache should have missed: {misses} -> {xbzrle}"
    assert "XBZRLE cache resized to 8 MiB" in src.stderr_text(), src.diagnostics()
    await compare_and_resume(src, dst)


# ----- compression ---------------------------------------------------------------------------

def check_compression_statistics(info: dict) -> dict:
    assert "compression" in info, f"with the compress capability on, query-migrate must show compression: {info}"
    compression = info["compression"]
    assert set(compression) == {"pages", "busy", "busy-rate", "compressed-size", "compression-rate"}, compression
    return compression


@pytest.mark.parametrize("method", ["zlib", "zstd"])
@asynctest
async def test_compress_migration(launch, method):
    """compress on both sides (the destination deferred to set it), pages that compress about
    3:1: pages go compressed at a rate above 1.5, and the destination's RAM is the source's."""
    uri = tcp_uri()
    src = launch("src", append=COMPRESSIBLE_APPEND)
    dst = await deferred_destination(launch, uri, ["compress"], paused=True)
    async with session(src) as s:
        info = await run_migration(s, src, uri, bandwidth=32 * MiB, capabilities=["compress"],
                                   parameters={"multifd-compression": method})
        assert (await execute(s, "query-migrate-parameters"))["multifd-compression"] == method
        await check_completed(s, src, info)
    assert "xbzrle-cache" not in info, f"xbzrle is off: no xbzrle-cache member: {info}"
    compression = check_compression_statistics(info)
    assert compression["pages"] > 8000, f"the 32 MiB working set should have gone compressed: {info}"
    assert compression["compression-rate"] > 1.5, f"{method} on 3:1 pages: {info}"
    assert compression["compressed-size"] > 0 and compression["busy"] == 0, compression
    expected = compression["pages"] * PAGE / compression["compressed-size"]
    assert abs(compression["compression-rate"] - expected) < 0.01, \
        f"compression-rate should be page bytes over compressed bytes ({expected:.3f}): {compression}"
    assert info["ram"]["transferred"] < compression["pages"] * PAGE / 1.5, \
        f"the bytes sent should reflect the compression: {info}"
    await compare_and_resume(src, dst)


@pytest.mark.parametrize("method", ["zlib", "zstd", "none"])
@asynctest
async def test_compress_saved_stream(launch, tmp_path, method):
    """compress into a file, restored by a deferred destination with compress on (exec:cat):
    the stream's records are in the method's encoding (`none` is zlib, as QEMU 2015), and the
    pages decoded from them in Python are the source's RAM."""
    path = tmp_path / f"compress-{method}.tern"
    src = launch("src", append=COMPRESSIBLE_APPEND)
    async with session(src) as s:
        info = await run_migration(s, src, f"exec:cat > {path}", bandwidth=UNLIMITED, capabilities=["compress"],
                                   parameters={"multifd-compression": method})
        await check_completed(s, src, info)
        digest = await execute(s, "x-query-memory-digest", timeout=20)
    compression = check_compression_statistics(info)
    data = path.read_bytes()
    records = parse_stream(data)
    encoding = ENC_ZSTD if method == "zstd" else ENC_ZLIB
    assert "compress" in records.configuration["capabilities"], records.configuration
    assert encoding in records.configuration["encodings"], records.configuration
    compressed = records.of(SECTION_DATA, "ram", encoding)
    assert sum(r.values["count"] for r in compressed) == compression["pages"], compression
    other = {ENC_ZLIB, ENC_ZSTD} - {encoding}
    assert not any(r.encoding in other for r in records.ram), "pages in the other compression method"
    try:
        image = hashlib.sha256(ram_image(data, records)).hexdigest()
    except ZstdUnavailable as why:
        image = None
        print(f"note: the decoded-RAM check was left out: {why}")
    if image is not None:
        assert image == digest["sha256"], f"the RAM decoded from the {method} stream is not the source's"
    dst = await deferred_destination(launch, f"exec:cat {path}", ["compress"])
    async with session(dst) as d:
        await wait_status(d, dst, "running", timeout=15)
    await dst.assert_guest_continues(src.passes()[-1][0])


# ----- auto-converge -------------------------------------------------------------------------

def check_throttle_members(info: dict) -> None:
    if "cpu-throttle-percentage" in info or "x-cpu-throttle-percentage" in info:
        assert info.get("cpu-throttle-percentage") == info.get("x-cpu-throttle-percentage"), \
            f"the 2015 name and the later one must agree: {info}"
        assert 1 <= info["cpu-throttle-percentage"] <= 99, info


@asynctest
async def test_auto_converge_completes(launch):
    """The guest dirties four times what the link carries: auto-converge throttles its vCPUs
    (cpu-throttle-percentage shows while active), the migration completes, the completed
    query-migrate shows the highest throttle and no current one, the destination's RAM is the
    source's, and the destination's guest runs unthrottled."""
    uri = tcp_uri()
    src = launch("src", append=AUTO_CONVERGE_APPEND)
    dst = launch("dst", incoming=uri, paused=True)
    watch = Watch()
    async with session(src) as s:
        info = await run_migration(s, src, uri, bandwidth=AUTO_CONVERGE_BANDWIDTH, capabilities=["auto-converge"],
                                   parameters={"cpu-throttle-initial": 60, "cpu-throttle-increment": 20},
                                   timeout=40, watch=watch)
        await check_completed(s, src, info)
    for sample in watch.samples:
        check_throttle_members(sample)
    throttles = watch.throttles()
    assert throttles and max(throttles) > 0, \
        f"the migration converged without a throttle: {watch.active[-1:]}" + src.diagnostics()
    assert min(throttles) >= 60, f"the first throttle step is at least cpu-throttle-initial: {throttles}"
    assert throttles == sorted(throttles), f"the throttle only rises during a migration: {throttles}"
    assert "cpu-throttle-percentage" not in info and "x-cpu-throttle-percentage" not in info, \
        f"a completed migration holds no throttle: {info}"
    assert info.get("x-cpu-throttle-maximum", 0) >= max(throttles), \
        f"x-cpu-throttle-maximum should be the highest throttle seen ({max(throttles)}): {info}"
    assert "auto-converge: vCPUs throttled to" in src.stderr_text(), src.diagnostics()
    await compare_and_resume(src, dst)
    # The throttle is the source's: the guest on the destination dirties at its full rate.
    seen = len(dst.passes())
    await dst.wait_passes(2, after=seen, timeout=10)
    assert min(rates(dst)[-2:]) >= AUTO_CONVERGE_RATE * 0.8, \
        f"the destination's guest runs throttled: {rates(dst)}" + dst.diagnostics()


@pytest.mark.parametrize("ending", ["cancel", "destination-dies"])
@asynctest
async def test_auto_converge_cancel_restores_speed(launch, ending):
    """Throttled (cpu-throttle-initial 90, so the guest visibly slows but still prints its pass
    lines at a readable pace: at 99 one line took over 10 s), then cancelled, or
    failed because the destination died: the throttle goes with the migration (no throttle
    member in query-migrate) and the source's guest dirties at its full rate again."""
    uri = tcp_uri()
    src = launch("src", append=AUTO_CONVERGE_APPEND)
    dst = launch("dst", incoming=uri)
    dst.expect_exit = True  # it fails its load when the source cancels
    async with session(src) as s:
        info = await run_migration(s, src, uri, bandwidth=AUTO_CONVERGE_BANDWIDTH, capabilities=["auto-converge"],
                                   # downtime-limit 0: even throttled, the migration must not
                                   # converge before this test cancels it (it did once in CI).
                                   # max-cpu-throttle 90: at 99 a pass can find nothing dirty
                                   # (pending 0 completes even with downtime-limit 0).
                                   parameters={"cpu-throttle-initial": 90, "max-cpu-throttle": 90,
                                               "downtime-limit": 0}, timeout=25,
                                   wanted=("active",))
        deadline = time.monotonic() + 25
        while "cpu-throttle-percentage" not in info:
            assert info.get("status") == "active", f"the migration ended before it throttled: {info}"
            assert time.monotonic() < deadline, f"no throttle within 25 s: {info}" + src.diagnostics()
            await asyncio.sleep(0.2)
            info = await execute(s, "query-migrate")
        check_throttle_members(info)
        assert info["cpu-throttle-percentage"] == 90, f"cpu-throttle-initial 90 is the first step and the cap: {info}"
        # The vCPU is out of the guest 90% of the time. (The guest's own pass rate shows it only
        # loosely: it catches up after each sleep, and a CI machine ran it at 16-20 MiB/s at 90%.)
        busy = await src.vcpu_busy_fraction(2.0)
        assert busy < 0.35, f"throttled to 90%, the vCPU still ran {busy:.0%} of the time" + src.diagnostics()
        assert (await execute(s, "query-migrate"))["status"] == "active"
        if ending == "cancel":
            assert await execute(s, "migrate_cancel") == {}
            final = await wait_migration(s, src, wanted=("cancelled",), timeout=10)
            assert final == {"status": "cancelled"}, f"a cancelled migration shows no throttle: {final}"
        else:
            dst.kill()
            final = await wait_migration(s, src, wanted=("failed",), timeout=15)
            assert set(final) == {"status", "error-desc"}, f"a failed migration shows no throttle: {final}"
        await wait_status(s, src, "running")
        busy = await src.vcpu_busy_fraction(1.0)
        assert busy > 0.6, f"after the {ending} the vCPU ran only {busy:.0%} of the time" + src.diagnostics()
        # The first line after the cancel may still cover throttled time; the two after it not.
        seen = len(rates(src))
        await src.wait_passes(3, after=seen, timeout=10)
        recovered = rates(src)[seen + 1:]
        assert min(recovered) >= AUTO_CONVERGE_RATE * 0.8, \
            f"the source's guest is still slow after the {ending}: rates {rates(src)}" + src.diagnostics()
        src.assert_healthy()
        assert (await execute(s, "query-migrate")) == final
    assert "auto-converge: throttle off" in src.stderr_text(), src.diagnostics()


@asynctest
async def test_auto_converge_respects_max_cpu_throttle(launch):
    """max-cpu-throttle 40: the throttle never goes above it, however far the guest outruns the
    link (so this migration cannot converge and is cancelled)."""
    uri = tcp_uri()
    src = launch("src", append=AUTO_CONVERGE_APPEND)
    dst = launch("dst", incoming=uri)
    dst.expect_exit = True
    watch = Watch()
    async with session(src) as s:
        await run_migration(s, src, uri, bandwidth=AUTO_CONVERGE_BANDWIDTH, capabilities=["auto-converge"],
                            parameters={"cpu-throttle-initial": 20, "cpu-throttle-increment": 15,
                                        "max-cpu-throttle": 40}, wanted=("active",), watch=watch)
        assert (await execute(s, "query-migrate-parameters"))["max-cpu-throttle"] == 40

        async def sample() -> dict:
            info = await execute(s, "query-migrate")
            assert info.get("status") == "active", f"this migration cannot end by itself: {info}"
            check_throttle_members(info)
            watch.samples.append(info)
            return info

        # The throttle rises to the cap (the guest needs far more) ...
        deadline = time.monotonic() + 25
        while (await sample()).get("cpu-throttle-percentage") != 40:
            assert time.monotonic() < deadline, \
                f"the throttle did not reach max-cpu-throttle 40 in 25 s: {sorted(set(watch.throttles()))}" + src.diagnostics()
            await asyncio.sleep(0.2)
        # ... and stays there through several more periods that call for more.
        until = time.monotonic() + 5
        while time.monotonic() < until:
            await sample()
            await asyncio.sleep(0.2)
        throttles = watch.throttles()
        assert max(throttles) == 40 and throttles[-1] == 40, \
            f"the throttle went past max-cpu-throttle 40 or fell back: {throttles}"
        await execute(s, "migrate_cancel")
        await wait_migration(s, src, wanted=("cancelled",), timeout=10)
        await wait_status(s, src, "running")


# ----- combinations --------------------------------------------------------------------------

@asynctest
async def test_xbzrle_with_compress(launch):
    """Both: the first pass's pages go compressed, the later passes' dirty pages as XBZRLE
    deltas (or compressed, on a miss), and the destination's RAM is the source's."""
    uri = tcp_uri()
    src = launch("src", append="wss=32M rate=32M lines=2 pattern=compressible ratio=3")
    dst = await deferred_destination(launch, uri, ["compress"], paused=True)
    async with session(src) as s:
        info = await run_migration(s, src, uri, bandwidth=8 * MiB, capabilities=["xbzrle", "compress"],
                                   parameters={"multifd-compression": "zlib"})
        await check_completed(s, src, info)
    xbzrle = check_xbzrle_statistics(info, 64 * MiB, compress=True)
    compression = check_compression_statistics(info)
    assert info["ram"]["dirty-sync-count"] >= 2, info
    assert compression["pages"] > 8000 and compression["compression-rate"] > 1.5, f"the first pass: {info}"
    assert xbzrle["pages"] > 0, f"the later passes' dirty pages should have gone as deltas: {info}"
    await compare_and_resume(src, dst)


@asynctest
async def test_xbzrle_with_auto_converge(launch):
    """Both, with a guest that rewrites whole pages faster than the link carries them: XBZRLE
    cannot help (the deltas overflow), so auto-converge throttles; the migration completes with
    the destination's RAM the source's."""
    uri = tcp_uri()
    src = launch("src", append=AUTO_CONVERGE_APPEND)
    dst = launch("dst", incoming=uri, paused=True)
    watch = Watch()
    async with session(src) as s:
        info = await run_migration(s, src, uri, bandwidth=AUTO_CONVERGE_BANDWIDTH,
                                   capabilities=["xbzrle", "auto-converge"],
                                   parameters={"cpu-throttle-initial": 60, "cpu-throttle-increment": 20},
                                   timeout=40, watch=watch)
        await check_completed(s, src, info)
    xbzrle = check_xbzrle_statistics(info, 64 * MiB)
    assert watch.throttles(), f"auto-converge did not throttle: {watch.active[-1:]}" + src.diagnostics()
    assert info.get("x-cpu-throttle-maximum", 0) >= max(watch.throttles()), info
    assert xbzrle["overflow"] > 0, f"whole-page rewrites should overflow the XBZRLE delta: {xbzrle}"
    await compare_and_resume(src, dst)


@asynctest
async def test_xbzrle_makes_auto_converge_unnecessary(launch):
    """Both, with a guest that rewrites two lines per page: its dirty pages are cheap as
    deltas, so although it dirties faster than the link carries whole pages, auto-converge
    (which weighs dirty pages by their cost on the wire) has no cause to throttle."""
    uri = tcp_uri()
    src = launch("src", append="wss=16M rate=32M lines=2")
    dst = launch("dst", incoming=uri, paused=True)
    watch = Watch()
    async with session(src) as s:
        info = await run_migration(s, src, uri, bandwidth=16 * MiB, capabilities=["xbzrle", "auto-converge"],
                                   timeout=30, watch=watch)
        await check_completed(s, src, info)
    xbzrle = check_xbzrle_statistics(info, 64 * MiB)
    assert xbzrle["pages"] > 0, info
    assert not watch.throttles() and "x-cpu-throttle-maximum" not in info, \
        f"the guest was throttled although its pages went as small deltas: {watch.throttles()} {info}"
    await compare_and_resume(src, dst)


# ----- what the two ends must agree on -------------------------------------------------------

MISMATCHES = {
    # case: (source options, destination options, source capabilities, destination capabilities,
    #        what the error must say)
    "compress-source-only": ({}, {}, ["compress"], [],
                             "the source uses capability 'compress' but it is off here"),
    "compress-destination-only": ({}, {}, [], ["compress"],
                                  "capability 'compress' is on here but the source does not use it"),
    "smp-2-to-1": ({"smp": 2}, {"smp": 1}, [], [], "the source has 2 vCPUs, this machine 1"),
    "memory-128M-to-256M": ({"memory": "128M"}, {"memory": "256M"}, [], [],
                            "the source has 128 MiB of RAM, this machine 256 MiB"),
}


@pytest.mark.parametrize("speed", ["slow", "default"])
@pytest.mark.parametrize("case", list(MISMATCHES))
@asynctest
async def test_mismatch_fails_early(launch, case, speed):
    """A destination that cannot take the stream refuses it at the configuration record, before
    any page; over tcp the source hears why on the return path: its migration fails quickly
    with an error-desc that names the difference, and its guest keeps running.

    `slow` (1 MiB/s, at which the RAM would take half a minute) also shows that little was sent
    before the refusal arrived; `default` (32 MiB/s, no max-bandwidth set) is the speed a user
    gets, where the source is still writing its first burst when the destination hangs up."""
    source_options, destination_options, source_caps, destination_caps, reason = MISMATCHES[case]
    uri = tcp_uri()
    src = launch("src", **source_options)
    dst = await deferred_destination(launch, uri, destination_caps, **destination_options)
    dst.expect_exit = True
    watch = Watch()
    async with session(src) as s:
        started = time.monotonic()
        info = await run_migration(s, src, uri, bandwidth=SLOW if speed == "slow" else None, capabilities=source_caps,
                                   timeout=15, watch=watch, wanted=("failed",))
        elapsed = time.monotonic() - started
        desc = info.get("error-desc", "")
        await wait_status(s, src, "running")
        seen = len(src.passes())
        await src.wait_passes(2, after=seen, timeout=10)
        src.assert_healthy()
        assert desc.startswith("the destination refused the migration:"), \
            f"the source should say the destination refused: {info}" + src.diagnostics()
        assert reason in desc, f"the error-desc should name the difference ({reason!r}): {desc!r}"
        assert elapsed < 10, f"the refusal took {elapsed:.1f} s to reach the source"
        sent = [sample["ram"]["transferred"] for sample in watch.active if "ram" in sample]
        if speed == "slow":
            assert not sent or max(sent) < 8 * MiB, f"the source sent {max(sent)} bytes before it heard the refusal"
    rc = await dst.wait_exit(timeout=10)
    assert rc == 1 and "load of migration failed" in dst.stderr_text() and reason in dst.stderr_text(), \
        f"the destination should fail its load naming {reason!r}, exit status {rc}" + dst.diagnostics()
    assert not dst.passes(), "the refusing destination ran a guest" + dst.diagnostics()


@asynctest
async def test_refused_migration_can_be_retried(launch):
    """After a destination refused it (compress on the source only), the source migrates again,
    to a destination with compress on, and that one completes with the source's RAM."""
    uri = tcp_uri()
    src = launch("src", append=COMPRESSIBLE_APPEND)
    refusing = await deferred_destination(launch, uri, label="refusing")
    refusing.expect_exit = True
    async with session(src) as s:
        info = await run_migration(s, src, uri, bandwidth=SLOW, capabilities=["compress"], timeout=15,
                                   wanted=("failed",))
        assert "capability 'compress'" in info.get("error-desc", ""), info
        await wait_status(s, src, "running")
    assert await refusing.wait_exit(timeout=10) == 1, refusing.diagnostics()
    retry = tcp_uri()
    dst = await deferred_destination(launch, retry, ["compress"], paused=True)
    async with session(src) as s:
        info = await run_migration(s, src, retry, bandwidth=UNLIMITED, capabilities=["compress"])
        await check_completed(s, src, info)
    assert check_compression_statistics(info)["pages"] > 8000, info
    await compare_and_resume(src, dst)


# ----- QMP: cache size and parameters --------------------------------------------------------

TOO_LARGE = "Parameter 'cache size' expects exceeds guest ram size "
TOO_SMALL = "Parameter 'cache size' expects is smaller than page size"


@asynctest
async def test_cache_size_commands(launch):
    vm = launch("vm")
    async with session(vm) as q:
        assert await execute(q, "query-migrate-cache-size") == 64 * MiB, "QEMU's default XBZRLE cache is 64 MiB"
        assert (await execute(q, "query-migrate-parameters"))["xbzrle-cache-size"] == 64 * MiB
        for value, desc in [(MEMORY_BYTES + 1, TOO_LARGE), (1 << 40, TOO_LARGE), (-1, TOO_LARGE),
                            (4095, TOO_SMALL), (0, TOO_SMALL), (1, TOO_SMALL)]:
            await execute_error(q, "migrate-set-cache-size", {"value": value}, desc=desc)
            assert await execute(q, "query-migrate-cache-size") == 64 * MiB, f"a refused {value} changed the size"
        # Stored rounded down to a power of two.
        for value, stored in [(4096, 4096), (4097, 4096), (100_000, 65536), (3 * MiB, 2 * MiB),
                              (MEMORY_BYTES, MEMORY_BYTES), (MEMORY_BYTES - 1, MEMORY_BYTES // 2), (1 * MiB, 1 * MiB)]:
            assert await execute(q, "migrate-set-cache-size", {"value": value}) == {}
            assert await execute(q, "query-migrate-cache-size") == stored, f"{value} should be stored as {stored}"
            assert (await execute(q, "query-migrate-parameters"))["xbzrle-cache-size"] == stored
        # The same checks and rounding through migrate-set-parameters' xbzrle-cache-size.
        for value, desc in [(MEMORY_BYTES * 2, TOO_LARGE), (-5, TOO_LARGE), (100, TOO_SMALL)]:
            await execute_error(q, "migrate-set-parameters", {"xbzrle-cache-size": value}, desc=desc)
            assert await execute(q, "query-migrate-cache-size") == 1 * MiB
        assert await execute(q, "migrate-set-parameters", {"xbzrle-cache-size": 5 * MiB}) == {}
        assert await execute(q, "query-migrate-cache-size") == 4 * MiB
        assert (await execute(q, "query-migrate-parameters"))["xbzrle-cache-size"] == 4 * MiB
        # A refused parameter set applies nothing, the cache size included.
        await execute_error(q, "migrate-set-parameters", {"xbzrle-cache-size": 8 * MiB, "max-cpu-throttle": 0})
        assert await execute(q, "query-migrate-cache-size") == 4 * MiB
        await execute_error(q, "migrate-set-cache-size", {"value": "big"})
    assert vm.alive()


@asynctest
async def test_cache_size_on_larger_guest(launch):
    """The upper bound is the guest's RAM: 256 MiB is fine with -m 256M."""
    vm = launch("vm", memory="256M")
    async with session(vm) as q:
        assert await execute(q, "migrate-set-cache-size", {"value": 256 * MiB}) == {}
        assert await execute(q, "query-migrate-cache-size") == 256 * MiB
        await execute_error(q, "migrate-set-cache-size", {"value": 256 * MiB + 4096}, desc=TOO_LARGE)


NEW_PARAMETER_ERRORS = [
    ({"multifd-compression": "lz4"}, "Parameter 'multifd-compression' does not accept value 'lz4'"),
    ({"multifd-compression": ""}, "Parameter 'multifd-compression' does not accept value ''"),
    ({"max-cpu-throttle": 0}, "Parameter 'max_cpu_throttle' expects an integer in the range of 1 to 99"),
    ({"max-cpu-throttle": 100}, "Parameter 'max_cpu_throttle' expects an integer in the range of 1 to 99"),
    ({"cpu-throttle-initial": 0}, "Parameter 'cpu_throttle_initial' expects an integer in the range of 1 to 99"),
    ({"cpu-throttle-initial": 100}, "Parameter 'cpu_throttle_initial' expects an integer in the range of 1 to 99"),
    ({"cpu-throttle-increment": 0},
     "Parameter 'cpu_throttle_increment' expects an integer in the range of 1 to 99"),
    ({"cpu-throttle-increment": 100},
     "Parameter 'cpu_throttle_increment' expects an integer in the range of 1 to 99"),
]


@asynctest
async def test_new_parameters(launch):
    vm = launch("vm")
    async with session(vm) as q:
        before = await execute(q, "query-migrate-parameters")
        for name in ("cpu-throttle-initial", "cpu-throttle-increment", "max-cpu-throttle", "xbzrle-cache-size",
                     "multifd-compression", "x-checksum"):
            assert name in before, f"query-migrate-parameters lacks {name}: {before}"
        assert before["multifd-compression"] == "none" and before["x-checksum"] is True, before
        assert before["max-cpu-throttle"] == 99, before
        assert before["cpu-throttle-initial"] == before["x-cpu-throttle-initial"] == 20, before
        assert before["cpu-throttle-increment"] == before["x-cpu-throttle-increment"] == 10, before
        for arguments, desc in NEW_PARAMETER_ERRORS:
            await execute_error(q, "migrate-set-parameters", arguments, desc=desc)
            after = await execute(q, "query-migrate-parameters")
            assert after == before, f"a refused {arguments} changed the parameters: {before} -> {after}"
        # Wrong types are refused too.
        await execute_error(q, "migrate-set-parameters", {"multifd-compression": 1})
        await execute_error(q, "migrate-set-parameters", {"x-checksum": "yes"})
        await execute_error(q, "migrate-set-parameters", {"max-cpu-throttle": "50"})
        assert await execute(q, "query-migrate-parameters") == before
        for method in ("zstd", "zlib", "none"):
            assert await execute(q, "migrate-set-parameters", {"multifd-compression": method}) == {}
            assert (await execute(q, "query-migrate-parameters"))["multifd-compression"] == method
        assert await execute(q, "migrate-set-parameters", {
            "max-cpu-throttle": 50, "cpu-throttle-initial": 30, "cpu-throttle-increment": 7, "x-checksum": False}) == {}
        after = await execute(q, "query-migrate-parameters")
        assert after["max-cpu-throttle"] == 50 and after["x-checksum"] is False, after
        # The 2015 names and the later ones are the same parameters.
        assert after["cpu-throttle-initial"] == after["x-cpu-throttle-initial"] == 30, after
        assert after["cpu-throttle-increment"] == after["x-cpu-throttle-increment"] == 7, after
        assert await execute(q, "migrate-set-parameters", {"x-cpu-throttle-initial": 45}) == {}
        assert (await execute(q, "query-migrate-parameters"))["cpu-throttle-initial"] == 45
        assert await execute(q, "migrate-set-parameters", {"max-cpu-throttle": 1}) == {}
        assert await execute(q, "migrate-set-parameters", {"max-cpu-throttle": 99}) == {}
    assert vm.alive()


@asynctest
async def test_capabilities_can_be_turned_on(launch):
    """xbzrle, compress and auto-converge are implemented: they turn on and off; query-migrate
    shows nothing for them before a migration."""
    vm = launch("vm")
    async with session(vm) as q:
        await set_capabilities(q, ["xbzrle", "compress", "auto-converge"])
        assert await execute(q, "query-migrate") == {}
        await set_capabilities(q, ["xbzrle", "compress", "auto-converge"], state=False)
        listed = {c["capability"]: c["state"] for c in await execute(q, "query-migrate-capabilities")}
        assert not any(listed.values()), listed
