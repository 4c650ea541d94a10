import Synchronization

/// One invocation of a command: its validated arguments, the descriptors that came with the
/// message (SCM_RIGHTS), and work to run once the reply has been sent.
public final class QMPCall: @unchecked Sendable {
    // Sendable: used by one session thread at a time, under the server's dispatch lock.
    public let arguments: QMPArguments
    /// Descriptors received with this command; a handler that keeps one removes it.
    public var receivedDescriptors: [Int32]
    var afterReply: [@Sendable () -> Void] = []

    init(arguments: QMPArguments, receivedDescriptors: [Int32]) {
        self.arguments = arguments
        self.receivedDescriptors = receivedDescriptors
    }

    /// Runs `work` after the reply is written (e.g. `quit` ends the machine only then).
    public func afterReply(_ work: @escaping @Sendable () -> Void) {
        afterReply.append(work)
    }
}

/// A QMP command: its name, declared arguments and handler.
public struct QMPCommand: Sendable {
    public let name: String
    public let arguments: [QMPArgument]
    public let handler: @Sendable (QMPCall) throws(QMPError) -> JSONValue

    public init(_ name: String, arguments: [QMPArgument] = [],
                handler: @escaping @Sendable (QMPCall) throws(QMPError) -> JSONValue) {
        self.name = name
        self.arguments = arguments
        self.handler = handler
    }
}

/// Every command the server knows, by name. `query-commands` lists exactly these.
public struct QMPCommandTable: Sendable {
    public private(set) var commands: [String: QMPCommand] = [:]
    /// Names in registration order, for a stable `query-commands`.
    public private(set) var names: [String] = []

    public init() {}

    public mutating func register(_ command: QMPCommand) {
        precondition(commands[command.name] == nil, "QMP command \(command.name) registered twice")
        commands[command.name] = command
        names.append(command.name)
    }

    public subscript(name: String) -> QMPCommand? { commands[name] }
}
