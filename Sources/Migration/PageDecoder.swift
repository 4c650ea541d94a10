import CGuestMemory
import CPageCodec
import Machine

/// The destination's half of a page encoding: applies one RAM record body (after its encoding
/// byte) to guest memory. Every decoder checks every offset, count and length of the whole
/// record before it writes anything, and never writes outside the pages the record names.
protocol PageDecoder: AnyObject {
    /// Applies the record; returns the pages it carried.
    func apply(_ body: ByteCursor, to memory: GuestMemory) throws(MigrationStreamError) -> UInt64
}

/// Checks a run of pages and returns where it lies in guest memory.
func guestPages(_ memory: GuestMemory, offset: UInt64, count: UInt64, _ what: String) throws(MigrationStreamError) -> UnsafeMutableRawPointer {
    let pageSize = MigrationStreamFormat.pageSize
    guard count > 0, count <= UInt64(MigrationStreamFormat.maximumPagesPerRecord), offset % pageSize == 0 else {
        throw MigrationStreamError("a \(what) record with offset 0x\(String(offset, radix: 16)) and \(count) pages is malformed")
    }
    guard let pointer = memory.pointer(atOffset: offset, length: count * pageSize) else {
        throw MigrationStreamError("a \(what) record at offset 0x\(String(offset, radix: 16)) (\(count) pages) lies outside guest RAM")
    }
    return pointer
}

/// Zero runs, so zero pages are neither dirtied nor allocated.
final class ZeroPageDecoder: PageDecoder {
    func apply(_ body: ByteCursor, to memory: GuestMemory) throws(MigrationStreamError) -> UInt64 {
        let offset = try body.read(UInt64.self, "zero run offset")
        let count = UInt64(try body.read(UInt32.self, "zero run count"))
        try body.finish("a zero run")
        _ = try guestPages(memory, offset: offset, count: count, "zero run") // checks the run
        zeroGuestPages(memory, offset: offset, length: count * MigrationStreamFormat.pageSize)
        return count
    }
}

/// Makes a checked run of guest pages read as zero without allocating them: large runs are
/// punched out of the memfd, small ones cleared only where they hold data.
func zeroGuestPages(_ memory: GuestMemory, offset: UInt64, length: UInt64) {
    let pageSize = MigrationStreamFormat.pageSize
    if length >= 64 * pageSize, memory.discard(offset: offset, length: length) { return }
    if memory.isPlaced(offset: offset, length: length) { // present: no need to look for holes
        cguest_zero_pages(memory.hostBase + Int(offset), Int(length), Int(pageSize))
        return
    }
    for extent in memory.dataExtents(offset: offset, length: length) {
        cguest_zero_pages(memory.hostBase + Int(extent.offset), Int(extent.length), Int(pageSize))
    }
}

/// Pages with their contents.
final class RawPageDecoder: PageDecoder {
    func apply(_ body: ByteCursor, to memory: GuestMemory) throws(MigrationStreamError) -> UInt64 {
        let offset = try body.read(UInt64.self, "page run offset")
        let count = UInt64(try body.read(UInt32.self, "page run count"))
        let destination = try guestPages(memory, offset: offset, count: count, "page")
        let data = try body.take(Int(count * MigrationStreamFormat.pageSize), "page data")
        try body.finish("a page run")
        memory.place(atOffset: UInt64(destination - memory.hostBase), from: data.baseAddress!, count: data.count)
        return count
    }
}

/// Writes a decoded batch's pages (held one after another from `scratch`) into guest memory.
func placePages(_ entries: [(pointer: UnsafeMutableRawPointer, length: Int)], from scratch: UnsafeMutableRawPointer,
                pageSize: Int, into memory: GuestMemory) {
    for (index, entry) in entries.enumerated() {
        memory.place(atOffset: UInt64(entry.pointer - memory.hostBase), from: scratch + index * pageSize, count: pageSize)
    }
}

/// The index of a batch record (XBZRLE, compressed): every entry checked, and no page twice,
/// since the entries of one batch are applied together.
func batchIndex(_ body: ByteCursor, memory: GuestMemory, lengthBytes: Int, maximumLength: Int,
                _ what: String) throws(MigrationStreamError) -> [(pointer: UnsafeMutableRawPointer, length: Int)] {
    let count = Int(try body.read(UInt16.self, "\(what) count"))
    guard count > 0 else { throw MigrationStreamError("an empty \(what) record") }
    var entries: [(pointer: UnsafeMutableRawPointer, length: Int)] = []
    entries.reserveCapacity(count)
    var seen = Set<UInt64>()
    var total = 0
    for _ in 0..<count {
        let offset = try body.read(UInt64.self, "\(what) offset")
        let length = lengthBytes == 2 ? Int(try body.read(UInt16.self, "\(what) length")) : Int(try body.read(UInt32.self, "\(what) length"))
        guard length <= maximumLength else {
            throw MigrationStreamError("a \(what) page at offset 0x\(String(offset, radix: 16)) claims \(length) bytes (at most \(maximumLength))")
        }
        let pointer = try guestPages(memory, offset: offset, count: 1, what)
        guard seen.insert(offset).inserted else {
            throw MigrationStreamError("a \(what) record names page 0x\(String(offset, radix: 16)) twice")
        }
        entries.append((pointer, length))
        total += length
    }
    guard total == body.remaining else {
        throw MigrationStreamError("a \(what) record's lengths add up to \(total) bytes but it carries \(body.remaining)")
    }
    return entries
}

