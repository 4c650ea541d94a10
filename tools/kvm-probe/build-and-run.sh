#!/usr/bin/env bash
# Builds and runs the KVM host probe described in docs/kvm-host.md.
# Usage: tools/kvm-probe/build-and-run.sh [64|32]   (32 hangs on kvm_pvm: stop it with Ctrl-C)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
as --64 "$here/guest64.S" -o g64.o && ld -Ttext=0x100000 --oformat binary g64.o -o g64.bin
as --32 "$here/guest32.S" -o g32.o && ld -m elf_i386 -Ttext=0x100000 --oformat binary g32.o -o g32.bin
gcc -O2 -o probe "$here/probe.c"
./probe "${1:-64}"
