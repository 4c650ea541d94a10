import Machine
import QMP

/// `tern run`'s options, parsed from QEMU's spellings into a `MachineConfiguration`.
///
/// Options take one dash or two (`-m` and `--m`), and a value either as the next argument or
/// after `=` (`-m=512M`), as QEMU allows. An option tern does not know is an error naming it.
public struct RunOptions: Equatable {
    public var configuration = MachineConfiguration()
    /// Every `-qmp` endpoint, in order.
    public var monitors: [QMPEndpoint] = []
    /// `-incoming URI` or `-incoming defer`.
    public var incoming: String?
    public var showHelp = false
    /// `-pidfile PATH`: written (and locked) once the process is set up.
    public var pidFile: String?
    /// `-object tls-creds-x509,...` and `-object authz-simple,...`, created once the migration
    /// controller exists (their files are read then, before the guest starts).
    public var objects: [ObjectOption] = []
    /// `-daemonize`: detach once the monitor listens.
    public var daemonize = false

    /// Options that take a value.
    static let valued: Set<String> = [
        "m", "smp", "kernel", "initrd", "append", "serial", "name", "display", "machine", "M", "accel", "cpu", "qmp", "incoming",
        // QEMU's spellings that libvirt passes (QEMUCompatibilityOptions.swift).
        "chardev", "mon", "device", "object", "overcommit", "uuid", "rtc", "boot", "audiodev", "msg", "pidfile",
        "sandbox", "global", "drive",
    ]
    /// Options without a value.
    static let flags: Set<String> = [
        "S", "nographic", "nodefaults", "no-user-config", "enable-kvm", "no-reboot", "h", "help", "mem-prealloc",
        "daemonize", "no-shutdown", "no-acpi", "no-hpet",
    ]

    public init() {}

