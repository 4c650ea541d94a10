import QMP

/// The text of `tern --help` and `tern run --help`: the manual for the command line.
public enum HelpText {
    public static let version = QMPServer.ternVersion

    public static let overview = """
    tern \(version): a KVM virtual machine monitor with QEMU-compatible live migration.

    Usage: tern <command> [options]

    Commands:
      demo [options]       Start a VM and a destination, live-migrate it over loopback TCP with
                           progress, verify memory and the guest's self-check, print a summary.
      migrate --qmp SOCKET URI
                           Live-migrate the VM behind a QMP socket to URI, with progress.
      run [options]        Start a virtual machine (QEMU's option spellings; see 'tern run --help').
                           With no -kernel it runs tern's built-in test guest.
      qmp SOCKET [COMMAND [ARGS-JSON]]
                           Run one QMP command on a running tern (or QEMU) and print the
                           reply; with no COMMAND, an interactive QMP shell that shows events.
      guest-image FILE     Write the built-in test guest as a standalone image that
                           'qemu-system-x86_64 -kernel FILE' also boots (multiboot).
      help [command]       Show this text, or a command's.

    Options:
      -h, --help           Show this text.
      --version            Print tern's version.

    Examples:
      tern run -m 512M -append "wss=64M rate=32M"      built-in guest dirtying 32 MiB/s
      tern run -m 1G -smp 2 -kernel /boot/vmlinuz -initrd initrd.img -append "quiet"
      tern run -qmp unix:/tmp/tern.sock,server=on,wait=off -append "wss=64M rate=32M"
      tern qmp /tmp/tern.sock query-status
      tern qmp /tmp/tern.sock pmemsave '{"val": 1048576, "size": 4096, "filename": "/tmp/page"}'
      tern guest-image /tmp/tern-guest.bin

    """

