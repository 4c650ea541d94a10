"""Abusive clients: oversized lines, endless junk, clients that vanish mid-command."""

from __future__ import annotations

import os
import re
import socket
import time

import pytest

from tern_harness import RawQMP, assert_error, connect_unix, proc_kib, raw_session

RUNNING = {"status": "running", "running": True, "singlestep": False}
SIZE_LIMIT_WORDS = re.compile(r"(?i)limit|too (long|large|big)|exceed|maximum|1 ?MiB|1048576|bytes")


def server_still_works(vm) -> None:
    vm.assert_alive()
    with raw_session(vm.address) as client:
        reply = client.command("query-status", id="fresh")
        assert reply.get("id") == "fresh" and "return" in reply, reply


def send_all_tolerating_close(client: RawQMP, data: bytes, chunk: int = 1 << 20) -> bool:
    """Send data; False if tern closed the connection part way (allowed after a refusal)."""
    client.sock.settimeout(20)
    try:
        for i in range(0, len(data), chunk):
            client.sock.sendall(data[i:i + chunk])
    except (BrokenPipeError, ConnectionResetError):
        return False
    except socket.timeout:
        raise AssertionError("tern stopped reading the connection without closing it") from None
    return True


def rest_of_connection_usable(client: RawQMP) -> bool:
    """After a refused line: the next good command works, or tern closed the connection."""
    try:
        client.send({"execute": "query-status", "id": "after"})
        while True:
            reply = client.reply()
            if reply.get("id") == "after":
                assert reply.get("return") == RUNNING or "return" in reply, reply
                return True
            # Anything else before our reply may only be the refusal of the junk.
            assert_error(reply, "GenericError")
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return False


def test_oversized_line_is_refused(tern):
    payload = "A" * (2 << 20)
    line = ('{"execute": "query-status", "arguments": {"x": "' + payload + '"}, "id": "big"}\n').encode()
    with raw_session(tern.address) as client:
        send_all_tolerating_close(client, line)
        reply = client.reply(timeout=10)
        error = assert_error(reply, "GenericError")
        assert SIZE_LIMIT_WORDS.search(error["desc"]), f"the error should mention the size limit: {reply}"
        rest_of_connection_usable(client)
    server_still_works(tern)


def test_line_just_under_limit_is_accepted(tern):
    # 1 MiB minus some slack for the JSON around the string: not refused for its size.
    payload = "B" * ((1 << 20) - 1024)
    line = ('{"execute": "query-status", "id": "' + payload + '"}\n').encode()
    with raw_session(tern.address) as client:
        assert send_all_tolerating_close(client, line)
        reply = client.reply(timeout=10)
        assert reply == {"return": RUNNING, "id": payload}, str(reply)[:300]


def test_endless_junk_does_not_grow_memory(start_tern):
    vm = start_tern(paused=True)  # prelaunch: guest RAM untouched, so memory use is steady
    junk_size = 64 << 20
    with raw_session(vm.address) as client:
        time.sleep(0.2)
        rss_before = proc_kib(vm.pid, "VmRSS")
        hwm_before = proc_kib(vm.pid, "VmHWM")
        completed = send_all_tolerating_close(client, b"x" * junk_size, chunk=4 << 20)
        time.sleep(0.3)
        vm.assert_alive()
        rss_during = proc_kib(vm.pid, "VmRSS")
        hwm_during = proc_kib(vm.pid, "VmHWM")
        if completed:
            send_all_tolerating_close(client, b"\n")
            rest_of_connection_usable(client)
    growth_mib = max(hwm_during - hwm_before, rss_during - rss_before) / 1024
    assert rss_during < 200 * 1024, f"VmRSS {rss_during} KiB after {junk_size >> 20} MiB of junk"
    assert growth_mib < 32, (f"peak memory grew by {growth_mib:.0f} MiB while reading {junk_size >> 20} MiB of "
                             f"junk (VmRSS {rss_before} -> {rss_during} KiB, VmHWM {hwm_before} -> {hwm_during} KiB)")
    server_still_works(vm)


JUNK_VARIANTS = {
    # name: (the unit repeated, how it may end so a parser could resynchronise)
    "digits": (b"1", b"\n"),
    "open-string": (b'"' + b"a" * 1023, b'"\n'),
    "open-brackets": (b"[", b"\n"),
    "open-objects": (b'{"a":', b"\n"),
}


