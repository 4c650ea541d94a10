import CSocket
import Foundation
import Synchronization

/// One client connection: the greeting, capabilities negotiation, then commands in order.
final class QMPSession: @unchecked Sendable {
    // Sendable: `negotiated` is atomic; writes go through `writeLock`; the rest is used only
    // by the session's own thread.
    /// The largest JSON text a client may send; a larger one is refused and skipped.
    static let maximumMessageSize = 1 << 20
    /// Descriptors received but not yet claimed by a command; more are closed, not kept.
    static let maximumPendingDescriptors = 16

    private let descriptor: Int32
    private unowned let server: QMPServer
    private let writeLock = NSLock()
    private let negotiated = Atomic<Bool>(false)
    private var splitter = JSONStreamSplitter(maximumSize: QMPSession.maximumMessageSize)
    private var pendingDescriptors: [Int32] = []
    private var connected = true

    init(descriptor: Int32, server: QMPServer) {
        self.descriptor = descriptor
        self.server = server
    }

    var isNegotiated: Bool { negotiated.load(ordering: .relaxed) }

    /// Serves the client until it disconnects.
    func serve() {
        defer {
            pendingDescriptors.forEach { close($0) }
            writeLock.lock()
            connected = false
            close(descriptor)
            writeLock.unlock()
        }
        let version = QMPServer.qemuVersion
        send(["QMP": [
            "version": [
                "qemu": ["micro": .int(Int64(version.micro)), "minor": .int(Int64(version.minor)), "major": .int(Int64(version.major))],
                "package": .string(QMPServer.package),
            ],
            "capabilities": [],
        ]])
        var buffer = [UInt8](repeating: 0, count: 64 << 10)
        var received = [Int32](repeating: -1, count: 8)
        while true {
            var receivedCount: Int32 = 0
            let count = buffer.withUnsafeMutableBytes { bytes in
                csocket_receive(descriptor, bytes.baseAddress, bytes.count, &received, Int32(received.count), &receivedCount)
            }
            for index in 0..<Int(receivedCount) {
                if pendingDescriptors.count < Self.maximumPendingDescriptors {
                    pendingDescriptors.append(received[index])
                } else {
                    close(received[index])
                }
            }
            guard count > 0 else { return }
            for piece in splitter.feed(buffer[0..<count]) {
                let reply: JSONValue?
                switch piece {
                case .oversized:
                    reply = ["error": QMPError.generic("JSON parse error, message larger than \(Self.maximumMessageSize) bytes discarded").json]
                case let .text(bytes):
                    reply = handle(bytes)
                }
                if let reply { send(reply) }
            }
        }
    }

    /// Parses and runs one request, returning the reply.
    private func handle(_ bytes: [UInt8]) -> JSONValue? {
        let request: JSONValue
        do {
            request = try JSONParser.parse(bytes)
        } catch {
            return ["error": QMPError.generic("JSON parse error, \(error.message)").json]
        }
        guard case let .object(object) = request else {
            return ["error": QMPError.generic("QMP input must be a JSON object").json]
        }
        let id = object["id"]
        func reply(_ result: Result<JSONValue, QMPError>) -> JSONValue {
            var message = JSONObject()
            switch result {
            case let .success(value): message["return"] = value
            case let .failure(error): message["error"] = error.json
            }
            if let id { message["id"] = id }
            return .object(message)
        }
        var name: String?
        var arguments = JSONObject()
        for member in object.members {
            switch member.key {
            case "execute":
                guard let text = member.value.stringValue else {
                    return reply(.failure(.generic("QMP input member 'execute' must be a string")))
                }
                name = text
            case "arguments":
                guard let given = member.value.objectValue else {
                    return reply(.failure(.generic("QMP input member 'arguments' must be an object")))
                }
                arguments = given
            case "id":
                break
            default:
                return reply(.failure(.generic("QMP input member '\(member.key)' is unexpected")))
            }
        }
        guard let name else { return reply(.failure(.generic("QMP input lacks member 'execute'"))) }

        if name == "qmp_capabilities" {
            if isNegotiated {
                return reply(.failure(QMPError(.commandNotFound, "Capabilities negotiation is already complete, command ignored")))
            }
            do {
                let validated = try QMPArguments(validating: arguments, against: [.optional("enable", .any)])
                if let enable = validated["enable"], enable != .array([]) {
                    return reply(.failure(.generic("Capability '\(enable.serialized)' not available")))
                }
            } catch {
                return reply(.failure(error))
            }
            negotiated.store(true, ordering: .relaxed)
            return reply(.success(.object([:])))
        }
        guard isNegotiated else {
            return reply(.failure(QMPError(.commandNotFound, "Expecting capabilities negotiation with 'qmp_capabilities'")))
        }
        guard let command = server.commands[name] else {
            return reply(.failure(QMPError(.commandNotFound, "The command \(name) has not been found")))
        }
        var result: Result<JSONValue, QMPError> = .failure(.generic("not run"))
        var afterReply: [@Sendable () -> Void] = []
        server.dispatch {
            do throws(QMPError) {
                let validated = try QMPArguments(validating: arguments, against: command.arguments)
                let call = QMPCall(arguments: validated, receivedDescriptors: pendingDescriptors)
                pendingDescriptors = []
                defer {
                    pendingDescriptors = call.receivedDescriptors // unclaimed ones stay for a later getfd
                    afterReply = call.afterReply
                }
                result = .success(try command.handler(call))
            } catch {
                result = .failure(error)
            }
        }
        if !afterReply.isEmpty {
            send(reply(result))
            afterReply.forEach { $0() }
            return nil
        }
        return reply(result)
    }

    /// Writes one message and a CRLF, as QEMU's monitor does. A write that fails or times out
    /// drops the client, never the server.
    func send(_ message: JSONValue) {
        let bytes = Array((message.serialized + "\r\n").utf8)
        writeLock.lock()
        defer { writeLock.unlock() }
        guard connected else { return }
        var offset = 0
        while offset < bytes.count {
            let written = bytes.withUnsafeBytes { raw in
                csocket_send(descriptor, raw.baseAddress! + offset, raw.count - offset, -1)
            }
            guard written > 0 else {
                connected = false
                shutdown(descriptor, Int32(SHUT_RDWR))
                return
            }
            offset += written
        }
    }

    /// Ends the connection from the server side.
    func disconnect() {
        writeLock.lock()
        if connected { shutdown(descriptor, Int32(SHUT_RDWR)) }
        writeLock.unlock()
    }
}
