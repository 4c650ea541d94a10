#!/usr/bin/env python3
"""Writes the seed corpora for tern-fuzz's stream and return-path targets into DIR/stream and
DIR/return-path: real migration streams saved by the tern binary (TERN_BINARY, default
.build/debug/tern) from 32 MiB guests, plain, with compress, with xbzrle and with a 1 MiB disk
copied by block migration, one rewritten as version 1, and return-path messages of every type. Needs /dev/kvm for the streams (without it
only the return-path seeds are written). The QMP seeds are in fuzz/seeds/qmp-json.

Usage: scripts/fuzz-seeds.py DIR
"""
import asyncio
import os
import struct
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from migration_support import (VM, execute, return_path_message, session, skip_reason,  # noqa: E402
                               to_version1, wait_migration)


async def save(path: str, append: str, capabilities: list, parameters: dict, extra: tuple = (),
               arguments: dict | None = None) -> None:
    vm = VM("seed", memory="32M", append=append, extra=extra)
    try:
        async with session(vm) as s:
            await vm.wait_passes(1)
            if capabilities:
                await execute(s, "migrate-set-capabilities",
                              {"capabilities": [{"capability": c, "state": True} for c in capabilities]})
            await execute(s, "migrate-set-parameters", {"max-bandwidth": 1 << 40, **parameters})
            await execute(s, "migrate", {"uri": f"exec:cat > {path}", **(arguments or {})})
            await wait_migration(s, vm)
    finally:
        vm.expect_exit = True
        vm.stop()
        vm.remove()


async def streams(where: str) -> None:
    await save(f"{where}/plain.stream", "wss=256K rate=1M", [], {})
    await save(f"{where}/compress.stream", "wss=256K rate=1M pattern=compressible ratio=3", ["compress"], {})
    # Slow enough that pages are sent again, which is when XBZRLE encodes them.
    await save(f"{where}/xbzrle.stream", "wss=256K rate=4M lines=2", ["xbzrle"], {"max-bandwidth": 2 << 20})
    # A 1 MiB disk (tern-fuzz's disk destination has one that size), copied with blk while the
    # guest writes it: block setup, data and zero records.
    image = f"{where}/seed-disk.img"
    with open(image, "wb") as f:
        f.truncate(1 << 20)
    await save(f"{where}/disk.stream", "wss=256K rate=1M disk=128K disk-rate=64K", ["zero-blocks"], {},
               extra=("-drive", f"file={image},format=raw,if=virtio"), arguments={"blk": True})
    os.unlink(image)
    with open(f"{where}/plain.stream", "rb") as f:
        plain = f.read()
    with open(f"{where}/plain-v1.stream", "wb") as f:
        f.write(to_version1(plain))


def return_path(where: str) -> None:
    messages = {
        "pong": return_path_message(1, struct.pack("<I", 7)),
        "loaded": return_path_message(2),
        "failed": return_path_message(3, b"load of migration failed: no space"),
        "req-pages": return_path_message(4, struct.pack("<QI", 4096 * 5, 4096)),
        "lacking": return_path_message(5, struct.pack("<I", 2) + struct.pack("<QI", 0, 3) + struct.pack("<QI", 1 << 20, 9)),
        "resume-ready": return_path_message(6, struct.pack("<Q", 8192)),
    }
    for name, message in messages.items():
        with open(f"{where}/{name}.rp", "wb") as f:
            f.write(message)
    with open(f"{where}/all.rp", "wb") as f:
        f.write(b"".join(messages.values()))


def main() -> None:
    where = os.path.abspath(sys.argv[1])
    os.makedirs(f"{where}/stream", exist_ok=True)
    os.makedirs(f"{where}/return-path", exist_ok=True)
    return_path(f"{where}/return-path")
    reason = skip_reason()
    if reason:
        print(f"fuzz-seeds: NO STREAM SEEDS: {reason}", file=sys.stderr)
        return
    asyncio.run(streams(f"{where}/stream"))


if __name__ == "__main__":
    main()