@pytest.mark.parametrize("variant", list(JUNK_VARIANTS))
def test_endless_token_junk_does_not_grow_memory(start_tern, variant):
    """12 MiB of one never-ending JSON token or nesting: refused, not stored.

    (Smaller than the 64 MiB test above: a debug build of tern reads only a few MiB/s.)
    """
    unit, ending = JUNK_VARIANTS[variant]
    junk_size = 12 << 20
    vm = start_tern(paused=True)
    with raw_session(vm.address) as client:
        time.sleep(0.2)
        rss_before = proc_kib(vm.pid, "VmRSS")
        hwm_before = proc_kib(vm.pid, "VmHWM")
        junk = unit * (junk_size // len(unit))
        if variant == "open-string":
            junk = b'"' + junk.replace(b'"', b"a")
        send_all_tolerating_close(client, junk, chunk=4 << 20)
        time.sleep(0.3)
        vm.assert_alive()
        rss_during = proc_kib(vm.pid, "VmRSS")
        hwm_during = proc_kib(vm.pid, "VmHWM")
        send_all_tolerating_close(client, ending)
        # Some refusal must have been sent: the input passed the 1 MiB limit long ago.
        try:
            reply = client.reply(timeout=3)
            assert_error(reply, "GenericError")
        except (EOFError, ConnectionResetError):
            pass
    growth_mib = max(hwm_during - hwm_before, rss_during - rss_before) / 1024
    assert growth_mib < 8, (f"peak memory grew by {growth_mib:.0f} MiB while reading {junk_size >> 20} MiB of "
                             f"{variant} (VmRSS {rss_before} -> {rss_during} KiB, VmHWM {hwm_before} -> {hwm_during} KiB)")
    server_still_works(vm)


def test_deeply_nested_json_is_refused_without_crash(tern):
    depth = 100000
    line = b'{"execute": "query-status", "id": ' + b"[" * depth + b"]" * depth + b"}\n"
    with raw_session(tern.address) as client:
        send_all_tolerating_close(client, line)
        try:
            reply = client.reply(timeout=10)
            # Refusing is right (QEMU: "JSON nesting too deep"); a reply with the id is tolerable.
            assert "error" in reply or reply.get("return") == RUNNING, str(reply)[:300]
        except (EOFError, ConnectionResetError):
            pass
    server_still_works(tern)


def test_client_disconnects_mid_command(tern):
    with raw_session(tern.address) as client:
        client.send_bytes(b'{"execute": "query-sta')
    server_still_works(tern)
    with raw_session(tern.address) as client:
        client.send_bytes(b'{"execute": "stop", "arguments": {')
    server_still_works(tern)
    # The half command was never executed.
    with raw_session(tern.address) as client:
        assert client.command("query-status") == {"return": RUNNING}


def test_client_disconnects_before_greeting(tern):
    for _ in range(20):
        connect_unix(tern.address).close()
    server_still_works(tern)


def test_client_disconnects_before_reading_reply(tern):
    # tern must survive writing to a peer that has gone (no SIGPIPE death).
    for _ in range(30):
        client = RawQMP(tern.address)
        try:
            client.send_bytes(b'{"execute": "qmp_capabilities"}\n' + b'{"execute": "query-commands"}\n' * 20)
        except (BrokenPipeError, ConnectionResetError):
            # tern refused this one (the clients before it still count against its limit of 16
            # until their threads see them gone): a refusal is an answer, tern lives on.
            client.close()
            continue
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        client.close()
    time.sleep(0.3)
    server_still_works(tern)


def test_client_that_never_reads_does_not_block_others(tern):
    """A client whose receive buffer is full must not stall tern or the other clients."""
    stuck = RawQMP(tern.address)
    try:
        stuck.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.send_bytes(b'{"execute": "qmp_capabilities"}\n')
        flood = b'{"execute": "query-commands"}\n' * 2000
        stuck.sock.settimeout(2)
        try:
            stuck.sock.sendall(flood)
        except (socket.timeout, BrokenPipeError, ConnectionResetError):
            pass  # tern may stop reading from (or drop) a client that never reads
        start = time.monotonic()
        with raw_session(tern.address) as other:
            assert other.command("query-status") == {"return": RUNNING}
            other.command("stop")
            other.wait_event("STOP")
            other.command("cont")
            other.wait_event("RESUME")
        assert time.monotonic() - start < 5
    finally:
        stuck.close()
    server_still_works(tern)
    before = len(tern.passes())
    tern.wait_passes(1, timeout=5, after=before)


def test_many_sequential_clients(tern):
    with raw_session(tern.address) as client:
        client.command("query-status")
    time.sleep(0.2)
    fds_before = len(os.listdir(f"/proc/{tern.pid}/fd"))
    for i in range(50):
        with raw_session(tern.address) as client:
            assert client.command("query-status", id=i) == {"return": RUNNING, "id": i}
    deadline = time.monotonic() + 3
    while True:
        fds_after = len(os.listdir(f"/proc/{tern.pid}/fd"))
        if fds_after - fds_before < 3 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert fds_after - fds_before < 3, f"tern went from {fds_before} to {fds_after} fds after 50 clients: a leak"


def test_client_limit_refuses_with_a_reason(tern):
    """Sixteen clients at once are served; the seventeenth reads a QMP error saying why and is
    disconnected (each client costs tern a thread); once one leaves, a new one is served."""
    clients = [raw_session(tern.address) for _ in range(16)]
    try:
        extra = RawQMP(tern.address)
        try:
            refusal = extra.read_message()
            error = assert_error(refusal, "GenericError")
            assert "too many QMP clients" in error["desc"] and "16" in error["desc"], refusal
            with pytest.raises((EOFError, ConnectionResetError)):
                extra.read_message(timeout=2)
        finally:
            extra.sock.close()
        clients.pop().sock.close()
        deadline = time.monotonic() + 5
        while True:  # the server notices the close when that client's thread reads EOF
            try:
                server_still_works(tern)
                break
            except (AssertionError, EOFError, KeyError):
                assert time.monotonic() < deadline, "no client was served after one of sixteen left"
                time.sleep(0.1)
        for client in clients:
            reply = client.command("query-status", id="still")
            assert reply.get("id") == "still" and "return" in reply, reply
    finally:
        for client in clients:
            client.sock.close()