    public static let run = """
    Usage: tern run [options]

    Starts a virtual machine on /dev/kvm and runs it until the guest resets or powers off
    (exit status 0), KVM cannot continue it (status 1), or you quit (Ctrl-A x on the console,
    or SIGINT/SIGTERM). Options use QEMU's spellings, with one dash or two.

    Machine:
      -m SIZE              Guest RAM: 512 (MiB), 512M, 2G. Default 512M. RAM is reserved
                           lazily, so a large -m costs nothing until the guest uses it.
                           RAM above 3G is placed above 4G, leaving the PCI hole.
      -mem-prealloc        Allocate all guest RAM at start instead of at first touch: a
                           destination started ahead of a migration then receives RAM
                           without paying for fresh memory (docs/performance.md).
      -smp N               Number of vCPUs, 1 to 64 (also cpus=N[,sockets=..,cores=..]).
      -cpu host[,+invtsc]  The host CPU (the only model). +invtsc exposes the invariant TSC.
      -machine accel=kvm   Accepted for QEMU compatibility; tern only runs on KVM.
      -accel kvm, -enable-kvm   The same.
      -name NAME           A name for the machine (shown by QMP later).
      -S                   Do not start the vCPUs: the machine waits in 'prelaunch'.

    Boot:
      -kernel FILE         A Linux bzImage, booted through the 64-bit boot protocol.
                           Without -kernel, tern runs its built-in test guest.
      -initrd FILE         An initial ramdisk for -kernel.
      -append TEXT         For Linux: arguments added after tern's defaults
                           (console=ttyS0 reboot=k panic=1 pci=off acpi=off i8042.*),
                           so yours win. For the built-in guest: its parameters,
                           wss=SIZE (working set, default 64M), rate=SIZE (bytes dirtied
                           per second, 0 = idle, default 0), pattern=random|zero.

    Monitor:
      -qmp unix:PATH,server=on,wait=off
      -qmp tcp:HOST:PORT,server=on,wait=off
                           Serve QMP, QEMU's JSON monitor protocol, on a socket (docs/qmp.md).
                           Repeat -qmp for more sockets; each takes any number of clients.
                           QEMU's older 'server,nowait' spelling works too. Without wait=off
                           tern waits for the first client before starting the guest.

    Migration:
      -incoming tcp:HOST:PORT | unix:PATH | exec:COMMAND | fd:N | defer
                           Start as the destination of a live migration: the machine (same -m
                           and -smp as the source) waits in 'inmigrate' for the stream, then
                           runs (or stays paused with -S). 'defer' waits for QMP
                           migrate-incoming. 'exec:cat FILE' restores a saved VM.

    Migration over TLS (mutual authentication; docs/qmp.md, "TLS objects"):
      -object tls-creds-x509,id=ID,dir=DIR,endpoint=server|client[,verify-peer=on|off]
                           X.509 files as QEMU lays them out in DIR: ca-cert.pem, and
                           server-cert.pem + server-key.pem (destination) or client-cert.pem +
                           client-key.pem (source). Read at start; then QMP migrate-set-parameters
                           tls-creds=ID puts every migration connection over TLS.
      -object authz-simple,id=ID,identity=DN
                           With tls-authz=ID, the one source certificate subject a destination
                           accepts (CN=name,,O=org: commas doubled on the command line).

    Disks:
      -drive file=PATH,format=raw,if=virtio[,readonly=on][,cache=MODE][,id=ID]
                           A raw image as a virtio-blk disk (virtio-mmio at 0xd0000000 + 4 KiB
                           per disk, IRQ 5, 6, 7, 10; at most 4). tern adds the device to the
                           kernel command line (virtio_mmio.device=...), so Linux finds it as
                           /dev/vda. cache=writeback (default), writethrough, none, directsync,
                           unsafe. The image is locked as QEMU locks it: a second writer (tern
                           or QEMU) is refused. A destination of a migration gets the same
                           -drive: the same path for shared storage, or its own copy of the
                           same size for 'migrate' with blk (whole disk) or inc (written blocks).
      -drive id=ID,file=PATH,format=raw,if=none -device virtio-blk-device,drive=ID
                           The same, in QEMU's microvm spelling.

    Console:
      -serial stdio        COM1 on this terminal (the default): the guest's output, and your
                           keys to the guest. Ctrl-A x quits; Ctrl-A Ctrl-A sends Ctrl-A.
      -serial file:PATH    COM1 output appended to PATH.
      -serial none         No console.
      -nographic, -display none   Accepted: tern has no display.
      -nodefaults          No default devices: without -serial, COM1 goes nowhere.
      -no-user-config, -no-reboot  Accepted: tern reads no config file and never reboots a
                           guest (a guest reset ends tern with status 0).
      -serial pty          COM1 on a new pseudo-terminal; its path is in QMP query-chardev.

    QEMU's device options (as libvirt passes them; docs/libvirt.md):
      -chardev socket,id=ID,path=PATH|port=N|fd=N,server=on[,wait=off]
      -chardev pty|file,path=PATH|stdio|null,id=ID
                           A named backend for -mon or the serial port. fd=N is a socket the
                           parent already listens on (libvirt's monitor).
      -mon chardev=ID,mode=control   A QMP monitor on that chardev.
      -device isa-serial,chardev=ID[,id=..,index=0]   COM1 on that chardev (tern's one UART).
                           Other devices are refused by name. -serial chardev:ID does the same.
      -machine none        A machine with nothing to run, for monitor probes (libvirt's).
                           Also: pc, accel=kvm[:tcg], usb=off, dump-guest-core=..., vmport=off.
      -object secret,...   Accepted (tern decrypts nothing); objects other than these and the
                           TLS ones above are refused.
      -uuid UUID           The VM's UUID (QMP query-uuid).
      -pidfile PATH        Write (and lock) PATH with tern's pid; removed at exit.
      -daemonize           Detach once the monitor listens; errors before that still show.
      -overcommit mem-lock=off,cpu-pm=off, -rtc base=utc, -boot ..., -audiodev driver=none,
      -msg timestamp=..., -no-acpi, -no-hpet, -no-shutdown
                           Accepted without effect: they ask for what tern does anyway or tune
                           QEMU features tern lacks (no RTC, firmware, sound, ACPI or HPET; a
                           guest power-off ends tern, -no-shutdown or not). Values asking for more
                           (mem-lock=on, base=localtime, a real audio driver) are refused.
      -sandbox, -global    Refused: tern has no seccomp sandbox and no global properties.
      Without a subcommand, 'tern -S -machine ...' is 'tern run -S -machine ...', as libvirt
      runs a domain's emulator.

    """
}