/// XBZRLE deltas, applied to the pages as the destination holds them. Each delta is first
/// applied to a copy, and the pages are written only once every delta of the record decodes.
final class XBZRLEPageDecoder: PageDecoder {
    private let pageSize = Int(MigrationStreamFormat.pageSize)
    private let scratch: UnsafeMutableRawPointer

    init() { scratch = .allocate(byteCount: XBZRLEPageEncoder.maximumBatch * Int(MigrationStreamFormat.pageSize), alignment: 64) }
    deinit { scratch.deallocate() }

    func apply(_ body: ByteCursor, to memory: GuestMemory) throws(MigrationStreamError) -> UInt64 {
        let entries = try batchIndex(body, memory: memory, lengthBytes: 2, maximumLength: pageSize, "XBZRLE")
        guard entries.count <= XBZRLEPageEncoder.maximumBatch else {
            throw MigrationStreamError("an XBZRLE record of \(entries.count) pages (at most \(XBZRLEPageEncoder.maximumBatch))")
        }
        for (index, entry) in entries.enumerated() {
            let copy = scratch + index * pageSize
            copy.copyMemory(from: entry.pointer, byteCount: pageSize)
            let delta = try body.take(entry.length, "XBZRLE data")
            guard entry.length == 0 || cpage_xbzrle_decode(delta.baseAddress!.assumingMemoryBound(to: UInt8.self), entry.length,
                                                           copy.assumingMemoryBound(to: UInt8.self), pageSize) == 0 else {
                throw MigrationStreamError("an XBZRLE delta for the page at host offset \(entry.pointer - memory.hostBase) is malformed")
            }
        }
        placePages(entries, from: scratch, pageSize: pageSize, into: memory)
        return UInt64(entries.count)
    }
}

/// Compressed pages, decompressed by `decompress-threads` threads into copies, then written.
final class CompressedPageDecoder: PageDecoder, @unchecked Sendable {
    // Sendable: the pool's workers touch only their own entries and scratch pages.
    private let pageSize = Int(MigrationStreamFormat.pageSize)
    private let pool: WorkerPool
    private let decompressors: [PageDecompressor]
    private let scratch: UnsafeMutableRawPointer
    static let maximumBatch = 1024

    init(encoding: PageEncoding, threads: Int) {
        pool = WorkerPool(workers: threads, name: "decompress")
        decompressors = (0..<pool.workerCount).map { _ in PageCodecs.decompressor(encoding) }
        scratch = .allocate(byteCount: Self.maximumBatch * Int(MigrationStreamFormat.pageSize), alignment: 64)
    }

    deinit {
        pool.shutdown()
        scratch.deallocate()
    }

    func apply(_ body: ByteCursor, to memory: GuestMemory) throws(MigrationStreamError) -> UInt64 {
        let entries = try batchIndex(body, memory: memory, lengthBytes: 4, maximumLength: pageSize * 2, "compressed")
        guard entries.count <= Self.maximumBatch else {
            throw MigrationStreamError("a compressed record of \(entries.count) pages (at most \(Self.maximumBatch))")
        }
        var inputs: [UnsafeRawBufferPointer] = []
        for entry in entries { inputs.append(try body.take(entry.length, "compressed data")) }
        let results = UnsafeMutablePointer<Bool>.allocate(capacity: entries.count)
        defer { results.deallocate() }
        results.initialize(repeating: false, count: entries.count)
        let workers = pool.workerCount
        let job = DecompressionJob(inputs: inputs, scratch: scratch, pageSize: pageSize, results: results,
                                   decompressors: decompressors)
        pool.run { worker in job.run(worker: worker, of: workers) }
        for index in 0..<entries.count where !results[index] {
            throw MigrationStreamError("the compressed page at host offset \(entries[index].pointer - memory.hostBase) does not decompress to one page")
        }
        placePages(entries, from: scratch, pageSize: pageSize, into: memory)
        return UInt64(entries.count)
    }
}

final class DecompressionJob: @unchecked Sendable {
    // Sendable: worker w handles entries w, w + n, ... only.
    let inputs: [UnsafeRawBufferPointer]
    let scratch: UnsafeMutableRawPointer
    let pageSize: Int
    let results: UnsafeMutablePointer<Bool>
    let decompressors: [PageDecompressor]

    init(inputs: [UnsafeRawBufferPointer], scratch: UnsafeMutableRawPointer, pageSize: Int,
         results: UnsafeMutablePointer<Bool>, decompressors: [PageDecompressor]) {
        self.inputs = inputs
        self.scratch = scratch
        self.pageSize = pageSize
        self.results = results
        self.decompressors = decompressors
    }

    func run(worker: Int, of workers: Int) {
        var index = worker
        while index < inputs.count {
            results[index] = decompressors[worker].decompress(inputs[index], into: scratch + index * pageSize, length: pageSize)
            index += workers
        }
    }
}
