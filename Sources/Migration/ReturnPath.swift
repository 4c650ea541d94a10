import CPageCodec
import CSocket
import Foundation
import Synchronization

/// Messages from the destination to the source, on the same connection where the transport
/// allows it (a socket: tcp, unix, or an fd that is one).
///
/// Framing: u16 type, u16 length (at most `maximumLength`), body, u32 CRC32C of the four
/// header bytes and the body. Postcopy adds page requests and the resume handshake.
public enum ReturnPathMessage: Equatable, Sendable {
    /// The answer to a stream PING, with its value.
    case pong(UInt32)
    /// The destination loaded the whole stream and its device state.
    case loaded
    /// The destination refused or failed the load, with its reason.
    case failed(String)
    /// Postcopy: a vCPU waits for these bytes of RAM (offset and length page-aligned).
    case requestPages(offset: UInt64, length: UInt32)
    /// Resuming postcopy: runs of pages the destination still lacks (offset, page count).
    case lacking([PageRun])
    /// Resuming postcopy: every LACKING has been sent; the total pages they name.
    case resumeReady(UInt64)

    /// A run of pages by RAM offset.
    public struct PageRun: Equatable, Sendable {
        public var offset: UInt64
        public var pages: UInt32
    }

    static let maximumLength = 1024
    /// LACKING runs per message: u32 count + 12 bytes each within `maximumLength`.
    static let maximumRunsPerMessage = (maximumLength - 4) / 12
    /// The longest page request a source serves (a 2 MiB huge page).
    static let maximumRequestLength: UInt32 = 2 << 20

    var typeCode: UInt16 {
        switch self {
        case .pong: 1
        case .loaded: 2
        case .failed: 3
        case .requestPages: 4
        case .lacking: 5
        case .resumeReady: 6
        }
    }

    /// The message as framed on the wire.
    func encoded() -> [UInt8] {
        var body: [UInt8] = []
        switch self {
        case let .pong(value): withUnsafeBytes(of: value.littleEndian) { body.append(contentsOf: $0) }
        case .loaded: break
        case let .failed(reason): body = Array(reason.utf8.prefix(Self.maximumLength))
        case let .requestPages(offset, length):
            withUnsafeBytes(of: offset.littleEndian) { body.append(contentsOf: $0) }
            withUnsafeBytes(of: length.littleEndian) { body.append(contentsOf: $0) }
        case let .lacking(runs):
            withUnsafeBytes(of: UInt32(runs.count).littleEndian) { body.append(contentsOf: $0) }
            for run in runs.prefix(Self.maximumRunsPerMessage) {
                withUnsafeBytes(of: run.offset.littleEndian) { body.append(contentsOf: $0) }
                withUnsafeBytes(of: run.pages.littleEndian) { body.append(contentsOf: $0) }
            }
        case let .resumeReady(total): withUnsafeBytes(of: total.littleEndian) { body.append(contentsOf: $0) }
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
            throw MigrationStreamError("RP: a message of type \(type) fails its checksum")
        }
        func u32(_ at: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(body[at + $1]) << (8 * $1) } }
        func u64(_ at: Int) -> UInt64 { (0..<8).reduce(0) { $0 | UInt64(body[at + $1]) << (8 * $1) } }
        switch type {
        case 1:
            guard body.count == 4 else { throw MigrationStreamError("a return-path PONG of \(body.count) bytes") }
            return .pong(u32(0))
        case 2:
            guard body.isEmpty else { throw MigrationStreamError("RP: a LOADED message with incorrect length \(body.count) (expecting 0)") }
            return .loaded
        case 3:
            guard let reason = String(validating: body, as: UTF8.self) else {
                throw MigrationStreamError("RP: a FAILED message whose reason is not UTF-8")
            }
            return .failed(reason)
        case 4:
            guard body.count == 12 else {
                throw MigrationStreamError("RP: a REQ_PAGES message with incorrect length \(body.count) (expecting 12)")
            }
            return .requestPages(offset: u64(0), length: u32(8))
        case 5:
            guard body.count >= 4, body.count == 4 + 12 * Int(u32(0)) else {
                throw MigrationStreamError("RP: a LACKING message with incorrect length \(body.count)")
            }
            return .lacking((0..<Int(u32(0))).map { PageRun(offset: u64(4 + 12 * $0), pages: u32(12 + 12 * $0)) })
        case 6:
            guard body.count == 8 else {
                throw MigrationStreamError("RP: a RESUME_READY message with incorrect length \(body.count) (expecting 8)")
            }
            return .resumeReady(u64(0))
        default:
            throw MigrationStreamError("RP: unknown return-path message type \(type)")
        }
    }

    /// Reads one message from `reader`; length checked before the body is read.
    static func read(from reader: MigrationStreamReader) throws(MigrationStreamError) -> ReturnPathMessage {
        let type = try reader.read(UInt16.self)
        let length = Int(try reader.read(UInt16.self))
        guard length <= maximumLength else {
            throw MigrationStreamError("RP: a message claims \(length) bytes (at most \(maximumLength))")
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
