import Foundation
import Machine
import Testing
@testable import Migration

/// A destination with no KVM: guest memory and a device-state sink. The loader talks to the
/// machine only through `MigrationTarget`, so these tests drive the real loader and the real
/// page decoders.
final class MemoryOnlyTarget: MigrationTarget {
    let memory: GuestMemory
    let cpuCount = 1
    let disks: [DiskImage] = []
    let deviceSectionNames = ["clock"]
    private(set) var loadedSections: [StateSection] = []

    init(ram: UInt64 = 16 << 20) throws {
        memory = try GuestMemory(layout: GuestMemoryLayout(ramSize: ram))
    }

    func loadDeviceState(_ sections: [StateSection]) throws(StateLoadError) -> RunState {
        guard sections.map(\.name) == deviceSectionNames else { throw StateLoadError("expected only 'clock'") }
        loadedSections = sections
        return .running
    }

    var bytes: [UInt8] { Array(UnsafeRawBufferPointer(start: memory.hostBase, count: Int(memory.size))) }
}

/// Builds version 2 streams with the real writer and loads them with the real loader.
@Suite("Stream v2 loader without KVM")
struct StreamV2LoaderTests {
    static let ram: UInt64 = 16 << 20
    static let page = Int(MigrationStreamFormat.pageSize)

    /// Writes a stream through `MigrationStreamWriter` into a file and returns its bytes.
    func stream(configuration: StreamConfiguration? = nil, checksums: Bool = true,
                _ body: (MigrationStreamWriter) -> Void) throws -> [UInt8] {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("tern-v2-\(UUID().uuidString)").path
        let fd = open(path, O_CREAT | O_RDWR | O_TRUNC, 0o600)
        #expect(fd >= 0)
        defer { close(fd); unlink(path) }
        let writer = MigrationStreamWriter(descriptor: fd)
        writer.checksums = checksums
        writer.appendHeader(MigrationStreamFormat.magic + [2, 0, 0, 0])
        let config = configuration ?? Self.configuration()
        writer.record(.configuration, required: true) { config.encode(into: $0) }
        body(writer)
        writer.flush()
        #expect(writer.error == nil)
        return Array(try Data(contentsOf: URL(fileURLWithPath: path)))
    }

    static func configuration(encodings: [PageEncoding] = PageEncoding.allCases, capabilities: [String] = [],
                              ram: UInt64 = StreamV2LoaderTests.ram) -> StreamConfiguration {
        StreamConfiguration(ramSize: ram, cpuCount: 1, deviceSections: ["clock"], capabilities: capabilities,
                            encodings: encodings, sections: [.init(id: 0, name: "ram", version: 1), .init(id: 1, name: "devices", version: 1)],
                            returnPath: false)
    }

    /// The device state and END that make a stream complete.
    func finish(_ writer: MigrationStreamWriter) {
        writer.record(.sectionData, section: 1, required: true) { w in
            w.append(UInt8(5)); w.append(bytes: Array("clock".utf8)); w.append(UInt32(1)); w.append(UInt32(8)); w.append(UInt64(42))
        }
        let records = writer.recordsWritten
        writer.record(.end, required: true) { $0.append(records) }
    }

    /// Loads `bytes` into a fresh target; returns the error text (nil on success), the target,
    /// and whether memory was left untouched.
    func load(_ bytes: [UInt8], capabilities: [String] = [], prepare: (MemoryOnlyTarget) -> Void = { _ in })
        throws -> (error: String?, target: MemoryOnlyTarget, untouched: Bool) {
        let target = try MemoryOnlyTarget(ram: Self.ram)
        prepare(target)
        let before = target.bytes
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("tern-load-\(UUID().uuidString)").path
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        let fd = open(path, O_RDONLY)
        defer { close(fd); unlink(path) }
        let incoming = IncomingMigration(target: target, descriptor: fd,
                                         settings: IncomingSettings(capabilities: capabilities, decompressThreads: 2))
        var message: String?
        do { _ = try incoming.load { _ in } } catch { message = error.message }
        return (message, target, before == target.bytes)
    }

    func ramRecord(_ writer: MigrationStreamWriter, _ body: (MigrationStreamWriter) -> Void) {
        writer.record(.sectionData, section: 0, required: true, body)
    }

