"""Disks: a raw image as a virtio-blk device (`-drive file=...,format=raw,if=virtio`), and block
migration with QEMU's `migrate` flags `blk` (copy the whole image) and `inc` (only what was
written since the image was opened), the `zero-blocks` capability, and shared storage (neither
flag: the source flushes and hands the image's lock to the destination).

Real tern processes and images, driven over QMP with qemu.qmp. The built-in guest writes its
disk at a paced rate with generation numbers and reads it back (guest/README.md: `disk=`,
`disk-rate=`), so a lost or stale block shows as `CORRUPT block N`; after each migration the
images are compared by SHA-256 where they must be equal.

Skipped, loudly, without /dev/kvm or the tern binary (TERN_BINARY, default .build/debug/tern).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from migration_support import TERN_BINARY, asynctest, execute, execute_error, session, skip_reason, wait_migration, wait_status
from test_migration import launch, tcp_uri  # noqa: F401 - launch is a fixture

_SKIP = skip_reason()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

MiB = 1 << 20
IMAGE_SIZE = 64 * MiB
#: The guest's disk workload: 16 MiB written at 4 MiB/s, read back and checked.
DISK_APPEND = "wss=16M rate=4M disk=16M disk-rate=4M"


def make_image(path: Path, size: int = IMAGE_SIZE, data: dict[int, bytes] | None = None) -> Path:
    """A sparse raw image with `data` written at the given offsets."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, chunk in (data or {}).items():
            f.seek(offset)
            f.write(chunk)
    return path


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * MiB):
            h.update(block)
    return h.hexdigest()


def drive(path: Path, *extra: str) -> list[str]:
    return ["-drive", ",".join([f"file={path}", "format=raw", "if=virtio", *extra])]


def disk_lines(vm) -> list[str]:
    return re.findall(r"^tern-guest: (?:CORRUPT block \d+|DISK-ERROR .*|disk not usable.*)$", vm.log_text(), re.MULTILINE)


def disk_passes(vm) -> list[tuple[int, int]]:
    """(pass number, disk sweeps) of each pass line that reports the disk."""
    return [(int(m.group(1)), int(m.group(2)))
            for m in re.finditer(r"^tern-guest: pass (\d+) rate \d+MiB/s ok sweeps \d+ disk \d+MiB/s dsweeps (\d+)",
                                 vm.log_text(), re.MULTILINE)]


