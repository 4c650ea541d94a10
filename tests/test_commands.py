"""QMP commands, through the real qemu.qmp client."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import struct
import subprocess

from tern_harness import (
    CMDLINE_ADDRESS,
    DEFAULT_APPEND,
    IMAGE_BASE,
    RAM_BYTES,
    STEP,
    TERN_BINARY,
    WORKING_SET_BASE,
    WORKING_SET_BYTES,
    asynctest,
    execute,
    execute_error,
    next_event,
    qmp_client,
)

RUNNING = {"status": "running", "running": True, "singlestep": False}
PAUSED = {"status": "paused", "running": False, "singlestep": False}

ALL_COMMANDS = [
    "qmp_capabilities", "query-version", "query-commands", "query-status", "stop", "cont", "quit",
    "system_reset", "query-name", "query-kvm", "query-cpus-fast", "pmemsave", "getfd", "closefd",
    "human-monitor-command", "x-query-memory-digest",
]


@asynctest
async def test_query_version_matches_greeting(tern):
    async with qmp_client(tern.address) as qmp:
        version = await execute(qmp, "query-version")
        assert version["qemu"] == {"major": 4, "minor": 2, "micro": 0}, version
        assert isinstance(version["package"], str), version
        assert version == dict(qmp.greeting.QMP.version), (version, qmp.greeting)


@asynctest
async def test_query_commands_lists_every_command(tern):
    async with qmp_client(tern.address) as qmp:
        commands = await execute(qmp, "query-commands")
        assert isinstance(commands, list) and commands, commands
        assert all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in commands), commands
        names = [c["name"] for c in commands]
        assert len(names) == len(set(names)), f"duplicate names: {names}"
        missing = [c for c in ALL_COMMANDS if c not in names]
        assert not missing, f"query-commands lacks {missing}; has {names}"


@asynctest
async def test_every_listed_command_is_known(tern):
    # Whatever query-commands lists must not be CommandNotFound (called with bad arguments).
    async with qmp_client(tern.address) as qmp:
        names = [c["name"] for c in await execute(qmp, "query-commands")]
        for name in names:
            if name in ("quit", "stop", "cont", "system_reset", "qmp_capabilities"):
                continue
            # A known command refuses an argument it does not take with GenericError;
            # an unknown one would say CommandNotFound.
            await execute_error(qmp, name, {"no-such-argument-xyz": 1}, "GenericError")


@asynctest
async def test_query_status_running(tern):
    async with qmp_client(tern.address) as qmp:
        assert await execute(qmp, "query-status") == RUNNING


@asynctest
async def test_query_name_with_name(start_tern):
    vm = start_tern(name="vm1", wait_guest=False)
    async with qmp_client(vm.address) as qmp:
        assert await execute(qmp, "query-name") == {"name": "vm1"}


@asynctest
async def test_query_name_without_name(tern):
    async with qmp_client(tern.address) as qmp:
        assert await execute(qmp, "query-name") == {}


@asynctest
async def test_query_kvm(tern):
    async with qmp_client(tern.address) as qmp:
        assert await execute(qmp, "query-kvm") == {"enabled": True, "present": True}


def check_cpus(cpus, pid, count):
    assert isinstance(cpus, list) and len(cpus) == count, cpus
    assert [c.get("cpu-index") for c in cpus] == list(range(count)), cpus
    threads = set()
    for cpu in cpus:
        for key in ("cpu-index", "thread-id", "qom-path", "props", "arch", "target"):
            assert key in cpu, f"query-cpus-fast entry lacks {key}: {cpu}"
        assert cpu["arch"] == "x86" and cpu["target"] == "x86_64", cpu
        assert isinstance(cpu["qom-path"], str) and cpu["qom-path"], cpu
        assert isinstance(cpu["props"], dict), cpu
        tid = cpu["thread-id"]
        assert isinstance(tid, int) and not isinstance(tid, bool), cpu
        assert tid != pid, f"thread-id is the main thread, not a vCPU thread: {cpu}"
        assert os.path.exists(f"/proc/{pid}/task/{tid}"), f"thread {tid} is not a thread of tern {pid}: {cpu}"
        threads.add(tid)
    assert len(threads) == count, f"vCPUs must have distinct threads: {cpus}"
    assert len({c["qom-path"] for c in cpus}) == count, f"qom-paths must differ: {cpus}"


@asynctest
async def test_query_cpus_fast_one_vcpu(tern):
    async with qmp_client(tern.address) as qmp:
        check_cpus(await execute(qmp, "query-cpus-fast"), tern.pid, 1)


@asynctest
async def test_query_cpus_fast_two_vcpus(start_tern):
    vm = start_tern(smp=2)
    async with qmp_client(vm.address) as qmp:
        check_cpus(await execute(qmp, "query-cpus-fast"), vm.pid, 2)


# ----- pmemsave ------------------------------------------------------------------------------

@asynctest
async def test_pmemsave_guest_image_matches_guest_image_file(tern):
    image_file = tern.workdir / "guest-image.bin"
    done = subprocess.run([TERN_BINARY, "guest-image", str(image_file)], capture_output=True, timeout=STEP * 2)
    assert done.returncode == 0, done
    image = image_file.read_bytes()
    assert image[0x20:0x28] == b"TERNGST1", image[:0x40]
    dump = tern.workdir / "image-dump.bin"
    async with qmp_client(tern.address) as qmp:
        assert await execute(qmp, "pmemsave", {"val": IMAGE_BASE, "size": len(image), "filename": str(dump)}) == {}
    saved = dump.read_bytes()
    assert len(saved) == len(image), (len(saved), len(image))
    assert saved[0x20:0x28] == b"TERNGST1", saved[:0x40]
    if saved != image:
        first = next(i for i in range(len(image)) if saved[i] != image[i])
        raise AssertionError(f"pmemsave of the image differs from `tern guest-image` at offset {first:#x}")


@asynctest
async def test_pmemsave_small_and_unaligned(tern):
    image_file = tern.workdir / "guest-image.bin"
    subprocess.run([TERN_BINARY, "guest-image", str(image_file)], check=True, capture_output=True, timeout=10)
    image = image_file.read_bytes()
    async with qmp_client(tern.address) as qmp:
        for offset, size in [(0x20, 8), (0x21, 1), (0x23, 13), (0, 1), (0x7, 0x1001)]:
            dump = tern.workdir / f"dump-{offset}-{size}"
            await execute(qmp, "pmemsave", {"val": IMAGE_BASE + offset, "size": size, "filename": str(dump)})
            assert dump.read_bytes() == image[offset:offset + size], (offset, size)


@asynctest
async def test_pmemsave_replaces_existing_file(tern):
    dump = tern.workdir / "existing"
    dump.write_bytes(b"x" * 100000)
    async with qmp_client(tern.address) as qmp:
        await execute(qmp, "pmemsave", {"val": IMAGE_BASE + 0x20, "size": 8, "filename": str(dump)})
    assert dump.read_bytes() == b"TERNGST1"


@asynctest
async def test_pmemsave_command_line(tern):
    dump = tern.workdir / "cmdline"
    async with qmp_client(tern.address) as qmp:
        await execute(qmp, "pmemsave", {"val": CMDLINE_ADDRESS, "size": 4096, "filename": str(dump)})
    data = dump.read_bytes()
    assert len(data) == 4096
    assert b"\0" in data, "the command line is NUL-terminated"
    cmdline = data[:data.index(b"\0")].decode()
    assert DEFAULT_APPEND in cmdline, cmdline


@asynctest
async def test_pmemsave_working_set_headers(booted_tern):
    """Paused: every working-set page header is (generation << 32 | index), generation >= 1."""
    tern = booted_tern
    dump = tern.workdir / "working-set"
    table_dump = tern.workdir / "generation-table"
    pages = WORKING_SET_BYTES // 4096
    async with qmp_client(tern.address) as qmp:
        await execute(qmp, "stop")
        await execute(qmp, "pmemsave", {"val": WORKING_SET_BASE, "size": WORKING_SET_BYTES, "filename": str(dump)})
        await execute(qmp, "pmemsave", {"val": 0x200000, "size": pages * 4, "filename": str(table_dump)})
        await execute(qmp, "cont")
    data = dump.read_bytes()
    assert len(data) == WORKING_SET_BYTES
    table = struct.unpack(f"<{pages}I", table_dump.read_bytes())
    bad_index, mismatched = [], []
    generations = []
    for page in range(pages):
        (header,) = struct.unpack_from("<Q", data, page * 4096)
        generation, index = header >> 32, header & 0xFFFFFFFF
        generations.append(generation)
        if index != page or generation < 1:
            bad_index.append((page, hex(header)))
        elif table[page] != generation:
            mismatched.append((page, generation, table[page]))
    assert not bad_index, f"{len(bad_index)} pages with a wrong header, first: {bad_index[:5]}"
    # A page may be caught between its header write and its table update when the vCPU stopped.
    assert len(mismatched) <= 1, f"header vs generation table mismatches: {mismatched[:5]}"
    assert max(generations) > 1, "the guest has been rewriting pages; some generation must exceed 1"


@asynctest
async def test_pmemsave_outside_ram_is_refused(tern):
    target = tern.workdir / "nope"
    async with qmp_client(tern.address) as qmp:
        for val, size in [
            (RAM_BYTES, 4096),                  # starts at the end of RAM
            (RAM_BYTES - 4096, 8192),           # straddles the end
            (0x100000000, 16),                  # above 4 GiB, no RAM there with -m 128M
            (0x7FFFFFFFFFFFF000, 0x2000),       # would overflow a 64-bit signed end
        ]:
            await execute_error(qmp, "pmemsave", {"val": val, "size": size, "filename": str(target)})
        # The last byte of RAM is fine.
        await execute(qmp, "pmemsave", {"val": RAM_BYTES - 1, "size": 1, "filename": str(target)})
        assert target.stat().st_size == 1
        assert await execute(qmp, "query-status") == RUNNING
    tern.assert_alive()


@asynctest
async def test_pmemsave_unwritable_file_is_refused(tern):
    async with qmp_client(tern.address) as qmp:
        await execute_error(qmp, "pmemsave", {"val": 0, "size": 16, "filename": "/nonexistent-dir/x/y"})
        assert await execute(qmp, "query-status") == RUNNING


# ----- getfd / closefd -----------------------------------------------------------------------

def fds_pointing_at(pid: int, path: str) -> list[str]:
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == path:
                found.append(fd)
        except OSError:
            pass
    return found


@asynctest
async def test_getfd_and_closefd(tern):
    marker = str(tern.workdir / "passed-fd-marker")
    with open(marker, "w") as f:
        f.write("marker")
    fd = os.open(marker, os.O_RDONLY)
    try:
        async with qmp_client(tern.address) as qmp:
            qmp.send_fd_scm(fd)
            assert await execute(qmp, "getfd", {"fdname": "myfd"}) == {}
            assert fds_pointing_at(tern.pid, marker), "after getfd tern should hold the passed fd"
            assert await execute(qmp, "closefd", {"fdname": "myfd"}) == {}
            assert not fds_pointing_at(tern.pid, marker), "after closefd tern should no longer hold the fd"
            await execute_error(qmp, "closefd", {"fdname": "myfd"}, "GenericError",
                                "File descriptor named 'myfd' not found")
    finally:
        os.close(fd)


@asynctest
async def test_getfd_twice_same_name_replaces(tern):
    first = str(tern.workdir / "first")
    second = str(tern.workdir / "second")
    for path in (first, second):
        open(path, "w").close()
    fd1, fd2 = os.open(first, os.O_RDONLY), os.open(second, os.O_RDONLY)
    try:
        async with qmp_client(tern.address) as qmp:
            qmp.send_fd_scm(fd1)
            await execute(qmp, "getfd", {"fdname": "f"})
            qmp.send_fd_scm(fd2)
            await execute(qmp, "getfd", {"fdname": "f"})
            # QEMU closes the fd previously known by that name.
            assert not fds_pointing_at(tern.pid, first), "the replaced fd leaked"
            assert fds_pointing_at(tern.pid, second)
            await execute(qmp, "closefd", {"fdname": "f"})
            assert not fds_pointing_at(tern.pid, second)
    finally:
        os.close(fd1)
        os.close(fd2)


@asynctest
async def test_getfd_without_fd(tern):
    async with qmp_client(tern.address) as qmp:
        await execute_error(qmp, "getfd", {"fdname": "nofd"}, "GenericError",
                            "No file descriptor supplied via SCM_RIGHTS")
        await execute_error(qmp, "closefd", {"fdname": "nofd"}, "GenericError",
                            "File descriptor named 'nofd' not found")
        assert await execute(qmp, "query-status") == RUNNING


@asynctest
async def test_closefd_unknown_name(tern):
    async with qmp_client(tern.address) as qmp:
        await execute_error(qmp, "closefd", {"fdname": "x"}, "GenericError", "File descriptor named 'x' not found")


@asynctest
async def test_fds_closed_when_client_disconnects_are_not_leaked(tern):
    """A fd passed with SCM_RIGHTS but never claimed with getfd must not stay open forever."""
    marker = str(tern.workdir / "unclaimed-fd")
    open(marker, "w").close()
    fd = os.open(marker, os.O_RDONLY)
    try:
        async with qmp_client(tern.address) as qmp:
            qmp.send_fd_scm(fd)
            assert await execute(qmp, "query-status") == RUNNING
        tern.wait_until(lambda: not fds_pointing_at(tern.pid, marker),
                        "tern to close an unclaimed passed fd after the client left")
    finally:
        os.close(fd)


# ----- human-monitor-command -----------------------------------------------------------------

async def hmp(qmp, line):
    return await execute(qmp, "human-monitor-command", {"command-line": line})


@asynctest
async def test_hmp_info_status_and_stop_cont(tern):
    async with qmp_client(tern.address) as qmp:
        with qmp.listener(("STOP", "RESUME")) as listener:
            assert await hmp(qmp, "info status") == "VM status: running\r\n"
            assert await hmp(qmp, "stop") == ""
            await next_event(listener, "STOP")
            assert await execute(qmp, "query-status") == PAUSED
            assert await hmp(qmp, "info status") == "VM status: paused\r\n"
            assert await hmp(qmp, "cont") == ""
            await next_event(listener, "RESUME")
            assert await execute(qmp, "query-status") == RUNNING
            assert await hmp(qmp, "info status") == "VM status: running\r\n"


@asynctest
async def test_hmp_unknown_command(tern):
    async with qmp_client(tern.address) as qmp:
        result = await hmp(qmp, "frobnicate the vm")
        assert isinstance(result, str) and "unknown command" in result, repr(result)
        assert await hmp(qmp, "info status") == "VM status: running\r\n"


# ----- x-query-memory-digest -----------------------------------------------------------------

def check_digest(digest):
    assert isinstance(digest, dict) and set(digest) >= {"sha256", "size"}, digest
    assert re.fullmatch(r"[0-9a-f]{64}", digest["sha256"]), digest
    assert digest["size"] == RAM_BYTES, digest


@asynctest
async def test_memory_digest_stable_while_paused_changes_when_running(booted_tern):
    tern = booted_tern
    async with qmp_client(tern.address) as qmp:
        await execute(qmp, "stop")
        first = await execute(qmp, "x-query-memory-digest", timeout=15)
        await asyncio.sleep(0.5)
        second = await execute(qmp, "x-query-memory-digest", timeout=15)
        check_digest(first)
        check_digest(second)
        assert first == second, "a paused guest's memory must not change"
        before = len(tern.passes())
        await execute(qmp, "cont")
        await asyncio.to_thread(tern.wait_passes, 2, 6, before)
        await execute(qmp, "stop")
        third = await execute(qmp, "x-query-memory-digest", timeout=15)
        check_digest(third)
        assert third["sha256"] != first["sha256"], "the guest dirtied memory; the digest must change"
        await execute(qmp, "cont")


@asynctest
async def test_memory_digest_is_sha256_of_ram(booted_tern):
    """With -m 128M RAM is one range from 0: the digest should be SHA-256 of its bytes in order."""
    tern = booted_tern
    dump = tern.workdir / "all-ram"
    async with qmp_client(tern.address) as qmp:
        await execute(qmp, "stop")
        digest = await execute(qmp, "x-query-memory-digest", timeout=15)
        await execute(qmp, "pmemsave", {"val": 0, "size": RAM_BYTES, "filename": str(dump)}, timeout=20)
        await execute(qmp, "cont")
    check_digest(digest)
    hasher = hashlib.sha256()
    with open(dump, "rb") as f:
        while chunk := f.read(1 << 20):
            hasher.update(chunk)
    assert dump.stat().st_size == RAM_BYTES
    assert digest["sha256"] == hasher.hexdigest(), "digest differs from SHA-256 of pmemsave(0, RAM size)"
    dump.unlink()
