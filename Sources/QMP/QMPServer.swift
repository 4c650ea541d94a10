import CProcess
import CSocket
import Foundation
import Machine
import Migration
import Synchronization

/// Why the QMP server could not start.
public struct QMPServerError: Error, CustomStringConvertible {
    public let message: String
    public var description: String { message }
}

/// QEMU's monitor protocol over Unix and TCP sockets.
///
/// Any number of clients may connect to each endpoint; each has a thread that reads its
/// commands, and all commands run one at a time under `dispatchLock`, in the order they
/// arrive, as under QEMU's big lock. Events go to every client that has negotiated
/// capabilities.
public final class QMPServer: @unchecked Sendable {
    // Sendable: `listeners` is fixed after init; sessions and descriptors are mutex-guarded.
    /// The QEMU version tern reports. Its migration engine follows QEMU's of 2013-2015, but
    /// its monitor also has later commands clients rely on (`query-cpus-fast` came in 2.12),
    /// and libvirt 9.0 refuses anything older than 4.2.0. QEMU 4.2 (2019) still has every
    /// 2015 command tern implements (`migrate_set_speed`, `migrate_set_downtime`,
    /// `migrate-set-cache-size`), so 4.2.0 is the oldest version true to both (docs/qmp.md).
    public static let qemuVersion = (major: 4, minor: 2, micro: 0)
    /// tern's own version, in `query-version`'s `package`.
    public static let ternVersion = "0.1.0"
    /// `package` as QEMU formats it (a leading space, then the build's description).
    static var package: String { " (tern \(ternVersion))" }

    public let machine: Machine
    public let descriptors: NamedDescriptors
    let commands: QMPCommandTable
    private let listeners: [(endpoint: QMPEndpoint, descriptor: Int32)]
    private let sessions = Mutex<[ObjectIdentifier: QMPSession]>([:])
    private let dispatchLock = NSLock()
    private let firstClient = NSCondition()
    private var clientsSeen = 0
    private let stopped = Atomic<Bool>(false)
    /// Whether the vCPUs ran at the last run-state change, so that STOP and RESUME mark edges.
    private let running: Mutex<Bool>

    /// Binds every endpoint. A bound TCP port of 0 is replaced by the real one in `boundEndpoints`.
    public init(machine: Machine, endpoints: [QMPEndpoint], descriptors: NamedDescriptors = NamedDescriptors(),
                migration: MigrationController? = nil, extraCommands: [QMPCommand] = []) throws(QMPServerError) {
        self.machine = machine
        self.descriptors = descriptors
        running = Mutex(machine.runState.isRunning)
        let context = QMPContext(machine: machine, descriptors: descriptors, migration: migration)
        var table = QMPCommandTable()
        for command in QMPStandardCommands.all(context) + extraCommands { table.register(command) }
        let names = ["qmp_capabilities", "query-commands", "query-qmp-schema", "query-chardev"] + table.names
        table.register(QMPCommand("query-commands") { _ throws(QMPError) in
            .array(names.map { ["name": .string($0)] })
        })
        table.register(QMPCommand("query-qmp-schema") { _ throws(QMPError) in Self.schema(commands: names) })
        var listeners: [(QMPEndpoint, Int32)] = []
        for endpoint in endpoints {
            let descriptor: Int32
            var bound = endpoint
            switch endpoint.address {
            case let .unix(path):
                descriptor = csocket_listen_unix(path, 16)
            case let .tcp(host, port):
                var boundPort: Int32 = 0
                descriptor = csocket_listen_tcp(host, port, 16, &boundPort)
                if descriptor >= 0 { bound.address = .tcp(host: host, port: String(boundPort)) }
            case let .inherited(inherited):
                let listening = cprocess_is_listening_socket(inherited)
                guard listening == 1 else {
                    listeners.forEach { close($0.1) }
                    let why = listening == 0 ? "it is a socket that does not listen" : String(cString: strerror(-listening))
                    throw QMPServerError(message: "cannot use descriptor \(inherited) for QMP: \(why)")
                }
                _ = fcntl(inherited, F_SETFD, FD_CLOEXEC)
                descriptor = inherited
            }
            guard descriptor >= 0 else {
                listeners.forEach { close($0.1) }
                throw QMPServerError(message: "cannot listen for QMP on \(endpoint.description): \(String(cString: strerror(-descriptor)))")
            }
            listeners.append((bound, descriptor))
        }
        self.listeners = listeners
        let monitors = listeners.map { listener -> JSONValue in
            ["label": .string(listener.0.label ?? "compat_monitor"), "filename": .string(Self.chardevFilename(listener.0, listener.1)),
             "frontend-open": true]
        }
        table.register(QMPCommand("query-chardev") { _ throws(QMPError) in
            // No serial chardev when there is no serial port to connect (-nodefaults, -serial none).
            let serial: [JSONValue] = machine.configuration.serial == .none ? [] : [
                ["label": .string(machine.configuration.serialLabel), "filename": .string(machine.serialFilename), "frontend-open": true]]
            return .array(serial + monitors)
        })
        self.commands = table
        machine.events.add { [weak self] event in self?.machineEvent(event) }
        migration?.observer = { [weak self] event in
            switch event {
            case let .statusChanged(status): self?.emit(event: "MIGRATION", data: ["status": .string(status.rawValue)])
            case let .passCompleted(pass): self?.emit(event: "MIGRATION_PASS", data: ["pass": .int(Int64(pass))])
            case let .escalated(step):
                self?.emit(event: "X_MIGRATION_ESCALATION", data: ["step": .string(step.step.rawValue), "detail": .string(step.detail),
                                                                  "at-ms": .int(Int64(clamping: step.at))])
            }
        }
    }

