import Foundation
import Machine
import Testing
@testable import Migration

/// The destination's block loader fed crafted records: every size, range and order rule is
/// checked before anything is written to the image.
@Suite("Block migration loader")
struct BlockSectionTests {
    final class Image {
        let path: String
        let disk: DiskImage
        init(size: Int, fill: UInt8 = 0x5a) throws {
            path = FileManager.default.temporaryDirectory.appendingPathComponent("tern-blk-\(UUID().uuidString)").path
            FileManager.default.createFile(atPath: path, contents: Data(repeating: fill, count: size))
            disk = try DiskImage(DriveConfiguration(path: path, id: "d"), active: false)
        }
        deinit { unlink(path) }
        var bytes: [UInt8] { Array((try? Data(contentsOf: URL(fileURLWithPath: path))) ?? Data()) }
    }

    struct Body {
        var bytes: [UInt8] = []
        mutating func put<T: FixedWidthInteger>(_ value: T) { withUnsafeBytes(of: value.littleEndian) { bytes += $0 } }
    }

    func load(_ section: IncomingBlockSection, _ body: Body) throws(MigrationStreamError) {
        let bytes = body.bytes
        let raw = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes.count, alignment: 8)
        defer { raw.deallocate() }
        raw.copyBytes(from: bytes)
        try section.load(ByteCursor(UnsafeRawBufferPointer(raw)))
    }

    func setup(mode: UInt8 = 1, sizes: [UInt64], chunk: UInt32 = UInt32(DiskWriteTracker.chunkSize)) -> Body {
        var body = Body()
        body.put(UInt8(0)); body.put(mode); body.put(UInt32(sizes.count)); body.put(chunk)
        for size in sizes { body.put(size) }
        return body
    }

    func data(disk: UInt32 = 0, offset: UInt64, bytes: [UInt8]) -> Body {
        var body = Body()
        body.put(UInt8(1)); body.put(disk); body.put(offset); body.put(UInt32(bytes.count))
        body.bytes += bytes
        return body
    }

    @Test("data and zero records land where they say; the image is flushed at the end")
    func applies() throws {
        let image = try Image(size: 1 << 20)
        let section = IncomingBlockSection(disks: [image.disk])
        try load(section, setup(sizes: [1 << 20]))
        try load(section, data(offset: 4096, bytes: [UInt8](repeating: 7, count: 512)))
        var zero = Body()
        zero.put(UInt8(2)); zero.put(UInt32(0)); zero.put(UInt64(65536)); zero.put(UInt64(131072))
        try load(section, zero)
        try section.finish()
        let bytes = image.bytes
        #expect(bytes[4096..<4608].allSatisfy { $0 == 7 })
        #expect(bytes[65536..<196608].allSatisfy { $0 == 0 })
        #expect(bytes[0] == 0x5a && bytes[196608] == 0x5a)
    }

    @Test("refusals: size mismatch, disk count, chunk size, data before setup, ranges, lengths")
    func refusals() throws {
        let image = try Image(size: 1 << 20)
        let original = image.bytes
        func refused(_ bodies: [Body], _ expected: String) {
            let section = IncomingBlockSection(disks: [image.disk])
            do {
                for body in bodies { try load(section, body) }
                Issue.record("accepted; expected a refusal mentioning \(expected)")
            } catch {
                #expect(error.message.contains(expected), "\(error.message)")
            }
        }
        refused([setup(sizes: [2 << 20])], "2097152 bytes")
        refused([setup(sizes: [1 << 20, 1 << 20])], "2 disks")
        refused([setup(sizes: [1 << 20], chunk: 4096)], "chunk size")
        refused([setup(mode: 9, sizes: [1 << 20])], "mode 9")
        refused([data(offset: 0, bytes: [1])], "before the block setup")
        refused([setup(sizes: [1 << 20]), data(offset: (1 << 20) - 512, bytes: [UInt8](repeating: 1, count: 1024))], "does not fit")
        refused([setup(sizes: [1 << 20]), data(offset: 100, bytes: [UInt8](repeating: 1, count: 512))], "whole sectors")
        refused([setup(sizes: [1 << 20]), data(disk: 3, offset: 0, bytes: [UInt8](repeating: 1, count: 512))], "disk 3")
        var short = data(offset: 0, bytes: [UInt8](repeating: 1, count: 1024))
        short.bytes.removeLast(512)
        refused([setup(sizes: [1 << 20]), short], "block data")
        var overflow = Body()
        overflow.put(UInt8(2)); overflow.put(UInt32(0)); overflow.put(UInt64.max - 511); overflow.put(UInt64(1024))
        refused([setup(sizes: [1 << 20]), overflow], "does not fit")
        refused([setup(sizes: [1 << 20]), setup(sizes: [1 << 20])], "twice")
        #expect(image.bytes == original, "no refused record wrote anything")
    }

    @Test("the write tracker finds chunks written since open and since the last sync")
    func tracker() throws {
        let image = try Image(size: 1 << 20)
        let buffer = [UInt8](repeating: 1, count: 4096)
        try buffer.withUnsafeBytes { try image.disk.write(offset: 70000, from: $0.baseAddress!, count: 4096) }
        #expect(image.disk.writes.writtenSinceOpen() == [1])
        #expect(image.disk.writes.takeDirty().isEmpty, "not tracking yet")
        image.disk.writes.setTracking(true)
        try buffer.withUnsafeBytes { try image.disk.write(offset: 65536 * 15 - 2048, from: $0.baseAddress!, count: 4096) }
        #expect(image.disk.writes.dirtyCount == 2)
        #expect(image.disk.writes.takeDirty() == [14, 15])
        #expect(image.disk.writes.takeDirty().isEmpty)
        #expect(image.disk.writes.writtenSinceOpen() == [1, 14, 15])
    }
}
