import Foundation
import Machine

/// The commands every tern monitor has: run control and queries. Memory, descriptor and HMP
/// commands live in their own files.
enum QMPStandardCommands {
    static func all(_ context: QMPContext) -> [QMPCommand] {
        runControl(context) + queries(context) + memory(context) + descriptors(context) + [humanMonitor(context)]
            + QMPIntrospectionCommands.all(context)
            + (context.migration.map(migrationCommands) ?? [])
            + (context.migration.map(objectCommands) ?? [])
    }

    static func runControl(_ context: QMPContext) -> [QMPCommand] {
        let machine = context.machine
        return [
            QMPCommand("stop") { _ throws(QMPError) in
                machine.pause()
                return .object([:])
            },
            QMPCommand("cont") { _ throws(QMPError) in
                try cont(context)
                return .object([:])
            },
            QMPCommand("system_reset") { _ throws(QMPError) in
                do {
                    try machine.reset()
                } catch {
                    throw .generic("system_reset failed: \(error)")
                }
                return .object([:])
            },
            QMPCommand("quit") { call throws(QMPError) in
                call.afterReply { machine.end(.hostQuit(cause: .qmpQuit, reason: "QMP quit")) }
                return .object([:])
            },
        ]
    }

    /// `cont` for QMP and HMP: runs the vCPUs from any stopped state that allows it, and says
    /// why not otherwise (already running is not an error, as in QEMU).
    static func cont(_ context: QMPContext) throws(QMPError) {
        let machine = context.machine
        guard !machine.configuration.hasNoGuest else {
            throw .generic("the 'none' machine has no guest to run (it answers the monitor only); start tern with -machine pc")
        }
        switch machine.runState {
        case .shutdown, .internalError:
            throw .generic("Resetting the Virtual Machine is required")
        case .inmigrate:
            // As QEMU: run as soon as the incoming migration has loaded.
            _ = context.migration?.requestAutostart()
        default:
            if !machine.runState.isRunning {
                // The images' locks first: after a migration handed them over, the destination
                // holds them and this guest must not run (QEMU says the same).
                do throws(DiskImageError) { try machine.activateDisks() } catch { throw .generic(error.description) }
            }
            if !machine.resume() && machine.runState == .finishMigrate {
                throw .generic("The guest is stopped for a migration's switchover (finish-migrate): it can run again once the migration completes or fails")
            }
        }
    }

    static func queries(_ context: QMPContext) -> [QMPCommand] {
        let machine = context.machine
        return [
            QMPCommand("query-version") { _ throws(QMPError) in
                let version = QMPServer.qemuVersion
                return [
                    "qemu": ["micro": .int(Int64(version.micro)), "minor": .int(Int64(version.minor)), "major": .int(Int64(version.major))],
                    "package": .string(QMPServer.package),
                ]
            },
            QMPCommand("query-status") { _ throws(QMPError) in
                let state = machine.runState
                return ["status": .string(state.rawValue), "singlestep": false, "running": .bool(state.isRunning)]
            },
            QMPCommand("query-name") { _ throws(QMPError) in
                if let name = machine.configuration.name { return ["name": .string(name)] }
                return .object([:])
            },
            QMPCommand("query-kvm") { _ throws(QMPError) in
                ["enabled": true, "present": true]
            },
            QMPCommand("query-cpus-fast") { _ throws(QMPError) in
                // The `none` machine has no CPU (its placeholder never runs).
                machine.configuration.hasNoGuest ? .array([]) : .array(machine.vcpuThreadIDs.enumerated().map { index, thread in
                    [
                        "cpu-index": .int(Int64(index)),
                        "qom-path": .string("/machine/unattached/device[\(index)]"),
                        "thread-id": .int(Int64(thread)),
                        "props": ["core-id": .int(Int64(index)), "thread-id": 0, "socket-id": 0],
                        "arch": "x86",
                        "target": "x86_64",
                    ]
                })
            },
        ]
    }

    static func memory(_ context: QMPContext) -> [QMPCommand] {
        let machine = context.machine
        return [
            QMPCommand("pmemsave", arguments: [.required("val", .integer), .required("size", .integer),
                                               .required("filename", .string), .optional("cpu-index", .integer)]) { call throws(QMPError) in
                let arguments = call.arguments
                guard let address = arguments.uint64("val"), let size = arguments.uint64("size") else {
                    throw .generic("Invalid parameter 'val' or 'size': expected non-negative integers")
                }
                let filename = arguments.string("filename")!
                let source: UnsafeMutableRawPointer
                do {
                    source = try machine.memory.pointer(at: GuestAddress(address), length: size)
                } catch {
                    throw .generic("Invalid addr 0x\(String(address, radix: 16))/size \(size) specified: outside guest RAM")
                }
                let fd = open(filename, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
                guard fd >= 0 else {
                    throw .generic("Could not open '\(filename)': \(String(cString: strerror(errno)))")
                }
                defer { close(fd) }
                var written: UInt64 = 0
                while written < size {
                    let n = write(fd, source + Int(written), Int(min(size - written, 64 << 20)))
                    if n < 0 && errno == EINTR { continue }
                    guard n > 0 else { throw .generic("writing to file '\(filename)' failed: \(String(cString: strerror(errno)))") }
                    written += UInt64(n)
                }
                return .object([:])
            },
            QMPCommand("x-query-memory-digest") { _ throws(QMPError) in
                ["sha256": .string(MemoryDigest.sha256(of: machine.memory)), "size": .int(Int64(machine.memory.size))]
            },
        ]
    }

    static func descriptors(_ context: QMPContext) -> [QMPCommand] {
        let table = context.descriptors
        return [
            QMPCommand("getfd", arguments: [.required("fdname", .string)]) { call throws(QMPError) in
                let name = call.arguments.string("fdname")!
                guard !call.receivedDescriptors.isEmpty else {
                    throw .generic("No file descriptor supplied via SCM_RIGHTS")
                }
                guard let first = name.first, !first.isNumber else {
                    throw .generic("Parameter 'fdname' expects a name not starting with a digit")
                }
                table.store(call.receivedDescriptors.removeFirst(), as: name)
                return .object([:])
            },
            QMPCommand("closefd", arguments: [.required("fdname", .string)]) { call throws(QMPError) in
                let name = call.arguments.string("fdname")!
                guard table.close(named: name) else {
                    throw .generic("File descriptor named '\(name)' not found")
                }
                return .object([:])
            },
        ]
    }
}
