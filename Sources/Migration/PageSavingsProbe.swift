import CPageCodec
import Machine

/// What the encoders would save on this guest's dirty pages, measured on a small sample at
/// each dirty sync, so that SLO escalation turns on only the encoders that pay: XBZRLE when
/// pages dirtied again differ from their last copy in few bytes, compression when pages
/// compress.
struct PageSavings: Equatable, Sendable {
    /// Mean XBZRLE delta over a page, 0…1 (1: no saving); nil until a sampled page is dirtied again.
    var xbzrleRatio: Double?
    /// Compressed over raw size, 0…1; nil before the first sample.
    var compressionRatio: Double?
}

/// Keeps copies of a few dirty pages and, at the next sync, encodes those dirtied again
/// against their copies; compresses the newest sample. Cheap: 32 pages per pass.
final class PageSavingsProbe {
    private let memory: GuestMemory
    private let pageSize = Int(MigrationStreamFormat.pageSize)
    private let sampleSize = 32
    private let copies: UnsafeMutableRawPointer
    private let scratch: UnsafeMutableRawPointer
    private var sampled: [Int] = []
    private let compressor = PageCodecs.compressor(.zlib, level: 1)
    private(set) var savings = PageSavings()

    init(memory: GuestMemory) {
        self.memory = memory
        copies = .allocate(byteCount: sampleSize * Int(MigrationStreamFormat.pageSize), alignment: 64)
        scratch = .allocate(byteCount: 2 * Int(MigrationStreamFormat.pageSize), alignment: 64)
    }

    deinit {
        copies.deallocate()
        scratch.deallocate()
    }

    /// Called with the dirty set a sync found.
    func measure(_ dirty: DirtyBitmap) {
        var deltas = 0
        var measured = 0
        for (index, page) in sampled.enumerated() where dirty.isSet(page) {
            let current = memory.hostBase + page * pageSize
            let old = copies + index * pageSize
            let length = cpage_xbzrle_encode(old.assumingMemoryBound(to: UInt8.self), current.assumingMemoryBound(to: UInt8.self),
                                             pageSize, scratch.assumingMemoryBound(to: UInt8.self), pageSize)
            deltas += length < 0 ? pageSize : length
            measured += 1
        }
        if measured > 0 { savings.xbzrleRatio = Double(deltas) / Double(measured * pageSize) }
        // A fresh sample, spread over the dirty set.
        let count = dirty.count
        sampled.removeAll(keepingCapacity: true)
        guard count > 0 else { return }
        let stride = max(count / sampleSize, 1)
        var seen = 0
        var page = 0
        var compressed = 0
        while sampled.count < sampleSize, let next = dirty.nextSet(from: page) {
            if seen % stride == 0 {
                let source = memory.hostBase + next * pageSize
                (copies + sampled.count * pageSize).copyMemory(from: source, byteCount: pageSize)
                compressed += compressor.compress(source, length: pageSize, into: scratch, capacity: 2 * pageSize) ?? pageSize
                sampled.append(next)
            }
            seen += 1
            page = next + 1
        }
        savings.compressionRatio = Double(compressed) / Double(sampled.count * pageSize)
    }
}
