import CPageCodec

/// XBZRLE, as QEMU does it: a dirty page that the cache holds is sent as the delta between the
/// cached copy (what the destination holds) and its new contents, when that delta is small;
/// on a miss, or when the delta would not pay, the page goes to the next encoder, sent from
/// its fresh cache slot so the cache keeps matching the destination.
///
/// Record body: u8 encoding, u16 count, count × (u64 offset, u16 length), then the deltas.
final class XBZRLEPageEncoder: PageEncoder {
    let encoding = PageEncoding.xbzrle
    private let pageSize = Int(MigrationStreamFormat.pageSize)
    /// A delta longer than this goes as a whole page instead (QEMU sends deltas up to a page;
    /// past three quarters of one the saving does not pay for the decode).
    let maximumDelta = Int(MigrationStreamFormat.pageSize) * 3 / 4
    private(set) var cache: XBZRLECache
    private var snapshot: UnsafeMutableRawPointer
    private var deltaBuffer: UnsafeMutableRawPointer
    private var entries: [(offset: UInt64, length: UInt16)] = []
    private var payload: [UInt8] = []
    static let maximumBatch = 256

    private(set) var pages: UInt64 = 0
    private(set) var bytes: UInt64 = 0
    private(set) var cacheMisses: UInt64 = 0
    private(set) var overflows: UInt64 = 0
    private var lookups: UInt64 = 0
    private var lookupsAtPeriod: UInt64 = 0
    private var missesAtPeriod: UInt64 = 0
    private(set) var missRate: Double = 0

    init(cache: XBZRLECache) {
        self.cache = cache
        snapshot = .allocate(byteCount: pageSize, alignment: 64)
        deltaBuffer = .allocate(byteCount: pageSize, alignment: 64)
    }

    deinit {
        snapshot.deallocate()
        deltaBuffer.deallocate()
    }

    /// Replaces the cache (`migrate-set-cache-size` during a migration): every page misses once.
    func replaceCache(_ fresh: XBZRLECache) { cache = fresh }

    func offer(_ candidate: inout PageCandidate, _ stream: SectionStream) -> Bool {
        lookups += 1
        // Snapshot first: the guest may write the page while it is being encoded, and the
        // cache must hold exactly what goes out.
        snapshot.copyMemory(from: candidate.contents, byteCount: pageSize)
        guard let cached = cache.lookup(candidate.page) else {
            cacheMisses += 1
            let slot = cache.claim(candidate.page)
            slot.copyMemory(from: snapshot, byteCount: pageSize)
            candidate.contents = UnsafeRawPointer(slot)
            return false
        }
        let length = cpage_xbzrle_encode(cached.assumingMemoryBound(to: UInt8.self), snapshot.assumingMemoryBound(to: UInt8.self),
                                         pageSize, deltaBuffer.assumingMemoryBound(to: UInt8.self), maximumDelta)
        cached.copyMemory(from: snapshot, byteCount: pageSize)
        if length < 0 {
            overflows += 1
            candidate.contents = UnsafeRawPointer(cached)
            return false
        }
        // A page dirtied but rewritten with the same bytes still goes, as an empty delta, so
        // the stream accounts for every dirty page.
        entries.append((candidate.offset, UInt16(length)))
        payload.append(contentsOf: UnsafeRawBufferPointer(start: deltaBuffer, count: length))
        pages += 1
        bytes += UInt64(length)
        precondition(entries.count <= Self.maximumBatch, "the RAM section flushes every batch")
        return true
    }

    func pageTaken(_ page: Int, by encoding: PageEncoding) {
        if encoding == .zero { cache.invalidate(page) }
    }

    func flush(_ stream: SectionStream) {
        guard !entries.isEmpty else { return }
        stream.record { writer in
            writer.append(PageEncoding.xbzrle.rawValue)
            writer.append(UInt16(entries.count))
            for entry in entries {
                writer.append(entry.offset)
                writer.append(entry.length)
            }
            writer.append(bytes: payload)
        }
        entries.removeAll(keepingCapacity: true)
        payload.removeAll(keepingCapacity: true)
    }

    /// Called at each pass end: the miss rate over the period since the last one.
    func closePeriod() {
        let periodLookups = lookups - lookupsAtPeriod
        missRate = periodLookups > 0 ? Double(cacheMisses - missesAtPeriod) / Double(periodLookups) : 0
        lookupsAtPeriod = lookups
        missesAtPeriod = cacheMisses
    }

    func report(into statistics: inout MigrationStatistics) {
        statistics.xbzrle = XBZRLEStatistics(cacheSize: cache.sizeInBytes, bytes: bytes, pages: pages,
                                             cacheMiss: cacheMisses, cacheMissRate: missRate, overflow: overflows)
    }
}
