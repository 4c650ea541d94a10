import Machine
import Migration

/// `human-monitor-command`: the subset of QEMU's HMP that tern understands, answering with
/// the text HMP would print (CRLF line ends, as QEMU's monitor writes them).
extension QMPStandardCommands {
    static func humanMonitor(_ context: QMPContext) -> QMPCommand {
        let machine = context.machine
        return QMPCommand("human-monitor-command",
                          arguments: [.required("command-line", .string), .optional("cpu-index", .integer)]) { call throws(QMPError) in
            let words = call.arguments.string("command-line")!.split(separator: " ").map(String.init)
            switch words.first {
            case nil:
                return ""
            case "info":
                switch words.dropFirst().first {
                case "status":
                    let state = machine.runState
                    switch state {
                    case .running: return "VM status: running\r\n"
                    case .paused: return "VM status: paused\r\n"
                    default: return .string("VM status: paused (\(state.rawValue))\r\n")
                    }
                case "name":
                    return .string(machine.configuration.name.map { "\($0)\r\n" } ?? "")
                case "version":
                    let version = QMPServer.qemuVersion
                    return .string("\(version.major).\(version.minor).\(version.micro)\(QMPServer.package)\r\n")
                case "kvm":
                    return "kvm support: enabled\r\n"
                case "migrate":
                    guard let migration = context.migration else { return "" }
                    return .string(humanMigrationInfo(migration))
                default:
                    return "info: unknown or unsupported item; tern knows: info status, name, version, kvm, migrate\r\n"
                }
            case "stop":
                machine.pause()
                return ""
            case "cont", "c":
                do throws(QMPError) { try QMPStandardCommands.cont(context) } catch { return .string("\(error.description)\r\n") }
                return ""
            case "system_reset":
                do { try machine.reset() } catch { return .string("system_reset failed: \(error)\r\n") }
                return ""
            case "q", "quit":
                call.afterReply { machine.end(.hostQuit(cause: .qmpQuit, reason: "HMP quit")) }
                return ""
            case "help", "?":
                return "info status|name|version|kvm, stop, cont, system_reset, quit\r\n"
            case let other?:
                return .string("unknown command: '\(other)'\r\n")
            }
        }
    }
}

extension QMPStandardCommands {
    /// `info migrate`, in the shape of QEMU's HMP output.
    static func humanMigrationInfo(_ migration: MigrationController) -> String {
        var lines = ["capabilities: " + migration.capabilities.map { "\($0.0.rawValue): \($0.1 ? "on" : "off")" }.joined(separator: " ")]
        guard case let .object(info) = migrationInfo(migration), let status = info["status"]?.stringValue else {
            return lines.joined(separator: "\r\n") + "\r\n"
        }
        lines.append("Migration status: \(status)")
        for key in ["total-time", "expected-downtime", "downtime", "setup-time", "x-guest-downtime"] {
            if let value = info[key]?.int64Value { lines.append("\(key): \(value) milliseconds") }
        }
        if case let .object(ram)? = info["ram"] {
            for key in ["transferred", "remaining", "total"] {
                if let value = ram[key]?.int64Value { lines.append("\(key) ram: \(value / 1024) kbytes") }
            }
            if let value = ram["mbps"] { lines.append("throughput: \(value.serialized) mbps") }
            for key in ["duplicate", "skipped", "normal"] {
                if let value = ram[key]?.int64Value { lines.append("\(key): \(value) pages") }
            }
            if let value = ram["dirty-sync-count"]?.int64Value { lines.append("dirty sync count: \(value)") }
        }
        if let error = info["error-desc"]?.stringValue { lines.append("error: \(error)") }
        return lines.joined(separator: "\r\n") + "\r\n"
    }
}
