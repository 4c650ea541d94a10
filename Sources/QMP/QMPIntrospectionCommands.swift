import Foundation
import Machine

/// The commands a management layer asks before it trusts a VMM (libvirt's capability probe and
/// domain start, docs/libvirt.md): what the machine is made of, answered truthfully in QEMU's
/// terms. Where tern has no such thing (PCI, block devices, jobs, I/O threads) the answer is an
/// empty list or QEMU's DeviceNotFound.
enum QMPIntrospectionCommands {
    /// tern's device and machine types as QOM would name them, with their parents.
    static let types: [(name: String, parent: String)] = [
        ("pc-machine", "x86-machine"), ("none-machine", "machine"),
        ("isa-serial", "isa-device"), ("i8042", "isa-device"), ("kvm-accel", "accel"),
        ("tls-creds-x509", "tls-creds"), ("authz-simple", "authz"),
    ]

    /// Properties of the types a client may add or set (`-device isa-serial,...`).
    static let properties: [String: [(name: String, type: String)]] = [
        "isa-serial": [("chardev", "str"), ("index", "uint32"), ("iobase", "uint32"), ("irq", "uint32")],
        // The migration's TLS objects (object-add), with the properties tern reads.
        "tls-creds-x509": [("dir", "str"), ("endpoint", "QCryptoTLSCredsEndpoint"), ("verify-peer", "bool"),
                           ("sanity-check", "bool"), ("loaded", "bool")],
        "authz-simple": [("identity", "str")],
    ]

    /// The options tern's command line takes with parameters, for `query-command-line-options`.
    static let commandLineOptions: [(option: String, parameters: [(String, String)])] = [
        ("machine", [("type", "string"), ("accel", "string"), ("usb", "boolean"), ("dump-guest-core", "boolean")]),
        ("chardev", [("backend", "string"), ("id", "string"), ("path", "string"), ("fd", "string"), ("server", "boolean"),
                     ("wait", "boolean")]),
        ("mon", [("chardev", "string"), ("mode", "string"), ("pretty", "boolean")]),
        ("rtc", [("base", "string"), ("clock", "string"), ("driftfix", "string")]),
        ("boot", [("order", "string"), ("strict", "boolean"), ("menu", "boolean")]),
        ("overcommit", [("mem-lock", "boolean"), ("cpu-pm", "boolean")]),
        ("msg", [("timestamp", "boolean")]),
    ]

    static func all(_ context: QMPContext) -> [QMPCommand] {
        let machine = context.machine
        return [
            QMPCommand("query-target") { _ throws(QMPError) in ["arch": "x86_64"] },
            QMPCommand("query-machines") { _ throws(QMPError) in
                [
                    ["name": "pc", "is-default": true, "cpu-max": .int(Int64(MachineConfiguration.maximumCPUCount)),
                     "hotpluggable-cpus": false, "numa-mem-supported": false, "deprecated": false],
                    ["name": "none", "cpu-max": 1, "hotpluggable-cpus": false, "numa-mem-supported": false, "deprecated": false],
                ]
            },
            QMPCommand("qom-list-types", arguments: [.optional("implements", .string), .optional("abstract", .boolean)]) { call throws(QMPError) in
                let implements = call.arguments.string("implements")
                return .array(types.filter { implements == nil || $0.name == implements || ancestors(of: $0.name).contains(implements!) }
                    .map { ["name": .string($0.name), "parent": .string($0.parent)] })
            },
            QMPCommand("device-list-properties", arguments: [.required("typename", .string)]) { call throws(QMPError) in
                let name = call.arguments.string("typename")!
                guard let list = properties[name] ?? (types.contains { $0.name == name } ? [] : nil) else {
                    throw QMPError(.deviceNotFound, "Device '\(name)' not found")
                }
                return .array(list.map { ["name": .string($0.name), "type": .string($0.type)] })
            },
            // An array for every name: libvirt 9.0 crashes on DeviceNotFound here (docs/libvirt.md).
            QMPCommand("qom-list-properties", arguments: [.required("typename", .string)]) { call throws(QMPError) in
                .array((properties[call.arguments.string("typename")!] ?? []).map { ["name": .string($0.name), "type": .string($0.type)] })
            },
            QMPCommand("qom-list", arguments: [.required("path", .string)]) { call throws(QMPError) in
                let path = call.arguments.string("path")!
                guard path == "/machine/peripheral" || path == "/machine/peripheral-anon" else {
                    throw QMPError(.deviceNotFound, "Device '\(path)' not found")
                }
                return [["name": "type", "type": "string"]]
            },
            QMPCommand("query-command-line-options", arguments: [.optional("option", .string)]) { call throws(QMPError) in
                let wanted = call.arguments.string("option")
                let listed = commandLineOptions.filter { wanted == nil || $0.option == wanted }
                if let wanted, listed.isEmpty { throw .generic("invalid option value '\(wanted)'") }
                return .array(listed.map { option in
                    ["option": .string(option.option),
                     "parameters": .array(option.parameters.map { ["name": .string($0.0), "type": .string($0.1)] })]
                })
            },
            QMPCommand("query-uuid") { _ throws(QMPError) in
                ["UUID": .string(machine.configuration.uuid ?? "00000000-0000-0000-0000-000000000000")]
            },
            // The -drive images as QEMU's BlockInfo; no block jobs or I/O threads: empty lists, as
            // QEMU gives a machine without them.
            QMPCommand("query-block") { _ throws(QMPError) in
                .array(machine.disks.enumerated().map { index, disk in
                    let cache = disk.configuration.cache
                    let image: JSONValue = ["filename": .string(disk.path), "format": "raw",
                                            "virtual-size": .int(Int64(clamping: disk.size))]
                    let inserted: JSONValue = [
                        "file": .string(disk.path), "node-name": .string("tern-node\(index)"), "ro": .bool(disk.configuration.readOnly),
                        "drv": "raw", "backing_file_depth": 0, "encrypted": false, "detect_zeroes": "off",
                        "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
                        "write_threshold": 0, "image": image,
                        "cache": ["writeback": .bool(cache != .writethrough && cache != .directsync),
                                  "direct": .bool(cache == .none || cache == .directsync), "no-flush": .bool(cache == .unsafe)],
                    ]
                    return ["device": .string(disk.configuration.id), "qdev": .string("/machine/virtio-blk/\(index)"),
                            "locked": false, "removable": false, "io-status": "ok", "inserted": inserted]
                })
            },
            QMPCommand("query-named-block-nodes", arguments: [.optional("flat", .boolean)]) { _ throws(QMPError) in .array([]) },
            QMPCommand("query-jobs") { _ throws(QMPError) in .array([]) },
            QMPCommand("query-iothreads") { _ throws(QMPError) in .array([]) },
            QMPCommand("system_powerdown") { _ throws(QMPError) in
                throw .generic("tern's machine has no ACPI power button for the guest to see; use quit (virsh destroy) to stop it")
            },
        ]
    }

    private static func ancestors(of name: String) -> [String] {
        var chain: [String] = []
        var current = name
        while let parent = types.first(where: { $0.name == current })?.parent {
            chain.append(parent)
            current = parent
        }
        return chain
    }
}
