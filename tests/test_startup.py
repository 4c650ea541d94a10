"""-qmp option spellings: unix and tcp sockets, the old server,nowait form, several -qmp."""

from __future__ import annotations

import asyncio
import os
import stat
import time

from tern_harness import asynctest, execute, free_tcp_port, next_event, qmp_client

RUNNING = {"status": "running", "running": True, "singlestep": False}


@asynctest
async def test_wait_off_guest_runs_before_any_client(start_tern):
    # wait=off: no client has connected, yet the guest runs.
    vm = start_tern(probe=False, wait_guest=True)
    assert stat.S_ISSOCK(os.stat(vm.sock).st_mode)
    async with qmp_client(vm.sock) as qmp:
        assert await execute(qmp, "query-status") == RUNNING


@asynctest
async def test_without_wait_off_tern_waits_for_a_client(start_tern):
    # QEMU's default (wait=on): the guest starts only once a client has connected.
    vm = start_tern(qmp=["unix:{dir}/w.sock,server=on"], probe=False)
    vm.wait_until(lambda: os.path.exists(f"{vm.workdir}/w.sock"), "the socket to appear")
    time.sleep(1.5)
    assert "tern-guest" not in vm.log_text(), "the guest started before any QMP client connected"
    async with qmp_client(f"{vm.workdir}/w.sock") as qmp:
        await asyncio.to_thread(vm.wait_passes, 1)
        assert await execute(qmp, "query-status") == RUNNING


@asynctest
async def test_unix_socket_old_spelling(start_tern):
    vm = start_tern(qmp=["unix:{dir}/old.sock,server,nowait"])
    async with qmp_client(f"{vm.workdir}/old.sock") as qmp:
        assert await execute(qmp, "query-status") == RUNNING


@asynctest
async def test_tcp_socket(start_tern):
    port = free_tcp_port()
    vm = start_tern(qmp=[f"tcp:127.0.0.1:{port},server=on,wait=off"])
    async with qmp_client(("127.0.0.1", port)) as qmp:
        assert await execute(qmp, "query-status") == RUNNING
        assert await execute(qmp, "query-kvm") == {"enabled": True, "present": True}


@asynctest
async def test_getfd_over_tcp_has_no_fd(start_tern):
    port = free_tcp_port()
    vm = start_tern(qmp=[f"tcp:127.0.0.1:{port},server=on,wait=off"], wait_guest=False)
    async with qmp_client(("127.0.0.1", port)) as qmp:
        try:
            await execute(qmp, "getfd", {"fdname": "x"})
        except Exception as error:  # noqa: BLE001
            assert getattr(error, "error_class", None) == "GenericError", repr(error)
        else:
            raise AssertionError("getfd over TCP cannot have received a file descriptor")


@asynctest
async def test_several_qmp_sockets_share_events(start_tern):
    port = free_tcp_port()
    vm = start_tern(qmp=["unix:{dir}/a.sock,server=on,wait=off",
                         f"tcp:127.0.0.1:{port},server=on,wait=off",
                         "unix:{dir}/b.sock,server,nowait"])
    async with qmp_client(f"{vm.workdir}/a.sock", "a") as a, \
            qmp_client(("127.0.0.1", port), "t") as t, \
            qmp_client(f"{vm.workdir}/b.sock", "b") as b:
        with a.listener() as heard_a, t.listener() as heard_t, b.listener() as heard_b:
            await execute(t, "stop")
            for heard in (heard_a, heard_t, heard_b):
                assert (await next_event(heard))["event"] == "STOP"
            assert (await execute(a, "query-status"))["status"] == "paused"
            await execute(b, "cont")
            for heard in (heard_a, heard_t, heard_b):
                assert (await next_event(heard))["event"] == "RESUME"
            assert await execute(t, "query-status") == RUNNING


@asynctest
async def test_socket_removed_or_reusable_after_exit(start_tern):
    """After quit, a new tern can listen on the same unix socket path."""
    path = None
    vm = start_tern(wait_guest=False)
    path = vm.sock
    async with qmp_client(path) as qmp:
        vm.expect_exit = True
        await execute(qmp, "quit")
    assert vm.proc.wait(5) == 0
    second = start_tern(qmp=[f"unix:{path},server=on,wait=off"], wait_guest=False)
    async with qmp_client(path) as qmp:
        assert (await execute(qmp, "query-status"))["running"] is True
    second.assert_alive()
