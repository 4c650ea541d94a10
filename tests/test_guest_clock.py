"""The built-in guest's clock check: its TSC never goes backwards, and the largest step between
two rounds of its loop (`gap G us` on every pass line, guest/README.md) shows any time it did
not run. A `stop` shows as a gap as long as the stop (which proves the measure); a live
migration, which carries the TSC over frozen, must show neither a step back nor a gap longer
than the downtime.

Skipped, loudly, without /dev/kvm or the tern binary (TERN_BINARY, default .build/debug/tern).
"""

from __future__ import annotations

import asyncio
import re

import pytest

from migration_support import UNLIMITED, VM, asynctest, execute, session, skip_reason, wait_migration, wait_status
from test_migration import launch, tcp_uri  # noqa: F401 - launch is a fixture

_SKIP = skip_reason()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

GAP = re.compile(r"^tern-guest: pass (\d+) .* gap (\d+) us$", re.MULTILINE)
#: A round of the guest's loop, including its own serial output, stays far below this.
NORMAL_GAP_US = 100_000


def gaps(vm: VM) -> list[tuple[int, int]]:
    """(pass number, gap in microseconds) for every pass line so far."""
    return [(int(m.group(1)), int(m.group(2))) for m in GAP.finditer(vm.log_text())]


@asynctest
async def test_stop_shows_as_a_gap(launch):
    """1.5 s of `stop`: the next pass line's gap is about 1.5 s; the lines before it are
    normal. The clock measure is live, so the migration test below can fail."""
    vm = launch("vm", memory="64M", append="wss=8M rate=8M")
    async with session(vm) as s:
        await vm.wait_passes(2)
        before = gaps(vm)
        assert before and all(g < NORMAL_GAP_US for _, g in before), f"normal gaps: {before}" + vm.diagnostics()
        assert await execute(s, "stop") == {}
        await wait_status(s, vm, "paused")
        await asyncio.sleep(1.5)
        seen = len(vm.passes())
        assert await execute(s, "cont") == {}
        await vm.wait_passes(2, after=seen, timeout=10)
        after = gaps(vm)[len(before):]
        longest = max(g for _, g in after)
        assert 1_400_000 <= longest <= 2_500_000, f"a 1.5 s stop should show as a 1.5 s gap: {after}" + vm.diagnostics()
        vm.assert_healthy()


@pytest.mark.parametrize("smp", [1, 2])
@asynctest
async def test_migration_keeps_the_clock(launch, smp):
    """A live migration: on the destination no vCPU's TSC steps back (its pass lines stay ok)
    and no gap exceeds the downtime plus a normal round."""
    uri = tcp_uri()
    src = launch("src", memory="128M", append="wss=16M rate=16M", smp=smp)
    dst = launch("dst", memory="128M", append="wss=16M rate=16M", smp=smp, incoming=uri)
    async with session(src) as s:
        await src.wait_passes(2)
        assert await execute(s, "migrate-set-parameters", {"max-bandwidth": UNLIMITED}) == {}
        assert await execute(s, "migrate", {"uri": uri}) == {}
        info = await wait_migration(s, src)
    async with session(dst) as d:
        await wait_status(d, dst, "running")
        await dst.wait_passes(3, timeout=10)
    dst.assert_healthy()
    assert "clock-backwards" not in dst.log_text(), dst.diagnostics()
    seen = gaps(dst)
    bound = info["downtime"] * 1000 + NORMAL_GAP_US
    assert seen and max(g for _, g in seen) <= bound, \
        f"a gap beyond the downtime ({info['downtime']} ms) on the destination: {seen}" + dst.diagnostics()
    print(f"smp {smp}: downtime {info['downtime']} ms; destination gaps {[g for _, g in seen]} us")
