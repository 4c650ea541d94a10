import CPageCodec

/// One version 2 record as read: its header fields and its checked body.
struct StreamRecord {
    let typeByte: UInt8
    let flags: UInt8
    let section: UInt16
    /// Where the record began in the stream (for messages).
    let streamOffset: UInt64
    var type: StreamRecordType? { StreamRecordType(rawValue: typeByte) }
    var isRequired: Bool { flags & StreamRecordFraming.requiredFlag != 0 }
}

/// Reads version 2 records: checks each header's flags and length before reading the body
/// into a reused buffer, and its CRC32C before handing the body out, so no decoder ever sees
/// bytes that were damaged on the way. (A section may take a record's bulk straight into its
/// own memory instead, `placement`: then the CRC is checked over what landed, before the
/// section is told the record is whole.)
final class StreamRecordReader {
    private let reader: MigrationStreamReader
    private var body: [UInt8] = []
    private(set) var bodyLength = 0
    private(set) var recordsRead: UInt64 = 0

    /// Where a SECTION_DATA record's bulk may go directly, saving a copy: asked with the
    /// record's section id, its first `placementPrefix` body bytes and its body length, it
    /// answers with memory for the rest of the body, or nil to read the record as usual. The
    /// record's checksum is then checked over what landed there, and a damaged record fails
    /// the load as any other (the bytes stay inside the memory the section vouched for).
    var placement: ((_ section: UInt16, _ prefix: UnsafeRawBufferPointer, _ bodyLength: Int) -> UnsafeMutableRawPointer?)?
    var placementPrefix = 0

    init(reader: MigrationStreamReader) {
        self.reader = reader
        body.reserveCapacity(1 << 20)
    }

    var bytesRead: UInt64 { reader.bytesRead }

    /// A body this long or longer is worth reading straight to its place.
    static let largeRecord = 64 << 10
    /// Read-ahead after a large record: the CRC, the next header and its placement prefix.
    static let afterLargeRecord = 1 << 10
    static let afterSmallRecord = 256 << 10

    func next() throws(MigrationStreamError) -> StreamRecord {
        let offset = reader.bytesRead
        let header = try reader.readBytes(StreamRecordFraming.headerSize)
        let flags = header[1]
        let section = UInt16(header[2]) | UInt16(header[3]) << 8
        let length = Int(UInt32(header[4]) | UInt32(header[5]) << 8 | UInt32(header[6]) << 16 | UInt32(header[7]) << 24)
        let typeName = StreamRecordType(rawValue: header[0])?.name ?? "0x\(String(header[0], radix: 16))"
        guard flags & ~StreamRecordFraming.knownFlags == 0 else {
            throw MigrationStreamError("record \(typeName) at byte \(offset) has unknown flags 0x\(String(flags, radix: 16))")
        }
        guard length <= StreamRecordFraming.maximumBodyLength else {
            throw MigrationStreamError("record \(typeName) at byte \(offset) claims \(length) bytes (at most \(StreamRecordFraming.maximumBodyLength))")
        }
        if body.count < length { body = [UInt8](repeating: 0, count: max(length, 1 << 20)) }
        var placed: (pointer: UnsafeMutableRawPointer, count: Int)?
        if let placement, placementPrefix > 0, length > placementPrefix, header[0] == StreamRecordType.sectionData.rawValue {
            try reader.read(into: &body, count: placementPrefix)
            let target = body.withUnsafeBytes { placement(section, UnsafeRawBufferPointer(rebasing: $0[0..<placementPrefix]), length) }
            if let target {
                try reader.read(into: target, count: length - placementPrefix)
                placed = (target, length - placementPrefix)
                bodyLength = placementPrefix
            } else {
                try reader.read(into: &body, at: placementPrefix, count: length - placementPrefix)
                bodyLength = length
            }
        } else {
            if length > 0 { try reader.read(into: &body, count: length) }
            bodyLength = length
        }
        if flags & StreamRecordFraming.checksumFlag != 0 {
            let expected = try reader.read(UInt32.self)
            var crc = header.withUnsafeBytes { cpage_crc32c(0, $0.baseAddress!, $0.count) }
            crc = body.withUnsafeBytes { cpage_crc32c(crc, $0.baseAddress!, bodyLength) }
            if let placed { crc = cpage_crc32c(crc, placed.pointer, placed.count) }
            guard crc == expected else {
                throw MigrationStreamError("record \(typeName) at byte \(offset) fails its checksum (the stream was damaged)")
            }
        }
        recordsRead += 1
        // After a large record another usually follows: read ahead only a little, so that its
        // body goes from the socket straight to its place (measured: the copy out of the read
        // buffer was a quarter of the destination's CPU with 256 KiB records).
        reader.readAhead = length >= Self.largeRecord ? Self.afterLargeRecord : Self.afterSmallRecord
        return StreamRecord(typeByte: header[0], flags: flags, section: section, streamOffset: offset)
    }

    /// Runs `work` over the last record's body.
    func withBody<T>(_ work: (ByteCursor) throws(MigrationStreamError) -> T) throws(MigrationStreamError) -> T {
        let result = body.withUnsafeBytes { raw -> Result<T, MigrationStreamError> in
            do throws(MigrationStreamError) {
                return .success(try work(ByteCursor(UnsafeRawBufferPointer(rebasing: raw[0..<bodyLength]))))
            } catch {
                return .failure(error)
            }
        }
        return try result.get()
    }
}

/// A bounds-checked little-endian reader over a record body; every read says what it wanted
/// when the body is too short.
final class ByteCursor {
    let bytes: UnsafeRawBufferPointer
    private(set) var position = 0

    init(_ bytes: UnsafeRawBufferPointer) { self.bytes = bytes }

    var remaining: Int { bytes.count - position }

    func read<T: FixedWidthInteger>(_ type: T.Type, _ what: @autoclosure () -> String) throws(MigrationStreamError) -> T {
        let size = MemoryLayout<T>.size
        guard remaining >= size else { throw MigrationStreamError("a record ends inside its \(what())") }
        var value: T = 0
        for index in 0..<size { value |= T(bytes[position + index]) << (8 * index) }
        position += size
        return value
    }

    /// `count` bytes in place (valid while the record is).
    func take(_ count: Int, _ what: @autoclosure () -> String) throws(MigrationStreamError) -> UnsafeRawBufferPointer {
        guard count >= 0, remaining >= count else { throw MigrationStreamError("a record ends inside its \(what())") }
        defer { position += count }
        return UnsafeRawBufferPointer(rebasing: bytes[position..<position + count])
    }

    func string(maximum: Int, _ what: @autoclosure () -> String) throws(MigrationStreamError) -> String {
        let length = Int(try read(UInt8.self, "\(what()) length"))
        guard length <= maximum else { throw MigrationStreamError("\(what()) of \(length) bytes (at most \(maximum))") }
        let raw = try take(length, what())
        guard let text = String(validating: raw, as: UTF8.self) else { throw MigrationStreamError("\(what()) is not UTF-8") }
        return text
    }

    /// The body must be used up exactly.
    func finish(_ what: @autoclosure () -> String) throws(MigrationStreamError) {
        guard remaining == 0 else { throw MigrationStreamError("\(what()) has \(remaining) bytes left over") }
    }
}
