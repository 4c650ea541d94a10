import Machine
import QMP
import Testing
@testable import TernCLI

/// The command lines libvirt 9.0 writes for its capability probe and for a domain
/// (recorded from a real libvirtd, docs/libvirt.md), parsed as tern must understand them.
@Suite("libvirt's command lines")
struct LibvirtCommandLineTests {
    @Test("the capability probe: the none machine, a -qmp socket, a pidfile, daemonized")
    func probe() throws {
        let options = try RunOptions(arguments: [
            "-S", "-no-user-config", "-nodefaults", "-nographic", "-machine", "none,accel=kvm:tcg",
            "-qmp", "unix:/var/lib/libvirt/qemu/qmp-X/qmp.monitor,server=on,wait=off",
            "-pidfile", "/var/lib/libvirt/qemu/qmp-X/qmp.pid", "-daemonize",
        ])
        #expect(options.configuration.hasNoGuest && options.configuration.startPaused)
        #expect(options.configuration.memorySize == MachineConfiguration.minimumMemorySize)
        #expect(options.daemonize && options.pidFile == "/var/lib/libvirt/qemu/qmp-X/qmp.pid")
        #expect(options.monitors == [QMPEndpoint(address: .unix(path: "/var/lib/libvirt/qemu/qmp-X/qmp.monitor"),
                                                 waitForClient: false, label: "compat_monitor0")])
    }

    static let domain = [
        "-name", "guest=t1,debug-threads=on", "-S",
        "-object", "secret,id=masterKey0,format=raw,file=/var/lib/libvirt/qemu/domain-1-t1/master-key.aes",
        "-machine", "pc,usb=off,dump-guest-core=off", "-accel", "kvm", "-m", "512", "-overcommit", "mem-lock=off",
        "-smp", "1,sockets=1,cores=1,threads=1", "-uuid", "05E2977D-6858-49d4-9145-ba4f3e9b5ef7", "-display", "none",
        "-no-user-config", "-nodefaults", "-chardev", "socket,id=charmonitor,fd=29,server=on,wait=off",
        "-mon", "chardev=charmonitor,id=monitor,mode=control", "-rtc", "base=utc", "-no-shutdown", "-no-acpi",
        "-boot", "strict=on", "-kernel", "/var/lib/libvirt/images/guest.img", "-append", "wss=64M rate=10M",
        "-chardev", "pty,id=charserial0", "-device", "isa-serial,chardev=charserial0,id=serial0,index=0",
        "-audiodev", #"{"id":"audio1","driver":"none"}"#, "-msg", "timestamp=on",
    ]

    @Test("a domain: the inherited monitor socket, COM1 on a pty, and the options that change nothing")
    func domain() throws {
        let options = try RunOptions(arguments: Self.domain)
        let configuration = options.configuration
        #expect(configuration.name == "t1" && configuration.startPaused && !configuration.hasNoGuest)
        #expect(configuration.memorySize == 512 << 20 && configuration.cpuCount == 1)
        #expect(configuration.uuid == "05e2977d-6858-49d4-9145-ba4f3e9b5ef7")
        #expect(configuration.serial == .pty && configuration.serialLabel == "charserial0")
        #expect(options.monitors == [QMPEndpoint(address: .inherited(descriptor: 29), waitForClient: false, label: "charmonitor")])
        #expect(configuration.boot == .linux(kernelPath: "/var/lib/libvirt/images/guest.img", initrdPath: nil, arguments: "wss=64M rate=10M"))
    }

    @Test("the JSON forms of -device and -object, and ',,' for a comma in a value")
    func jsonAndEscapes() throws {
        let options = try RunOptions(arguments: [
            "-chardev", "file,id=log,path=/tmp/a,,b", "-device", #"{"driver":"isa-serial","chardev":"log","id":"serial0"}"#,
            "-object", #"{"qom-type":"secret","id":"masterKey0","format":"raw","file":"/k"}"#,
        ])
        #expect(options.configuration.serial == .file(path: "/tmp/a,b"))
        #expect(try RunOptions(arguments: ["-serial", "pty"]).configuration.serial == .pty)
    }

    @Test("what tern cannot do is refused by name", arguments: [
        (["-device", "virtio-net-pci,id=net0"], "no 'virtio-net-pci' device"),
        (["-chardev", "socket,id=m,path=/s,server=on", "-mon", "chardev=m"], "mode=control"),
        (["-chardev", "pty"], "needs an id"),
        (["-chardev", "spicevmc,id=x"], "no 'spicevmc' chardev backend"),
        (["-chardev", "socket,id=m,path=/s"], "add server=on"),
        (["-device", "isa-serial,chardev=nope"], "no -chardev with id=nope"),
        (["-chardev", "pty,id=a", "-device", "isa-serial,chardev=a,index=1"], "one serial port, COM1"),
        (["-chardev", "socket,id=a,path=/s,server=on", "-device", "isa-serial,chardev=a"], "not a socket"),
        (["-chardev", "pty,id=a", "-chardev", "null,id=a"], "id=a already exists"),
        (["-object", "memory-backend-ram,id=pc.ram,size=512M"], "no memory backends"),
        (["-object", "iothread,id=io1"], "no 'iothread' object"),
        (["-overcommit", "mem-lock=on"], "does not lock guest RAM"),
        (["-rtc", "base=localtime"], "only base=utc"),
        (["-audiodev", "id=a,driver=alsa"], "no sound device"),
        (["-sandbox", "on"], "no seccomp sandbox"),
        (["-global", "kvm-pit.lost_tick_policy=delay"], "no device properties"),
        (["-uuid", "not-a-uuid"], "expected a UUID"),
        (["-machine", "pc,usb=on"], "no USB"),
        (["-machine", "pc,accel=tcg"], "only on KVM"),
        (["-device", "{not json"], "not valid JSON"),
    ])
    func refusals(arguments: [String], fragment: String) {
        #expect {
            try RunOptions(arguments: arguments)
        } throws: { error in
            let message = (error as? CommandLineError)?.message ?? ""
            return message.contains(fragment)
        }
    }
}
