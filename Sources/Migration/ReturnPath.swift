import CPageCodec
import CSocket
import Foundation
import Synchronization

/// Messages from the destination to the source, on the same connection where the transport
/// allows it (a socket: tcp, unix, or an fd that is one).
///
/// Framing: u16 type, u16 length (at most `maximumLength`), body, u32 CRC32C of the four
/// header bytes and the body. Postcopy's page requests will be further types.
public enum ReturnPathMessage: Equatable, Sendable {
    /// The answer to a stream PING, with its value.
    case pong(UInt32)
    /// The destination loaded the whole stream and its device state.
    case loaded
    /// The destination refused or failed the load, with its reason.
    case failed(String)

    static let maximumLength = 1024

    var typeCode: UInt16 {
        switch self {
        case .pong: 1
        case .loaded: 2
        case .failed: 3
        }
    }

    /// The message as framed on the wire.
    func encoded() -> [UInt8] {
        var body: [UInt8] = []
        switch self {
        case let .pong(value): withUnsafeBytes(of: value.littleEndian) { body.append(contentsOf: $0) }
        case .loaded: break
        case let .failed(reason): body = Array(reason.utf8.prefix(Self.maximumLength))
        }
        var bytes: [UInt8] = []
        withUnsafeBytes(of: typeCode.littleEndian) { bytes.append(contentsOf: $0) }
        withUnsafeBytes(of: UInt16(body.count).littleEndian) { bytes.append(contentsOf: $0) }
        bytes += body
        let crc = bytes.withUnsafeBytes { cpage_crc32c(0, $0.baseAddress!, $0.count) }
        withUnsafeBytes(of: crc.littleEndian) { bytes.append(contentsOf: $0) }
        return bytes
    }

    /// Decodes one message from its header fields, body and checksum, checking all of them.
    static func decode(type: UInt16, body: [UInt8], checksum: UInt32) throws(MigrationStreamError) -> ReturnPathMessage {
        var framed: [UInt8] = []
        withUnsafeBytes(of: type.littleEndian) { framed.append(contentsOf: $0) }
        withUnsafeBytes(of: UInt16(body.count).littleEndian) { framed.append(contentsOf: $0) }
        framed += body
        guard framed.withUnsafeBytes({ cpage_crc32c(0, $0.baseAddress!, $0.count) }) == checksum else {
            throw MigrationStreamError("a return-path message fails its checksum")
        }
        switch type {
        case 1:
            guard body.count == 4 else { throw MigrationStreamError("a return-path PONG of \(body.count) bytes") }
            return .pong(UInt32(body[0]) | UInt32(body[1]) << 8 | UInt32(body[2]) << 16 | UInt32(body[3]) << 24)
        case 2:
            guard body.isEmpty else { throw MigrationStreamError("a return-path LOADED with \(body.count) bytes") }
            return .loaded
        case 3:
            guard let reason = String(validating: body, as: UTF8.self) else {
                throw MigrationStreamError("a return-path FAILED whose reason is not UTF-8")
            }
            return .failed(reason)
        default:
            throw MigrationStreamError("unknown return-path message type \(type)")
        }
    }

    /// Reads one message from `reader`; length checked before the body is read.
    static func read(from reader: MigrationStreamReader) throws(MigrationStreamError) -> ReturnPathMessage {
        let type = try reader.read(UInt16.self)
        let length = Int(try reader.read(UInt16.self))
        guard length <= maximumLength else {
            throw MigrationStreamError("a return-path message claims \(length) bytes (at most \(maximumLength))")
        }
        let body = try reader.readBytes(length)
        let checksum = try reader.read(UInt32.self)
        return try decode(type: type, body: body, checksum: checksum)
    }
}

/// Whether `descriptor` is a socket, so that it can carry a return path.
func isSocket(_ descriptor: Int32) -> Bool {
    var type: Int32 = 0
    var length = socklen_t(MemoryLayout<Int32>.size)
    return getsockopt(descriptor, SOL_SOCKET, SO_TYPE, &type, &length) == 0
}

/// The source's end of the return path: a thread that reads the destination's messages and
/// keeps what the migration thread needs to know (a PONG arrived, the final verdict).
final class ReturnPathListener: @unchecked Sendable {
    // Sendable: shared fields live in `state`, under its mutex.
    struct State {
        var pongs = 0
        var verdict: ReturnPathMessage?
        var closed = false
        var error: String?
    }
    private let state = Mutex(State())
    private let condition = NSCondition()
    private let descriptor: Int32
    private let log: @Sendable (String) -> Void

    init(descriptor: Int32, log: @escaping @Sendable (String) -> Void) {
        self.descriptor = descriptor
        self.log = log
    }

    func start() {
        let thread = Thread { [self] in run() }
        thread.name = "return-path"
        thread.start()
    }

    private func run() {
        let reader = MigrationStreamReader(descriptor: descriptor)
        while true {
            do {
                let message = try ReturnPathMessage.read(from: reader)
                switch message {
                case .pong: state.withLock { $0.pongs += 1 }
                case .loaded, .failed:
                    state.withLock { $0.verdict = message }
                    signal()
                }
            } catch {
                // EOF is how a destination ends the return path; anything else is a bad peer.
                let ended = error.message.contains("ended early")
                if !ended { log("return path: \(error.message)") }
                state.withLock { $0.closed = true; if !ended { $0.error = error.message } }
                signal()
                return
            }
        }
    }

    private func signal() {
        condition.lock()
        condition.broadcast()
        condition.unlock()
    }

    /// Waits until the reading thread has ended (after the caller shut the socket down), so the
    /// descriptor can be closed without a reader still on it.
    func waitUntilClosed() {
        condition.lock()
        defer { condition.unlock() }
        while !state.withLock({ $0.closed }) { _ = condition.wait(until: Date().addingTimeInterval(0.1)) }
    }

    /// Whether the destination has answered a PING, i.e. it speaks the return path.
    var isAlive: Bool { state.withLock { $0.pongs > 0 } }

    /// A FAILED verdict that arrived during the migration (a destination refusing the stream).
    var earlyFailure: String? {
        state.withLock { if case let .failed(reason)? = $0.verdict { return reason } else { return nil } }
    }

    /// Waits up to `seconds` for the verdict; nil if none came (closed or timed out).
    func waitForVerdict(seconds: Double) -> ReturnPathMessage? {
        let deadline = Date().addingTimeInterval(seconds)
        condition.lock()
        defer { condition.unlock() }
        while true {
            let snapshot = state.withLock { ($0.verdict, $0.closed) }
            if let verdict = snapshot.0 { return verdict }
            if snapshot.1 { return nil }
            if !condition.wait(until: deadline) { return state.withLock { $0.verdict } }
        }
    }
}

/// The destination's end: writes messages on the incoming connection.
struct ReturnPathSender {
    let descriptor: Int32

    func send(_ message: ReturnPathMessage) {
        let bytes = message.encoded()
        var offset = 0
        while offset < bytes.count {
            let n = bytes.withUnsafeBytes { csocket_send(descriptor, $0.baseAddress! + offset, $0.count - offset, -1) }
            guard n > 0 else { return } // the source has gone; nothing more to tell it
            offset += n
        }
    }
}
