"""Run state over QMP: stop, cont, -S, quit, system_reset, and the events they send."""

from __future__ import annotations

import asyncio
import json
import re
import time

from tern_harness import (
    START_LINE,
    STEP,
    RawQMP,
    asynctest,
    check_event_shape,
    execute,
    next_event,
    qmp_client,
    raw_session,
)

RUNNING = {"status": "running", "running": True, "singlestep": False}
PAUSED = {"status": "paused", "running": False, "singlestep": False}
PRELAUNCH = {"status": "prelaunch", "running": False, "singlestep": False}


@asynctest
async def test_stop_and_cont_events_and_status(tern):
    async with qmp_client(tern.address) as qmp:
        with qmp.listener() as listener:
            assert await execute(qmp, "stop") == {}
            stop = await next_event(listener)
            check_event_shape(stop, "STOP")
            assert await execute(qmp, "query-status") == PAUSED
            assert await execute(qmp, "cont") == {}
            resume = await next_event(listener)
            check_event_shape(resume, "RESUME")
            assert await execute(qmp, "query-status") == RUNNING
            assert (resume["timestamp"]["seconds"], resume["timestamp"]["microseconds"]) >= \
                   (stop["timestamp"]["seconds"], stop["timestamp"]["microseconds"]), (stop, resume)


@asynctest
async def test_stop_cont_guest_keeps_passing(tern):
    """Paused, the guest prints nothing; resumed, it carries on and its self-check passes."""
    tern.wait_passes(2)
    async with qmp_client(tern.address) as qmp:
        with qmp.listener(("STOP", "RESUME")) as listener:
            await execute(qmp, "stop")
            await next_event(listener, "STOP")
            await asyncio.sleep(0.3)  # a byte already on its way to the log file
            frozen = tern.log_text()
            await asyncio.sleep(2.5)
            assert tern.log_text() == frozen, "the guest printed while stopped:\n" + tern.log_text()[len(frozen):]
            assert await execute(qmp, "query-status") == PAUSED
            before = len(tern.passes(frozen))
            await execute(qmp, "cont")
            await next_event(listener, "RESUME")
            await asyncio.to_thread(tern.wait_passes, 2, 6, before)
    after = tern.passes()
    assert all(ok for _, ok in after), after
    numbers = [n for n, _ in after]
    assert numbers == list(range(1, len(numbers) + 1)), f"pass numbers must continue across the pause: {numbers}"
    tern.assert_healthy_log()


@asynctest
async def test_repeated_stop_cont(tern):
    async with qmp_client(tern.address) as qmp:
        with qmp.listener(("STOP", "RESUME")) as listener:
            for _ in range(10):
                await execute(qmp, "stop")
                await next_event(listener, "STOP")
                await execute(qmp, "cont")
                await next_event(listener, "RESUME")
        before = len(tern.passes())
        await asyncio.to_thread(tern.wait_passes, 2, 6, before)
    tern.assert_healthy_log()


@asynctest
async def test_stop_twice_and_cont_twice_succeed(tern):
    async with qmp_client(tern.address) as qmp:
        assert await execute(qmp, "stop") == {}
        assert await execute(qmp, "stop") == {}
        assert await execute(qmp, "query-status") == PAUSED
        assert await execute(qmp, "cont") == {}
        assert await execute(qmp, "cont") == {}
        assert await execute(qmp, "query-status") == RUNNING


@asynctest
async def test_prelaunch_then_cont(tern_paused):
    vm = tern_paused
    async with qmp_client(vm.address) as qmp:
        assert await execute(qmp, "query-status") == PRELAUNCH
        await asyncio.sleep(1.0)
        assert "tern-guest" not in vm.log_text(), "with -S the guest must not run before cont"
        with qmp.listener("RESUME") as listener:
            assert await execute(qmp, "cont") == {}
            check_event_shape(await next_event(listener, "RESUME"), "RESUME")
        assert await execute(qmp, "query-status") == RUNNING
        await asyncio.to_thread(vm.wait_until, lambda: START_LINE.search(vm.log_text()) is not None,
                                "the guest's start line after cont")
        await asyncio.to_thread(vm.wait_passes, 1)
    vm.assert_healthy_log()


