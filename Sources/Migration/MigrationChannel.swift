import CPageCodec
import CSocket
import Foundation

/// Why a migration stream could not be written or read.
public struct MigrationStreamError: Error, CustomStringConvertible, Equatable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// The sending end of a migration stream: buffered little-endian writes framed into version 2
/// records (`beginRecord` … `endRecord`, which fills in the length and appends the CRC32C),
/// a byte count for the statistics, and a sticky error as in QEMU's QEMUFile, so the hot loop
/// writes and checks once per batch. A record is always whole in the buffer before it is
/// written, so its checksum covers exactly the bytes that go out, even when the guest keeps
/// writing the pages it was copied from.
final class MigrationStreamWriter {
    let io: ConnectionIO
    private var buffer: [UInt8] = []
    /// Bytes gathered before a send: 1 MiB rather than 256 KiB cut the paused-source 512 MiB
    /// migration from 407 to 327 ms here (fewer sends and receiver wake-ups; docs/performance.md).
    private let bufferCapacity = 1 << 20
    private var recordStart: Int?
    /// Whether records carry a CRC32C (the `x-checksum` parameter).
    var checksums = true
    private(set) var bytesWritten: UInt64 = 0
    private(set) var recordsWritten: UInt64 = 0
    private(set) var error: MigrationStreamError?

    init(io: ConnectionIO) {
        self.io = io
        buffer.reserveCapacity(bufferCapacity + (1 << 20))
    }

    /// A writer on a plain descriptor (a socket, pipe or file).
    convenience init(descriptor: Int32) { self.init(io: PlainConnectionIO(descriptor: descriptor)) }

    func append<T: FixedWidthInteger>(_ value: T) {
        withUnsafeBytes(of: value.littleEndian) { buffer.append(contentsOf: $0) }
    }

    func append(bytes: [UInt8]) {
        buffer.append(contentsOf: bytes)
    }

    /// Copies `count` bytes of memory (guest pages) into the current record.
    func append(memory: UnsafeRawPointer, count: Int) {
        buffer.append(contentsOf: UnsafeRawBufferPointer(start: memory, count: count))
    }

    /// Appends raw bytes outside any record (the stream header).
    func appendHeader(_ bytes: [UInt8]) {
        precondition(recordStart == nil)
        buffer.append(contentsOf: bytes)
    }

    /// Starts a record; its body is what is appended until `endRecord`.
    func beginRecord(_ type: StreamRecordType, section: UInt16 = StreamRecordFraming.noSection, required: Bool) {
        precondition(recordStart == nil, "records do not nest")
        recordStart = buffer.count
        buffer.append(type.rawValue)
        buffer.append((required ? StreamRecordFraming.requiredFlag : 0) | (checksums ? StreamRecordFraming.checksumFlag : 0))
        append(section)
        append(UInt32(0)) // the length, filled in by endRecord
    }

    /// Overwrites a value already appended to the open record's body, `offset` bytes into it.
    func patchRecordBody<T: FixedWidthInteger>(at offset: Int, _ value: T) {
        guard let start = recordStart else { return }
        let at = start + StreamRecordFraming.headerSize + offset
        withUnsafeBytes(of: value.littleEndian) { bytes in
            for index in 0..<bytes.count { buffer[at + index] = bytes[index] }
        }
    }

    /// Closes the record: fills in its length, appends its checksum, and writes the buffer
    /// out once it is full.
    func endRecord() {
        guard let start = recordStart else { return }
        recordStart = nil
        let length = UInt32(buffer.count - start - StreamRecordFraming.headerSize)
        withUnsafeBytes(of: length.littleEndian) { bytes in
            for index in 0..<4 { buffer[start + 4 + index] = bytes[index] }
        }
        if checksums {
            let crc = buffer.withUnsafeBytes { raw in
                cpage_crc32c(0, raw.baseAddress! + start, raw.count - start)
            }
            append(crc)
        }
        recordsWritten += 1
        if buffer.count >= bufferCapacity { flush() }
    }

    /// One whole record whose body `body` writes.
    func record(_ type: StreamRecordType, section: UInt16 = StreamRecordFraming.noSection, required: Bool,
                _ body: (MigrationStreamWriter) -> Void = { _ in }) {
        beginRecord(type, section: section, required: required)
        body(self)
        endRecord()
    }