    public init(arguments: [String]) throws(CommandLineError) {
        var serial: SerialBackend?
        var noDefaults = false
        var kernel: String?
        var initrd: String?
        var append: String?
        var memoryGiven = false
        var chardevs: [Chardev] = []
        var monitorTexts: [String] = []
        var deviceTexts: [String] = []
        var waitingDrives: [DriveConfiguration] = []
        var serialChardev: String?
        var index = 0
        while index < arguments.count {
            let argument = arguments[index]
            index += 1
            guard argument.hasPrefix("-"), argument.count > 1 else {
                throw CommandLineError("tern run: unexpected argument '\(argument)' (options start with '-'; see tern run --help)")
            }
            var name = String(argument.drop(while: { $0 == "-" }))
            var inlineValue: String?
            if let equals = name.firstIndex(of: "="), Self.valued.contains(String(name[..<equals])) {
                inlineValue = String(name[name.index(after: equals)...])
                name = String(name[..<equals])
            }
            if Self.flags.contains(name) {
                switch name {
                case "S": configuration.startPaused = true
                case "nodefaults": noDefaults = true
                case "mem-prealloc": configuration.preallocateMemory = true
                case "h", "help": showHelp = true
                case "daemonize": daemonize = true
                // -nographic, -no-user-config, -enable-kvm, -no-reboot, -no-acpi, -no-hpet: tern's
                // only behaviour. -no-shutdown: tern exits at a guest power-off either way (docs/libvirt.md).
                default: break
                }
                continue
            }
            guard Self.valued.contains(name) else {
                throw CommandLineError("tern run: unknown option '\(argument)' (see tern run --help)")
            }
            let value: String
            if let inlineValue {
                value = inlineValue
            } else {
                guard index < arguments.count else {
                    throw CommandLineError("tern run: option '\(argument)' needs a value")
                }
                value = arguments[index]
                index += 1
            }
            switch name {
            case "m":
                configuration.memorySize = try Self.memorySize(value)
                memoryGiven = true
            case "smp": configuration.cpuCount = try Self.cpuCount(value)
            case "kernel": kernel = value
            case "initrd": initrd = value
            case "append": append = value
            case "serial":
                if value.hasPrefix("chardev:") { serialChardev = String(value.dropFirst(8)) } else { serial = try Self.serialBackend(value) }
            case "name": configuration.name = value.hasPrefix("guest=") ? String(value.dropFirst(6)).components(separatedBy: ",")[0] : value
            case "display":
                guard value == "none" else {
                    throw CommandLineError("tern run: -display \(value): tern has no display; only '-display none' is accepted")
                }
            case "machine", "M": if try Self.checkMachine(value) { configuration.hasNoGuest = true }
            case "accel":
                guard value == "kvm" else { throw CommandLineError("tern run: -accel \(value): tern runs only on KVM") }
            case "cpu": configuration.exposeInvariantTSC = try Self.cpuModel(value)
            case "incoming":
                incoming = value
                configuration.waitsForIncomingMigration = true
            case "qmp":
                do {
                    var endpoint = try QMPEndpoint(parsing: value)
                    endpoint.label = "compat_monitor\(monitors.count)"
                    monitors.append(endpoint)
                } catch {
                    throw CommandLineError("tern run: \(error.message)")
                }
            case "chardev":
                let chardev = try Chardev(parsing: value)
                guard !chardevs.contains(where: { $0.id == chardev.id }) else {
                    throw CommandLineError("tern run: -chardev \(value): a chardev with id=\(chardev.id) already exists")
                }
                chardevs.append(chardev)
            case "mon": monitorTexts.append(value)
            case "device": deviceTexts.append(value)
            case "drive":
                let parsed = try DriveOption.parse(value, index: configuration.drives.count + waitingDrives.count)
                guard !(configuration.drives + waitingDrives).contains(where: { $0.id == parsed.drive.id }) else {
                    throw CommandLineError("tern run: -drive \(value): a drive with id=\(parsed.drive.id) already exists")
                }
                if parsed.waitsForDevice {
                    waitingDrives.append(parsed.drive)
                } else {
                    configuration.drives.append(parsed.drive)
                }
            case "object":
                let list = try QEMUOptionList(parsing: value, option: "object", impliedKey: "qom-type")
                if let type = list.implied, type.hasPrefix("tls-creds") || type.hasPrefix("authz") {
                    guard let id = list["id"] else { throw CommandLineError("tern run: -object \(value): needs id=ID") }
                    var properties: [String: String] = [:]
                    for (key, text) in list.pairs where key != "id" && key != "qom-type" { properties[key] = text }
                    objects.append(ObjectOption(type: type, id: id, properties: properties))
                } else {
                    try Self.checkIgnorable(name, value)
                }
            case "pidfile": pidFile = value
            case "uuid": configuration.uuid = try Self.uuid(value)
            default: try Self.checkIgnorable(name, value) // -object, -overcommit, -rtc, -boot, -audiodev, -msg, ...
            }
        }
        func chardev(_ id: String, _ context: String) throws(CommandLineError) -> Chardev {
            guard let found = chardevs.first(where: { $0.id == id }) else {
                throw CommandLineError("\(context): no -chardev with id=\(id)")
            }
            return found
        }
        for text in monitorTexts {
            let context = "tern run: -mon \(text)"
            let list = try QEMUOptionList(parsing: text, option: "mon", impliedKey: "chardev")
            try list.check(known: ["chardev", "id", "mode", "pretty"], option: "mon", text: text)
            guard list["mode"] == "control" else {
                throw CommandLineError("\(context): tern's monitors speak QMP only (mode=control); the human monitor is QMP's human-monitor-command")
            }
            guard let id = list.implied ?? list["chardev"] else { throw CommandLineError("\(context): needs chardev=ID") }
            monitors.append(try chardev(id, context).monitorEndpoint(context: context))
        }
        for text in deviceTexts {
            let context = "tern run: -device \(text)"
            let list = try QEMUOptionList(parsing: text, option: "device", impliedKey: "driver")
            if list.implied == "virtio-blk-device" {
                try DriveOption.attach(list, text: text, waiting: &waitingDrives, to: &configuration.drives)
                continue
            }
            if list.implied == "virtio-blk-pci" {
                throw CommandLineError("\(context): tern has no PCI bus; its disks are virtio-blk-device on virtio-mmio (-device virtio-blk-device,drive=ID, or -drive ...,if=virtio)")
            }
            guard list.implied == "isa-serial" else {
                throw CommandLineError("\(context): tern has no '\(list.implied ?? "")' device (the devices it adds on request are isa-serial, COM1, and virtio-blk-device)")
            }
            try list.check(known: ["chardev", "id", "index", "iobase", "irq"], option: "device", text: text)
            guard (list["index"] ?? "0") == "0", (list["iobase"].map { ["0x3f8", "1016"].contains($0.lowercased()) } ?? true),
                  (list["irq"] ?? "4") == "4" else {
                throw CommandLineError("\(context): tern has one serial port, COM1 (index=0, iobase 0x3f8, irq 4)")
            }
            guard let id = list["chardev"] else { throw CommandLineError("\(context): needs chardev=ID") }
            guard serial == nil && serialChardev == nil else { throw CommandLineError("\(context): tern has one serial port and it is taken") }
            serialChardev = id
        }
        if let id = serialChardev {
            let context = "tern run: serial port on chardev \(id)"
            serial = try chardev(id, context).serialBackend(context: context)
            configuration.serialLabel = id
        }
        if configuration.hasNoGuest {
            // QEMU's `none` machine has no CPU to run; tern keeps a minimal, never-started one.
            configuration.startPaused = true
            if !memoryGiven { configuration.memorySize = MachineConfiguration.minimumMemorySize }
        }
        // QEMU's default serial port is the terminal; -nodefaults removes it unless -serial is given.
        configuration.serial = serial ?? (noDefaults ? .none : .stdio)
        if let kernel {
            configuration.boot = .linux(kernelPath: kernel, initrdPath: initrd, arguments: append)
        } else {
            if initrd != nil {
                throw CommandLineError("tern run: -initrd needs -kernel (the built-in guest takes no initrd)")
            }
            configuration.boot = .builtinGuest(arguments: append ?? "")
        }
    }