    func pattern(_ seed: Int) -> [UInt8] { (0..<Self.page).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ seed &* 7) } }

    @Test("a valid stream with every encoder loads: raw, zero, XBZRLE, zlib, zstd, from the real encoders")
    func everyEncoder() throws {
        // Source memory, encoded by the real encoder chain into a stream.
        let source = try MemoryOnlyTarget(ram: Self.ram)
        for page in 0..<64 { pattern(page).withUnsafeBytes { (source.memory.hostBase + page * Self.page).copyMemory(from: $0.baseAddress!, byteCount: Self.page) } }
        let cache = try #require(XBZRLECache(bytes: 1 << 20))
        let xbzrle = XBZRLEPageEncoder(cache: cache)
        let zlib = CompressedPageEncoder(method: .zlib, level: 1, threads: 2)
        let zstd = CompressedPageEncoder(method: .zstd, level: 1, threads: 2)
        let zero = ZeroPageEncoder()
        let raw = RawPageEncoder()
        let bytes = try stream { writer in
            let section = SectionStream(writer: writer, id: 0)
            func offer(_ page: Int, _ chain: [PageEncoder]) {
                var candidate = PageCandidate(page: page, contents: UnsafeRawPointer(source.memory.hostBase + page * Self.page))
                for encoder in chain where encoder.offer(&candidate, section) { return }
            }
            for page in 0..<16 { offer(page, [zero, xbzrle, raw]) } // misses: raw, cached
            for page in 16..<32 { offer(page, [zero, zlib]) }
            for page in 32..<48 { offer(page, [zero, zstd]) }
            for page in 48..<64 { offer(page, [raw]) }
            for page in 100..<110 { offer(page, [zero, raw]) }
            for encoder in [raw, zero, zlib, zstd, xbzrle] as [PageEncoder] { encoder.flush(section) }
            // The guest changes two lines of the first 16 pages; they go as deltas.
            for page in 0..<16 { for byte in 0..<100 { (source.memory.hostBase + page * Self.page + byte).storeBytes(of: 0xAB, as: UInt8.self) } }
            for page in 0..<16 { offer(page, [zero, xbzrle, raw]) }
            for encoder in [raw, xbzrle] as [PageEncoder] { encoder.flush(section) }
            finish(writer)
        }
        #expect(xbzrle.pages == 16 && xbzrle.cacheMisses == 16)
        #expect(zlib.compressedPages == 16 && zstd.compressedPages == 16)
        let result = try load(bytes) { target in
            // Pages 100..<110 hold data on the destination; zero runs must clear them.
            for page in 100..<110 { (target.memory.hostBase + page * Self.page).storeBytes(of: 0xFF, as: UInt8.self) }
        }
        #expect(result.error == nil)
        #expect(result.target.bytes == source.bytes, "destination memory differs from the source's")
        #expect(result.target.loadedSections.first?.payload == [42, 0, 0, 0, 0, 0, 0, 0])
    }

    @Test("the configuration is checked before any page: RAM, vCPUs, devices, capabilities, sections")
    func configurationMismatch() throws {
        var other = Self.configuration(ram: 32 << 20)
        #expect(try load(stream(configuration: other) { finish($0) }).error?.contains("same -m") == true)
        other = Self.configuration(); other.cpuCount = 2
        #expect(try load(stream(configuration: other) { finish($0) }).error?.contains("same -smp") == true)
        other = Self.configuration(); other.deviceSections = ["clock", "disk0"]
        #expect(try load(stream(configuration: other) { finish($0) }).error?.contains("'disk0'") == true)
        other = Self.configuration(capabilities: ["compress"])
        #expect(try load(stream(configuration: other) { finish($0) }).error?.contains("capability 'compress'") == true)
        #expect(try load(stream { finish($0) }, capabilities: ["compress"]).error?.contains("on here but the source") == true)
        other = Self.configuration(); other.sections.append(.init(id: 2, name: "vga", version: 1))
        #expect(try load(stream(configuration: other) { finish($0) }).error?.contains("'vga'") == true)
        other = Self.configuration(); other.sections[0].version = 9
        #expect(try load(stream(configuration: other) { finish($0) }).error?.contains("version 9") == true)
        // A page before the END of a mismatching stream is never applied.
        other = Self.configuration(ram: 32 << 20)
        let result = try load(stream(configuration: other) { w in
            ramRecord(w) { $0.append(PageEncoding.raw.rawValue); $0.append(UInt64(0)); $0.append(UInt32(1)); $0.append(bytes: pattern(1)) }
            finish(w)
        })
        #expect(result.untouched)
    }

    @Test("hostile RAM records are refused with memory untouched")
    func hostileRecords() throws {
        let raw = PageEncoding.raw.rawValue
        let cases: [(String, (MigrationStreamWriter) -> Void)] = [
            ("outside guest RAM", { w in w.append(raw); w.append(Self.ram); w.append(UInt32(1)); w.append(bytes: self.pattern(1)) }),
            ("outside guest RAM", { w in w.append(raw); w.append(Self.ram - 4096); w.append(UInt32(2)); w.append(bytes: self.pattern(1) + self.pattern(2)) }),
            ("malformed", { w in w.append(raw); w.append(UInt64(4097)); w.append(UInt32(1)); w.append(bytes: self.pattern(1)) }),
            ("malformed", { w in w.append(raw); w.append(UInt64(0)); w.append(UInt32(0)) }),
            ("ends inside", { w in w.append(raw); w.append(UInt64(0)); w.append(UInt32(2)); w.append(bytes: self.pattern(1)) }),
            ("left over", { w in w.append(raw); w.append(UInt64(0)); w.append(UInt32(1)); w.append(bytes: self.pattern(1) + [1]) }),
            ("unknown page encoding", { w in w.append(UInt8(0x77)) }),
            ("outside guest RAM", { w in w.append(PageEncoding.zero.rawValue); w.append(UInt64.max - 4095); w.append(UInt32(2)) }),
            // XBZRLE: a delta past the page, a length over a page, a page named twice, lengths that lie.
            ("malformed", { w in w.append(PageEncoding.xbzrle.rawValue); w.append(UInt16(1)); w.append(UInt64(0)); w.append(UInt16(4)); w.append(bytes: [0x80, 0x20, 0x01, 0xAA]) }),
            ("claims", { w in w.append(PageEncoding.xbzrle.rawValue); w.append(UInt16(1)); w.append(UInt64(0)); w.append(UInt16(5000)); w.append(bytes: [UInt8](repeating: 0, count: 5000)) }),
            ("twice", { w in w.append(PageEncoding.xbzrle.rawValue); w.append(UInt16(2)); w.append(UInt64(0)); w.append(UInt16(3)); w.append(UInt64(0)); w.append(UInt16(3)); w.append(bytes: [0, 1, 9, 0, 1, 9]) }),
            ("add up", { w in w.append(PageEncoding.xbzrle.rawValue); w.append(UInt16(1)); w.append(UInt64(0)); w.append(UInt16(3)); w.append(bytes: [0, 1, 9, 9]) }),
            ("empty", { w in w.append(PageEncoding.xbzrle.rawValue); w.append(UInt16(0)) }),
            // Compressed: garbage, an absurd length, a page outside RAM.
            ("does not decompress", { w in w.append(PageEncoding.zlib.rawValue); w.append(UInt16(1)); w.append(UInt64(0)); w.append(UInt32(3)); w.append(bytes: [1, 2, 3]) }),
            ("does not decompress", { w in w.append(PageEncoding.zstd.rawValue); w.append(UInt16(1)); w.append(UInt64(0)); w.append(UInt32(3)); w.append(bytes: [1, 2, 3]) }),
            ("claims", { w in w.append(PageEncoding.zlib.rawValue); w.append(UInt16(1)); w.append(UInt64(0)); w.append(UInt32(1 << 30)) }),
            ("outside guest RAM", { w in w.append(PageEncoding.zstd.rawValue); w.append(UInt16(1)); w.append(Self.ram); w.append(UInt32(3)); w.append(bytes: [1, 2, 3]) }),
        ]
        for (expected, body) in cases {
            let result = try load(stream { w in ramRecord(w, body); finish(w) })
            #expect(result.error?.contains(expected) == true, "wanted '\(expected)', got \(result.error ?? "success")")
            #expect(result.untouched, "a refused record wrote guest memory: \(result.error ?? "")")
        }
    }

    @Test("an encoding the source did not announce is refused")
    func unannouncedEncoding() throws {
        let config = Self.configuration(encodings: [.zero, .raw])
        let result = try load(stream(configuration: config) { w in
            ramRecord(w) { $0.append(PageEncoding.xbzrle.rawValue); $0.append(UInt16(1)); $0.append(UInt64(0)); $0.append(UInt16(0)) }
            finish(w)
        })
        #expect(result.error?.contains("did not announce") == true)
    }

    @Test("a re-sent raw run is read straight into present guest memory; damaged, it still fails its checksum")
    func directPlacement() throws {
        // Pass 1 places pages 8..<12 (pwrite: they become present); pass 2 re-sends them with new
        // contents, which the reader puts straight into guest memory. Pages 20..<22 are present
        // before the load (a preallocated destination), so their first run goes direct too.
        func run(_ w: MigrationStreamWriter, first: Int, count: Int, seed: Int) {
            ramRecord(w) { r in
                r.append(PageEncoding.raw.rawValue); r.append(UInt64(first * Self.page)); r.append(UInt32(count))
                for page in 0..<count { r.append(bytes: pattern(seed + page)) }
            }
        }
        let bytes = try stream { w in
            run(w, first: 8, count: 4, seed: 1)
            run(w, first: 8, count: 4, seed: 50)
            run(w, first: 20, count: 2, seed: 90)
            finish(w)
        }
        let preallocated: (MemoryOnlyTarget) -> Void = { target in
            var zero = [UInt8](repeating: 0, count: 2 * Self.page)
            _ = zero.withUnsafeMutableBytes { target.memory.place(atOffset: UInt64(20 * Self.page), from: $0.baseAddress!, count: $0.count) }
        }
        let result = try load(bytes, prepare: preallocated)
        #expect(result.error == nil)
        var expected = [UInt8](repeating: 0, count: Int(Self.ram))
        for page in 0..<4 { expected.replaceSubrange((8 + page) * Self.page..<(9 + page) * Self.page, with: pattern(50 + page)) }
        for page in 0..<2 { expected.replaceSubrange((20 + page) * Self.page..<(21 + page) * Self.page, with: pattern(90 + page)) }
        #expect(result.target.bytes == expected)
        #expect(result.target.memory.isPlaced(offset: UInt64(8 * Self.page), length: UInt64(4 * Self.page)))

        // A flipped byte in the second run's data (read straight into memory) fails the load.
        let secondRunData = bytes.count - 3 * Self.page - 200
        var damaged = bytes
        damaged[secondRunData] ^= 0x01
        #expect(try load(damaged, prepare: preallocated).error?.contains("fails its checksum") == true)
    }

    @Test("framing: damaged bytes fail the checksum; unknown optional records are skipped, required ones refused")
    func framing() throws {
        let good = try stream { w in
            ramRecord(w) { $0.append(PageEncoding.raw.rawValue); $0.append(UInt64(0)); $0.append(UInt32(1)); $0.append(bytes: pattern(3)) }
            finish(w)
        }
        #expect(try load(good).error == nil)
        var damaged = good
        damaged[damaged.count / 2] ^= 0x01 // a page byte: only the checksum can tell
        let result = try load(damaged)
        #expect(result.error?.contains("fails its checksum") == true)
        #expect(result.untouched)
        // Without checksums the same damage would go unnoticed: the check is what catches it.
        let unchecked = try stream(checksums: false) { w in
            ramRecord(w) { $0.append(PageEncoding.raw.rawValue); $0.append(UInt64(0)); $0.append(UInt32(1)); $0.append(bytes: pattern(3)) }
            finish(w)
        }
        var uncheckedDamaged = unchecked
        uncheckedDamaged[uncheckedDamaged.count / 2] ^= 0x01
        #expect(try load(uncheckedDamaged).error == nil)

        // Unknown record types: header bytes written by hand (type 0x50), optional then required.
        func withRecord(flags: UInt8) throws -> [UInt8] {
            try stream { w in
                w.appendHeaderRecord(type: 0x50, flags: flags, body: [1, 2, 3])
                finish(w)
            }
        }
        #expect(try load(withRecord(flags: 0)).error?.contains("records but") == true, "END counts the skipped record")
        #expect(try load(withRecord(flags: StreamRecordFraming.requiredFlag)).error?.contains("required record of unknown type 0x50") == true)
        #expect(try load(stream { w in w.appendHeaderRecord(type: 0x02, flags: 0x80, body: []) }).error?.contains("unknown flags") == true)
        #expect(try load(stream { w in w.appendHeaderRecord(type: 0x02, flags: 0, body: [], claimedLength: 1 << 30) }).error?.contains("claims") == true)
        #expect(try load(stream { _ in }).error?.contains("ended early") == true)
        #expect(try load(Array(good.prefix(good.count - 3))).error?.contains("ended early") == true)
    }
}

extension MigrationStreamWriter {
    /// A record written byte by byte, for tests of unknown types and flags.
    func appendHeaderRecord(type: UInt8, flags: UInt8, body: [UInt8], claimedLength: UInt32? = nil) {
        var bytes: [UInt8] = [type, flags, 0xff, 0xff]
        withUnsafeBytes(of: (claimedLength ?? UInt32(body.count)).littleEndian) { bytes.append(contentsOf: $0) }
        appendHeader(bytes + body)
    }
}
