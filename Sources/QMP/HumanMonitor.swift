import Machine

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
                    case .prelaunch: return "VM status: paused (prelaunch)\r\n"
                    default: return .string("VM status: paused (\(state.rawValue))\r\n".replacingOccurrences(of: " (paused)", with: ""))
                    }
                case "name":
                    return .string(machine.configuration.name.map { "\($0)\r\n" } ?? "")
                case "version":
                    let version = QMPServer.qemuVersion
                    return .string("\(version.major).\(version.minor).\(version.micro) (tern)\r\n")
                case "kvm":
                    return "kvm support: enabled\r\n"
                default:
                    return "info: unknown or unsupported item; tern knows: info status, info name, info version, info kvm\r\n"
                }
            case "stop":
                machine.pause()
                return ""
            case "cont", "c":
                machine.resume()
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