@asynctest
async def test_prelaunch_stop_is_harmless(tern_paused):
    vm = tern_paused
    async with qmp_client(vm.address) as qmp:
        await execute(qmp, "stop")
        assert (await execute(qmp, "query-status"))["running"] is False
        await execute(qmp, "cont")
        assert await execute(qmp, "query-status") == RUNNING
        await asyncio.to_thread(vm.wait_passes, 1)


@asynctest
async def test_quit(tern):
    async with qmp_client(tern.address) as qmp:
        with qmp.listener("SHUTDOWN") as listener:
            tern.expect_exit = True
            assert await execute(qmp, "quit") == {}
            event = await next_event(listener, "SHUTDOWN")
    check_event_shape(event, "SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
    assert await asyncio.to_thread(tern.proc.wait, STEP) == 0, "tern must exit with status 0 after quit"


def test_quit_reply_then_shutdown_then_eof(tern):
    with raw_session(tern.address) as client:
        tern.expect_exit = True
        client.send({"execute": "quit", "id": "q"})
        messages = []
        try:
            while True:
                messages.append(client.read_message())
        except (EOFError, ConnectionResetError):
            pass
    assert messages and messages[0] == {"return": {}, "id": "q"}, messages
    shutdown = [m for m in messages if m.get("event") == "SHUTDOWN"]
    assert len(shutdown) == 1, messages
    check_event_shape(shutdown[0], "SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
    assert messages.index(shutdown[0]) > 0, "the reply comes before SHUTDOWN"
    assert tern.proc.wait(STEP) == 0


@asynctest
async def test_quit_while_paused(tern):
    async with qmp_client(tern.address) as qmp:
        await execute(qmp, "stop")
        tern.expect_exit = True
        with qmp.listener("SHUTDOWN") as listener:
            await execute(qmp, "quit")
            await next_event(listener, "SHUTDOWN")
    assert await asyncio.to_thread(tern.proc.wait, STEP) == 0


@asynctest
async def test_quit_in_prelaunch(tern_paused):
    vm = tern_paused
    async with qmp_client(vm.address) as qmp:
        vm.expect_exit = True
        with qmp.listener("SHUTDOWN") as listener:
            await execute(qmp, "quit")
            await next_event(listener, "SHUTDOWN")
    assert await asyncio.to_thread(vm.proc.wait, STEP) == 0


@asynctest
async def test_quit_tells_every_client(tern):
    async with qmp_client(tern.address, "one") as one, qmp_client(tern.address, "two") as two:
        with one.listener("SHUTDOWN") as heard_one, two.listener("SHUTDOWN") as heard_two:
            tern.expect_exit = True
            await execute(one, "quit")
            await next_event(heard_one, "SHUTDOWN")
            await next_event(heard_two, "SHUTDOWN")
    assert await asyncio.to_thread(tern.proc.wait, STEP) == 0


@asynctest
async def test_system_reset(tern):
    tern.wait_passes(2)
    async with qmp_client(tern.address) as qmp:
        with qmp.listener("RESET") as listener:
            assert await execute(qmp, "system_reset") == {}
            event = await next_event(listener, "RESET")
        check_event_shape(event, "RESET", {"guest": False, "reason": "host-qmp-system-reset"})
        await asyncio.to_thread(tern.wait_until, lambda: len(START_LINE.findall(tern.log_text())) >= 2,
                                "the guest to start again after system_reset", 8)
        # A pass line after the second start: numbering restarts at 1.
        def passed_again() -> bool:
            text = tern.log_text()
            second_start = [m.start() for m in START_LINE.finditer(text)][1]
            return len(tern.passes(text[second_start:])) >= 1
        await asyncio.to_thread(tern.wait_until, passed_again, "a pass line after the reset", 8)
        assert await execute(qmp, "query-status") == RUNNING
    text = tern.log_text()
    second_start = [m.start() for m in START_LINE.finditer(text)][1]
    assert tern.passes(text[second_start:])[0] == (1, True), text[second_start:]
    tern.assert_healthy_log()
    tern.assert_alive()


#: A start line printed to its end, wherever on a line it began.
WHOLE_START_LINE = re.compile(r"tern-guest: start cpus (?:(?!tern-guest)[^\n])*? MHz\n")


@asynctest
async def test_system_reset_of_two_vcpus_restarts_cleanly(start_tern):
    """After a reset RAM holds what the guest left (its control block says "ready", "filled");
    tern clears the built-in guest's control block on every load, so both vCPUs start over
    together: five resets in a row, then a fresh start line for 2 CPUs and passing lines."""
    tern = start_tern(smp=2, append="wss=16M rate=16M", wait_guest=True)
    async with qmp_client(tern.address) as qmp:
        # A reset cuts the guest's output mid-line (as real hardware does), so the next start
        # line may begin in the middle of a line: count them unanchored, each one whole.
        for count in range(2, 7):
            assert await execute(qmp, "system_reset") == {}
            await asyncio.to_thread(tern.wait_until, lambda: len(WHOLE_START_LINE.findall(tern.log_text())) >= count,
                                    f"start line {count} (the boot and {count - 1} resets)", 10)
        def passed_again() -> bool:
            text = tern.log_text()
            last_start = [m.start() for m in WHOLE_START_LINE.finditer(text)][-1]
            return len(tern.passes(text[last_start:])) >= 2
        await asyncio.to_thread(tern.wait_until, passed_again, "two pass lines after the last reset", 10)
    text = tern.log_text()
    last = text[[m.start() for m in WHOLE_START_LINE.finditer(text)][-1]:]
    assert last.startswith("tern-guest: start cpus 2 "), last[:200]
    assert tern.passes(last)[:2] == [(1, True), (2, True)], last
    tern.assert_healthy_log()
    tern.assert_alive()


@asynctest
async def test_system_reset_while_paused_stays_paused(booted_tern):
    tern = booted_tern  # the first start line is out, so a second one means a restart
    async with qmp_client(tern.address) as qmp:
        await execute(qmp, "stop")
        with qmp.listener("RESET") as listener:
            await execute(qmp, "system_reset")
            await next_event(listener, "RESET")
        assert await execute(qmp, "query-status") == PAUSED
        await execute(qmp, "cont")
        await asyncio.to_thread(tern.wait_until, lambda: len(START_LINE.findall(tern.log_text())) >= 2,
                                "the guest to start again after system_reset and cont", 8)
    tern.assert_alive()


@asynctest
async def test_two_clients_receive_the_same_events(tern):
    async with qmp_client(tern.address, "one") as one, qmp_client(tern.address, "two") as two:
        with one.listener() as heard_one, two.listener() as heard_two:
            await execute(one, "stop")
            stop_one = await next_event(heard_one)
            stop_two = await next_event(heard_two)
            await execute(two, "cont")
            resume_one = await next_event(heard_one)
            resume_two = await next_event(heard_two)
    assert stop_one == stop_two and stop_one["event"] == "STOP", (stop_one, stop_two)
    assert resume_one == resume_two and resume_one["event"] == "RESUME", (resume_one, resume_two)


def test_events_only_after_negotiation(tern):
    """A client still in capabilities negotiation gets no events."""
    with RawQMP(tern.address) as waiting, raw_session(tern.address) as active:
        waiting.greeting()
        active.command("stop")
        active.wait_event("STOP")
        active.command("cont")
        active.wait_event("RESUME")
        time.sleep(0.3)
        # The first thing the waiting client sees after negotiating is the reply.
        waiting.send({"execute": "qmp_capabilities", "id": "neg"})
        first = waiting.read_message()
        assert first == {"return": {}, "id": "neg"}, f"an event reached a client before negotiation: {first}"


def test_raw_event_line_format(tern):
    with raw_session(tern.address) as client:
        client.send({"execute": "stop"})
        lines = [client.read_line(), client.read_line()]
        client.send({"execute": "cont"})
        lines += [client.read_line(), client.read_line()]
    for line in lines:
        assert line.endswith(b"\r\n") and b"\n" not in line[:-1], line
    messages = [json.loads(line) for line in lines]
    events = [m for m in messages if "event" in m]
    assert [e["event"] for e in events] == ["STOP", "RESUME"], messages
    for event in events:
        check_event_shape(event, event["event"])