    static func memorySize(_ value: String) throws(CommandLineError) -> UInt64 {
        let text = value.hasPrefix("size=") ? String(value.dropFirst(5)) : value
        guard let size = SizeParser.parse(text, defaultUnit: 1 << 20), size > 0 else {
            throw CommandLineError("tern run: -m \(value): not a memory size (examples: 512, 512M, 2G)")
        }
        guard size >= MachineConfiguration.minimumMemorySize else {
            throw CommandLineError("tern run: -m \(value): tern needs at least \(MachineConfiguration.minimumMemorySize >> 20) MiB")
        }
        guard size % 4096 == 0 else {
            throw CommandLineError("tern run: -m \(value): the size must be a multiple of 4 KiB")
        }
        return size
    }

    static func cpuCount(_ value: String) throws(CommandLineError) -> Int {
        // Accept "N", "cpus=N", and "N,maxcpus=N"-style lists whose other keys agree.
        var count: Int?
        for (position, part) in value.split(separator: ",").enumerated() {
            if position == 0, let number = Int(part) { count = number; continue }
            let pair = part.split(separator: "=", maxSplits: 1).map(String.init)
            guard pair.count == 2, let number = Int(pair[1]) else {
                throw CommandLineError("tern run: -smp \(value): expected a number of vCPUs, e.g. -smp 2")
            }
            switch pair[0] {
            case "cpus", "maxcpus": count = number
            case "sockets", "cores", "threads", "dies":
                guard number >= 1 else { throw CommandLineError("tern run: -smp \(value): \(pair[0]) must be at least 1") }
            default:
                throw CommandLineError("tern run: -smp \(value): unknown key '\(pair[0])'")
            }
        }
        guard let count, (1...MachineConfiguration.maximumCPUCount).contains(count) else {
            throw CommandLineError("tern run: -smp \(value): tern runs 1 to \(MachineConfiguration.maximumCPUCount) vCPUs")
        }
        return count
    }

    static func serialBackend(_ value: String) throws(CommandLineError) -> SerialBackend {
        switch value {
        case "stdio", "mon:stdio": return .stdio
        case "none", "null": return .none
        case "pty": return .pty
        default:
            if value.hasPrefix("file:"), value.count > 5 { return .file(path: String(value.dropFirst(5))) }
            throw CommandLineError("tern run: -serial \(value): expected stdio, pty, file:PATH, chardev:ID or none")
        }
    }

    /// Checks `-machine`; returns whether it is QEMU's `none` machine (libvirt's probe).
    static func checkMachine(_ value: String) throws(CommandLineError) -> Bool {
        var none = false
        for part in value.split(separator: ",") {
            switch part {
            case "accel=kvm", "accel=kvm:tcg", "pc", "q35", "microvm", "type=pc", "type=q35", "type=microvm",
                 "usb=off", "dump-guest-core=off", "dump-guest-core=on", "vmport=off", "mem-merge=on", "mem-merge=off":
                continue
            case "none", "type=none":
                none = true
            default:
                if part.hasPrefix("accel=") {
                    throw CommandLineError("tern run: -machine \(value): tern runs only on KVM (accel=kvm)")
                }
                if part == "usb=on" {
                    throw CommandLineError("tern run: -machine \(value): tern has no USB (usb=off)")
                }
                throw CommandLineError("tern run: -machine \(value): tern does not know '\(part)' (it has the pc and none machines, "
                                       + "accel=kvm, usb=off, dump-guest-core, vmport=off, mem-merge)")
            }
        }
        return none
    }

    /// Returns whether the invariant TSC is requested.
    static func cpuModel(_ value: String) throws(CommandLineError) -> Bool {
        let parts = value.split(separator: ",")
        guard parts.first == "host" || parts.first == "max" else {
            throw CommandLineError("tern run: -cpu \(value): tern passes the host CPU through; use -cpu host")
        }
        var invariantTSC = false
        for flag in parts.dropFirst() {
            switch flag {
            case "+invtsc", "invtsc=on", "invtsc=true": invariantTSC = true
            case "-invtsc", "invtsc=off", "invtsc=false": invariantTSC = false
            default: throw CommandLineError("tern run: -cpu \(value): unknown CPU flag '\(flag)' (tern knows invtsc)")
            }
        }
        return invariantTSC
    }
}

/// One `-object` that tern creates (a TLS credentials or authorization object).
public struct ObjectOption: Sendable, Equatable {
    public let type: String
    public let id: String
    public let properties: [String: String]
}