    /// The events tern emits, for `query-qmp-schema`.
    static let eventNames = ["STOP", "RESUME", "RESET", "SHUTDOWN", "MIGRATION", "MIGRATION_PASS", "X_MIGRATION_ESCALATION"]

    /// `query-qmp-schema`: every command and event by name, their arguments and results
    /// described only as objects (type "0"). libvirt looks features up by path in it; a
    /// lookup tern's schema cannot answer leaves that feature off, which is the truth: the
    /// JSON forms of -device and -object, blockdev and the other features it gates are not in tern.
    static func schema(commands: [String]) -> JSONValue {
        var entries: [JSONValue] = [["name": "0", "meta-type": "object", "members": []]]
        entries += commands.map { ["name": .string($0), "meta-type": "command", "arg-type": "0", "ret-type": "0"] }
        entries += eventNames.map { ["name": .string($0), "meta-type": "event", "arg-type": "0"] }
        return .array(entries)
    }

    /// QEMU's `query-chardev` filename of a monitor socket (`unix:PATH,server=on`).
    static func chardevFilename(_ endpoint: QMPEndpoint, _ descriptor: Int32) -> String {
        switch endpoint.address {
        case let .unix(path): return "unix:\(path),server=on"
        case let .tcp(host, port): return "tcp:\(host):\(port),server=on"
        case .inherited:
            var address = sockaddr_un()
            var length = socklen_t(MemoryLayout<sockaddr_un>.size)
            let named = withUnsafeMutablePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(descriptor, $0, &length) }
            }
            guard named == 0, address.sun_family == sa_family_t(AF_UNIX) else { return "socket:fd=\(descriptor),server=on" }
            let path = withUnsafeBytes(of: address.sun_path) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            return "unix:\(path),server=on"
        }
    }

    /// The endpoints as bound (TCP port 0 resolved).
    public var boundEndpoints: [QMPEndpoint] { listeners.map(\.endpoint) }

    /// Starts accepting clients on every endpoint.
    public func start() {
        for listener in listeners {
            let thread = Thread { [self] in acceptLoop(listener.descriptor) }
            thread.name = "qmp-accept"
            thread.start()
        }
    }

    /// With `wait=on` on an endpoint, blocks until the first client connects (QEMU prints the
    /// same kind of message and waits before starting the guest).
    public func waitForFirstClientIfRequested(announce: (String) -> Void) {
        guard listeners.contains(where: { $0.endpoint.waitForClient }) else { return }
        announce("waiting for a QMP connection on \(listeners.map(\.endpoint.description).joined(separator: ", "))")
        firstClient.lock()
        while clientsSeen == 0 { firstClient.wait() }
        firstClient.unlock()
    }

    private func acceptLoop(_ listener: Int32) {
        while !stopped.load(ordering: .relaxed) {
            let client = csocket_accept(listener)
            if client < 0 {
                if stopped.load(ordering: .relaxed) || client == -EBADF || client == -EINVAL { return }
                continue
            }
            _ = csocket_set_send_timeout(client, 5)
            let session = QMPSession(descriptor: client, server: self)
            let admitted = sessions.withLock { sessions -> Bool in
                guard sessions.count < Self.maximumClients else { return false }
                sessions[ObjectIdentifier(session)] = session
                return true
            }
            guard admitted else {
                // Each client costs a thread and buffers: refuse with a QMP error the client
                // can read, then close, instead of growing without bound.
                refuse(client)
                continue
            }
            firstClient.lock()
            clientsSeen += 1
            firstClient.broadcast()
            firstClient.unlock()
            let thread = Thread { [self] in
                session.serve()
                _ = sessions.withLock { $0.removeValue(forKey: ObjectIdentifier(session)) }
            }
            thread.name = "qmp-client"
            thread.start()
        }
    }

    /// How many clients may be connected at once, over all endpoints.
    public static let maximumClients = 16

    private func refuse(_ client: Int32) {
        let line = #"{"error": {"class": "GenericError", "desc": "too many QMP clients: tern serves at most \#(Self.maximumClients) at once; close one and connect again"}}"# + "\r\n"
        _ = line.utf8CString.withUnsafeBufferPointer { send(client, $0.baseAddress, $0.count - 1, Int32(MSG_NOSIGNAL)) }
        close(client)
    }

    /// Runs one command under the dispatch lock.
    func dispatch(_ work: () -> Void) {
        dispatchLock.lock()
        defer { dispatchLock.unlock() }
        work()
    }

    /// Sends an event to every negotiated client.
    public func emit(event name: String, data: JSONObject = [:]) {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        let message: JSONValue = [
            "event": .string(name),
            "data": .object(data),
            "timestamp": ["seconds": .int(Int64(now.tv_sec)), "microseconds": .int(Int64(now.tv_nsec / 1000))],
        ]
        let current = sessions.withLock { Array($0.values) }
        for session in current where session.isNegotiated {
            session.send(message)
        }
    }

    private func machineEvent(_ event: MachineEvent) {
        switch event {
        case let .runStateChanged(state):
            // As QEMU: STOP whenever the vCPUs stop running (a pause, a migration's switchover),
            // RESUME whenever they start; libvirt tracks the domain's state by these.
            let change = running.withLock { running -> Bool? in
                // An ending is announced by SHUTDOWN (below), not STOP.
                guard running != state.isRunning, state != .shutdown, state != .internalError else { return nil }
                running = state.isRunning
                return running
            }
            if let nowRunning = change { emit(event: nowRunning ? "RESUME" : "STOP") }
        case let .reset(byGuest):
            emit(event: "RESET", data: ["guest": .bool(byGuest), "reason": byGuest ? "guest-reset" : "host-qmp-system-reset"])
        case let .ended(ending):
            let cause = ending.shutdownCause
            emit(event: "SHUTDOWN", data: ["guest": .bool(cause.guest), "reason": .string(cause.reason)])
        }
    }

    /// Stops accepting, disconnects every client and removes Unix socket files.
    public func stop() {
        guard !stopped.exchange(true, ordering: .relaxed) else { return }
        for listener in listeners {
            shutdown(listener.descriptor, Int32(SHUT_RDWR))
            close(listener.descriptor)
            if case let .unix(path) = listener.endpoint.address { unlink(path) }
        }
        let current = sessions.withLock { Array($0.values) }
        current.forEach { $0.disconnect() }
    }
}