    func flush() {
        precondition(recordStart == nil, "flush inside a record")
        guard !buffer.isEmpty else { return }
        buffer.withUnsafeBytes { writeFully($0.baseAddress!, $0.count) }
        buffer.removeAll(keepingCapacity: true)
    }

    private func writeFully(_ pointer: UnsafeRawPointer, _ count: Int) {
        guard error == nil else { return }
        do throws(MigrationStreamError) {
            try io.sendAll(pointer, count: count)
            bytesWritten += UInt64(count)
        } catch let failure {
            error = failure
        }
    }

    /// Bytes accepted so far, including those still buffered.
    var position: UInt64 { bytesWritten + UInt64(buffer.count) }
}

/// The receiving end: exact reads, page data read straight into guest memory.
final class MigrationStreamReader {
    let io: ConnectionIO
    private var buffer = [UInt8](repeating: 0, count: 256 << 10)
    private var start = 0
    private var end = 0
    private(set) var bytesRead: UInt64 = 0
    /// How much a refill may take beyond what the caller needs. A record reader lowers it
    /// while large records come, so that a record's header does not pull most of its body into
    /// this buffer (to be copied out again) and the body is read straight to where it goes.
    var readAhead = 256 << 10

    init(io: ConnectionIO) {
        self.io = io
    }

    /// A reader on a plain descriptor (a socket, pipe or file).
    convenience init(descriptor: Int32) { self.init(io: PlainConnectionIO(descriptor: descriptor)) }

    static let endedEarly = MigrationStreamError("the migration stream ended early (truncated stream or the source went away)")

    private func fill(wanting: Int = 1) throws(MigrationStreamError) {
        start = 0
        end = 0
        let capacity = min(buffer.count, max(wanting, readAhead))
        let io = self.io
        let result = buffer.withUnsafeMutableBytes { raw -> Result<Int, MigrationStreamError> in
            do throws(MigrationStreamError) { return .success(try io.receive(into: raw.baseAddress!, count: capacity)) } catch {
                return .failure(error)
            }
        }
        let n = try result.get()
        if n == 0 { throw Self.endedEarly }
        end = n
    }

    func read<T: FixedWidthInteger>(_ type: T.Type) throws(MigrationStreamError) -> T {
        var value: T = 0
        for index in 0..<MemoryLayout<T>.size {
            if start == end { try fill() }
            value |= T(buffer[start]) << (8 * index)
            start += 1
        }
        bytesRead += UInt64(MemoryLayout<T>.size)
        return value
    }

    /// Reads exactly `count` bytes into `destination`.
    func read(into destination: UnsafeMutableRawPointer, count: Int) throws(MigrationStreamError) {
        var done = min(count, end - start)
        if done > 0 {
            buffer.withUnsafeBytes { destination.copyMemory(from: $0.baseAddress! + start, byteCount: done) }
            start += done
        }
        while done < count {
            if count - done < 64 << 10 {
                try fill(wanting: count - done)
                let take = min(count - done, end - start)
                buffer.withUnsafeBytes { (destination + done).copyMemory(from: $0.baseAddress! + start, byteCount: take) }
                start += take
                done += take
                continue
            }
            let n = try io.receive(into: destination + done, count: count - done)
            if n == 0 { throw Self.endedEarly }
            done += n
        }
        bytesRead += UInt64(count)
    }

    /// Reads exactly `count` bytes into `bytes` from index `start` (which must leave room).
    func read(into bytes: inout [UInt8], at start: Int = 0, count: Int) throws(MigrationStreamError) {
        precondition(start >= 0 && bytes.count - start >= count)
        guard count > 0 else { return }
        let failure = bytes.withUnsafeMutableBytes { raw -> MigrationStreamError? in
            do throws(MigrationStreamError) { try read(into: raw.baseAddress! + start, count: count); return nil } catch { return error }
        }
        if let failure { throw failure }
    }

    func readBytes(_ count: Int) throws(MigrationStreamError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        if count > 0 {
            let failure = bytes.withUnsafeMutableBytes { raw -> MigrationStreamError? in
                do throws(MigrationStreamError) { try read(into: raw.baseAddress!, count: count); return nil } catch { return error }
            }
            if let failure { throw failure }
        }
        return bytes
    }

    /// Skips `count` bytes (a page record aimed at memory the loader refuses is never applied).
    func skip(_ count: Int) throws(MigrationStreamError) {
        var left = count
        while left > 0 {
            if start == end { try fill() }
            let take = min(left, end - start)
            start += take
            left -= take
        }
        bytesRead += UInt64(count)
    }
}