async def migrate(s, uri: str, *, blk: bool = False, inc: bool = False, capabilities=(), timeout: float = 60) -> dict:
    if capabilities:
        await execute(s, "migrate-set-capabilities",
                      {"capabilities": [{"capability": c, "state": True} for c in capabilities]})
    arguments = {"uri": uri}
    if blk:
        arguments["blk"] = True
    if inc:
        arguments["inc"] = True
    await execute(s, "migrate", arguments)
    deadline = time.monotonic() + timeout
    while True:
        info = await execute(s, "query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info
        assert time.monotonic() < deadline, f"migration did not finish in {timeout} s: {info}"
        time.sleep(0.05)


async def destination(launch, uri: str, image: Path, label: str = "dst", **options):
    dst = launch(label, incoming="defer", extra=drive(image), **options)
    async with session(dst) as d:
        assert await execute(d, "migrate-incoming", {"uri": uri}) == {}
    return dst


# ----- host-written images ----------------------------------------------------------------------


@asynctest
async def test_blk_copies_the_whole_image(launch, tmp_path):
    """Data written from the host, with holes between: `blk` makes the destination's empty image
    byte-identical; query-migrate reports `disk`, and the holes are never read (the bytes moved
    are about the data, not the 64 MiB)."""
    data = {0: os.urandom(MiB), 20 * MiB: os.urandom(300 * 1024), IMAGE_SIZE - 4096: os.urandom(4096)}
    source_image = make_image(tmp_path / "src.img", data=data)
    target_image = make_image(tmp_path / "dst.img", data={5 * MiB: b"\xff" * 65536})  # stale data to be zeroed
    uri = tcp_uri()
    src = launch("src", append="wss=16M", extra=drive(source_image))
    dst = await destination(launch, uri, target_image, paused=True)
    async with session(src) as s:
        await src.wait_passes(1)
        info = await migrate(s, uri, blk=True)
        assert info["status"] == "completed", info
        disk = info.get("disk")
        assert disk is not None, f"query-migrate lacks 'disk' after a blk migration: {info}"
        assert disk["remaining"] == 0 and disk["transferred"] >= sum(len(d) for d in data.values()), info
        assert info["ram"]["transferred"] + disk["transferred"] < IMAGE_SIZE + 64 * MiB, info
        await wait_status(s, src, "postmigrate")
    assert digest(source_image) == digest(target_image), "the destination's image differs from the source's"


@asynctest
async def test_image_size_mismatch_fails_before_writing(launch, tmp_path):
    """A destination image of another size: the migration fails saying both sizes, the
    destination's image is untouched, and the source's guest runs on."""
    source_image = make_image(tmp_path / "src.img", data={0: os.urandom(MiB)})
    target_image = make_image(tmp_path / "dst.img", size=IMAGE_SIZE // 2)
    before = digest(target_image)
    uri = tcp_uri()
    src = launch("src", append="wss=16M", extra=drive(source_image))
    dst = await destination(launch, uri, target_image)
    dst.expect_exit = True
    async with session(src) as s:
        await src.wait_passes(1)
        info = await migrate(s, uri, blk=True)
        assert info["status"] == "failed", info
        await wait_status(s, src, "running")
    assert digest(target_image) == before
    assert f"{IMAGE_SIZE} bytes" in dst.stderr_text() and f"{IMAGE_SIZE // 2} bytes" in dst.stderr_text(), dst.diagnostics()
    passes = len(src.passes())
    await src.wait_passes(1, after=passes)


@asynctest
async def test_shared_storage_hands_over_the_lock(launch, tmp_path):
    """Without blk/inc both processes open one image: the destination waits for the lock until
    the switchover, runs the guest with it, and the source can no longer `cont` (QEMU's
    "Failed to get "write" lock")."""
    image = make_image(tmp_path / "shared.img", data={0: os.urandom(MiB)})
    uri = tcp_uri()
    src = launch("src", append="wss=16M", extra=drive(image))
    dst = await destination(launch, uri, image)
    async with session(src) as s:
        await src.wait_passes(1)
        info = await migrate(s, uri)
        assert info["status"] == "completed", info
        assert "disk" not in info, f"no disk copy without blk/inc: {info}"
        await wait_status(s, src, "postmigrate")
        async with session(dst) as d:
            await wait_status(d, dst, "running", timeout=10)
        desc = await execute_error(s, "cont")
        assert "lock" in desc and str(image) in desc, desc


def test_bad_drive_options(tmp_path):
    """Each bad -drive is refused before anything runs, with a message naming the problem."""
    image = make_image(tmp_path / "ok.img")
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"x" * 1000)
    cases = [
        (f"file={tmp_path}/missing.img,format=raw,if=virtio", "missing.img': No such file"),
        (f"file={tmp_path},format=raw,if=virtio", "is a directory"),
        (f"file={image},format=qcow2,if=virtio", "raw images only"),
        (f"file={image},format=raw,if=ide", "if=virtio"),
        (f"file={image},format=raw,cache=sometimes", "cache=sometimes"),
        (f"file={image},format=raw,bogus=1", "'bogus'"),
        (f"file={odd},format=raw", "multiple of 512"),
        ("format=raw,if=virtio", "needs file=PATH"),
    ]
    for value, expected in cases:
        result = subprocess.run([TERN_BINARY, "run", "-m", "64", "-serial", "none", "-drive", value],
                                capture_output=True, text=True, timeout=20)
        assert result.returncode != 0, f"-drive {value} was accepted"
        assert expected.lower() in result.stderr.lower(), f"-drive {value}: {result.stderr!r}"


def test_second_writer_is_refused(tmp_path):
    """Two tern processes never write one image: the second fails naming the lock and the file."""
    image = make_image(tmp_path / "locked.img")
    first = subprocess.Popen([TERN_BINARY, "run", "-m", "64", "-serial", "none", *drive(image)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        assert first.poll() is None, first.stderr.read()
        second = subprocess.run([TERN_BINARY, "run", "-m", "64", "-serial", "none", *drive(image)],
                                capture_output=True, text=True, timeout=20)
        assert second.returncode != 0 and "lock" in second.stderr and str(image) in second.stderr, second.stderr
    finally:
        first.kill()
        first.wait()


@asynctest
async def test_zero_blocks_sends_zero_chunks_as_flags(launch, tmp_path):
    """8 MiB of allocated zeros (not holes: the file system must say data) go as raw chunks
    without `zero-blocks` and as zero records with it; both destinations end identical."""
    data = {0: os.urandom(MiB), 2 * MiB: bytes(8 * MiB)}
    sent = {}
    for flag in (False, True):
        source_image = make_image(tmp_path / f"src-{flag}.img", data=data)
        target_image = make_image(tmp_path / f"dst-{flag}.img")
        uri = tcp_uri()
        src = launch(f"src-{flag}", append="wss=16M", extra=drive(source_image))
        await destination(launch, uri, target_image, label=f"dst-{flag}", paused=True)
        async with session(src) as s:
            await src.wait_passes(1)
            info = await migrate(s, uri, blk=True, capabilities=["zero-blocks"] if flag else ())
            assert info["status"] == "completed", info
        assert digest(source_image) == digest(target_image)
        sent[flag] = info["ram"]["transferred"]
    assert sent[False] - sent[True] > 7 * MiB, f"zero-blocks should save the 8 MiB of zeros: {sent}"


# ----- the guest writing its disk ---------------------------------------------------------------


async def guest_check_passes_on(dst, sweeps: int = 1, timeout: float = 20) -> None:
    """The destination's guest runs on and completes `sweeps` more verification sweeps over
    its disk, with no corrupt block, disk error or failed pass line."""
    await dst.until(lambda: len(disk_passes(dst)) >= 1, "a disk pass line on the destination", timeout)
    first = disk_passes(dst)[0][1]
    await dst.until(lambda: disk_passes(dst) and disk_passes(dst)[-1][1] >= first + sweeps,
                    f"{sweeps} more disk sweep(s) on the destination", timeout)
    assert not disk_lines(dst), dst.diagnostics()
    assert " FAIL " not in dst.log_text(), dst.diagnostics()


async def resume_destination(dst) -> None:
    async with session(dst) as d:
        await wait_status(d, dst, "paused", timeout=10)
        await execute(d, "cont")
        await wait_status(d, dst, "running")


@pytest.mark.parametrize("rate", ["4M", "32M"])
@asynctest
async def test_blk_while_the_guest_writes(launch, tmp_path, rate):
    """The guest rewrites its 16 MiB of disk at 4 or 32 MiB/s (one 4 KiB request at a time,
    so requests are in flight around the switchover) over the default 32 MiB/s link: chunks go
    again in later passes; at completion both images are byte-identical, and the destination's
    guest reads back every block it wrote."""
    source_image = make_image(tmp_path / "src.img")
    target_image = make_image(tmp_path / "dst.img")
    uri = tcp_uri()
    src = launch("src", append=f"wss=16M rate=4M disk=16M disk-rate={rate}", extra=drive(source_image))
    dst = await destination(launch, uri, target_image, paused=True)
    async with session(src) as s:
        await src.until(lambda: len(disk_passes(src)) >= 1, "the source guest's first disk pass line", 30)
        info = await migrate(s, uri, blk=True)
        assert info["status"] == "completed", info + src.diagnostics()
        assert info["disk"]["remaining"] == 0, info
        assert info["ram"]["dirty-sync-count"] >= 2, f"the guest's writes during the first pass should go again: {info}"
        await wait_status(s, src, "postmigrate")
    assert digest(source_image) == digest(target_image), "the images differ after a blk migration"
    assert not disk_lines(src), src.diagnostics()
    await resume_destination(dst)
    await guest_check_passes_on(dst)


@asynctest
async def test_inc_sends_only_what_was_written(launch, tmp_path):
    """Both sides hold the same 64 MiB base (random data); the source's guest fills and rewrites
    its first 16 MiB. `inc` moves about those 16 MiB, not the base, and the images end equal."""
    base = os.urandom(IMAGE_SIZE)
    source_image = make_image(tmp_path / "src.img", data={0: base})
    target_image = make_image(tmp_path / "dst.img", data={0: base})
    uri = tcp_uri()
    src = launch("src", append=DISK_APPEND, extra=drive(source_image))
    dst = await destination(launch, uri, target_image, paused=True)
    async with session(src) as s:
        await src.until(lambda: len(disk_passes(src)) >= 1, "the source guest's first disk pass line", 30)
        info = await migrate(s, uri, inc=True)
        assert info["status"] == "completed", info
        disk = info["disk"]
        assert 16 * MiB <= disk["transferred"] < 32 * MiB, f"inc should send the written 16 MiB and its re-sends only: {info}"
    assert digest(source_image) == digest(target_image), "the images differ after an inc migration"
    await resume_destination(dst)
    await guest_check_passes_on(dst)


@asynctest
async def test_shared_storage_with_the_guest_writing(launch, tmp_path):
    """Shared storage while the guest writes: the destination's guest reads back every block
    the source's guest wrote (the source flushed before the handover)."""
    image = make_image(tmp_path / "shared.img")
    uri = tcp_uri()
    src = launch("src", append=DISK_APPEND, extra=drive(image, "cache=none"))
    dst = await destination(launch, uri, image)
    async with session(src) as s:
        await src.until(lambda: len(disk_passes(src)) >= 1, "the source guest's first disk pass line", 30)
        info = await migrate(s, uri)
        assert info["status"] == "completed", info
    await guest_check_passes_on(dst)


@asynctest
async def test_a_dropped_dirty_block_is_caught(launch, tmp_path):
    """TERN_TEST_DROP_DIRTY_BLOCK=1 makes the source skip one chunk the guest rewrote during the
    migration: the images differ and the destination's guest reports CORRUPT block, so the
    checks above can fail."""
    source_image = make_image(tmp_path / "src.img")
    target_image = make_image(tmp_path / "dst.img")
    uri = tcp_uri()
    src = launch("src", append=DISK_APPEND, extra=drive(source_image), env={"TERN_TEST_DROP_DIRTY_BLOCK": "1"})
    dst = await destination(launch, uri, target_image, paused=True)
    async with session(src) as s:
        await src.until(lambda: len(disk_passes(src)) >= 1, "the source guest's first disk pass line", 30)
        info = await migrate(s, uri, blk=True)
        assert info["status"] == "completed", info
    assert "TEST HOOK: dropped dirty disk chunk" in src.stderr_text(), src.diagnostics()
    assert digest(source_image) != digest(target_image)
    await resume_destination(dst)
    await dst.until(lambda: any("CORRUPT block" in line for line in disk_lines(dst)),
                    "a CORRUPT block line from the destination's guest", 20)


@asynctest
async def test_cancel_mid_copy_leaves_the_source_writing(launch, tmp_path):
    """A blk migration of 32 MiB of data at 8 MiB/s, cancelled once the disk copy is under way
    (it follows RAM's first pass): the source's guest writes and verifies its disk on."""
    source_image = make_image(tmp_path / "src.img", data={32 * MiB: os.urandom(32 * MiB)})
    target_image = make_image(tmp_path / "dst.img")
    uri = tcp_uri()
    src = launch("src", append=DISK_APPEND, extra=drive(source_image))
    dst = await destination(launch, uri, target_image)
    dst.expect_exit = True
    async with session(src) as s:
        await src.until(lambda: len(disk_passes(src)) >= 1, "the source guest's first disk pass line", 30)
        await execute(s, "migrate-set-parameters", {"max-bandwidth": 8 * MiB})
        await execute(s, "migrate", {"uri": uri, "blk": True})
        deadline = time.monotonic() + 20
        while True:
            info = await execute(s, "query-migrate")
            assert info["status"] in ("setup", "active"), info
            if info.get("disk", {}).get("transferred", 0) > 0:
                break
            assert time.monotonic() < deadline, f"the disk copy did not start: {info}"
            time.sleep(0.1)
        assert info["disk"]["transferred"] < info["disk"]["total"], info
        await execute(s, "migrate_cancel")
        info = await wait_migration(s, src, wanted=("cancelled",), timeout=10)
        await wait_status(s, src, "running")
    await guest_check_passes_on(src)


@asynctest
async def test_query_block_lists_the_drives(launch, tmp_path):
    """query-block reports each -drive as QEMU's BlockInfo (libvirt reads it): its id, file,
    read-only flag, format and size."""
    first = make_image(tmp_path / "a.img")
    second = make_image(tmp_path / "b.img", size=8 * MiB)
    vm = launch("vm", append="wss=16M", extra=drive(first, "id=root") + drive(second, "readonly=on"))
    async with session(vm) as q:
        blocks = await execute(q, "query-block")
    assert [b["device"] for b in blocks] == ["root", "drive-virtio-disk1"], blocks
    assert blocks[0]["inserted"]["file"] == str(first) and blocks[0]["inserted"]["ro"] is False, blocks
    assert blocks[1]["inserted"]["ro"] is True and blocks[1]["inserted"]["image"]["virtual-size"] == 8 * MiB, blocks


@asynctest
async def test_qemu_microvm_spelling(launch, tmp_path):
    """QEMU's microvm spelling attaches the same disk: -drive if=none,id=ID and
    -device virtio-blk-device,drive=ID; the guest finds it and fills it."""
    image = make_image(tmp_path / "m.img")
    vm = launch("vm", append="wss=8M disk=4M",
                extra=["-drive", f"id=vd0,file={image},format=raw,if=none", "-device", "virtio-blk-device,drive=vd0"])
    await vm.until(lambda: "tern-guest: disk filled 4 MiB" in vm.log_text(), "the guest's disk fill", 30)
    async with session(vm) as q:
        blocks = await execute(q, "query-block")
    assert [b["device"] for b in blocks] == ["vd0"], blocks


def test_bad_device_spellings(tmp_path):
    image = make_image(tmp_path / "ok.img")
    cases = [
        (["-device", "virtio-blk-device,drive=nope"], "no -drive if=none,id=nope"),
        (["-drive", f"file={image},if=none"], "if=none needs id=ID"),
        (["-drive", f"id=a,file={image},if=none", "-device", "virtio-blk-pci,drive=a"], "no PCI bus"),
        (["-drive", f"id=a,file={image},if=none", "-device", "virtio-blk-device,drive=a",
          "-device", "virtio-blk-device,drive=a"], "no -drive if=none,id=a"),
    ]
    for extra, expected in cases:
        result = subprocess.run([TERN_BINARY, "run", "-m", "64", "-serial", "none", *extra],
                                capture_output=True, text=True, timeout=20)
        assert result.returncode != 0 and expected in result.stderr, f"{extra}: {result.stderr!r}"


@asynctest
async def test_destination_without_the_disk_refuses(launch, tmp_path):
    """A destination started without the source's -drive refuses the stream at its
    configuration, naming the disk's device section; the source's guest runs on."""
    image = make_image(tmp_path / "src.img", data={0: os.urandom(MiB)})
    uri = tcp_uri()
    src = launch("src", append="wss=16M", extra=drive(image))
    dst = launch("dst", incoming="defer")
    dst.expect_exit = True
    async with session(dst) as d:
        await execute(d, "migrate-incoming", {"uri": uri})
    async with session(src) as s:
        await src.wait_passes(1)
        info = await migrate(s, uri, blk=True)
        assert info["status"] == "failed", info
        await wait_status(s, src, "running")
    assert "virtio-blk/0" in dst.stderr_text() + info.get("error-desc", ""), dst.diagnostics()


@asynctest
async def test_blk_save_and_restore_through_a_file(launch, tmp_path):
    """`migrate exec:cat > FILE` with blk saves the disk with the VM; a new tern restores both
    from the file into an empty image, and its guest reads back every block."""
    source_image = make_image(tmp_path / "src.img")
    target_image = make_image(tmp_path / "dst.img")
    saved = tmp_path / "vm.state"
    src = launch("src", append=DISK_APPEND, extra=drive(source_image))
    async with session(src) as s:
        await src.until(lambda: len(disk_passes(src)) >= 1, "the source guest's first disk pass line", 30)
        info = await migrate(s, f"exec:cat > {saved}", blk=True)
        assert info["status"] == "completed", info
    dst = launch("dst", append=DISK_APPEND, incoming=f"exec:cat {saved}", extra=drive(target_image), paused=True)
    async with session(dst) as d:
        await wait_status(d, dst, "paused", timeout=20)
    assert digest(source_image) == digest(target_image), "the restored image differs from the saved one"
    await resume_destination(dst)
    await guest_check_passes_on(dst)


@asynctest
async def test_inc_chains_through_a_second_migration(launch, tmp_path):
    """A -> B with inc, then B -> C with inc, all three holding the same base: what A's guest
    wrote reached B by migration, and counts as written there, so C's image ends equal too."""
    base = os.urandom(8 * MiB)
    images = [make_image(tmp_path / f"{name}.img", data={32 * MiB: base}) for name in "abc"]
    a = launch("a", append=DISK_APPEND, extra=drive(images[0]))
    first, second = tcp_uri(), tcp_uri()
    b = await destination(launch, first, images[1], label="b")
    async with session(a) as s:
        await a.until(lambda: len(disk_passes(a)) >= 1, "A's first disk pass line", 30)
        info = await migrate(s, first, inc=True)
        assert info["status"] == "completed", info
    c = await destination(launch, second, images[2], label="c", paused=True)
    async with session(b) as s:
        await wait_status(s, b, "running", timeout=10)
        info = await migrate(s, second, inc=True)
        assert info["status"] == "completed", info
        assert info["disk"]["transferred"] >= 16 * MiB, f"B should send on what it received from A: {info}"
    assert digest(images[1]) == digest(images[2]), "C's image differs from B's after the second inc migration"
    await resume_destination(c)
    await guest_check_passes_on(c)


@asynctest
async def test_postcopy_with_shared_storage(launch, tmp_path):
    """Postcopy with a shared disk: the source flushes and lets the image go inside the
    switchover, before the destination's guest runs, so the destination takes the lock, runs
    while its RAM follows, and its guest reads back every block the source's guest wrote."""
    from test_postcopy import listen_for_postcopy, prepare_source, reach_postcopy
    image = make_image(tmp_path / "shared.img")
    uri = tcp_uri()
    append = "wss=32M rate=32M disk=8M disk-rate=4M"
    src = launch("src", append=append, extra=drive(image))
    dst = launch("dst", append=append, incoming="defer", extra=drive(image))
    async with session(src) as s, session(dst) as d:
        await listen_for_postcopy(d, dst, uri)
        await src.until(lambda: len(disk_passes(src)) >= 1, "the source guest's first disk pass line", 30)
        await prepare_source(s, src, bandwidth=16 * MiB)
        await reach_postcopy(s, d, src, dst, uri)
        info = await wait_migration(s, src, wanted=("completed",), timeout=60)
        assert info["status"] == "completed", info
        await wait_status(d, dst, "running", timeout=10)
    await guest_check_passes_on(dst)
