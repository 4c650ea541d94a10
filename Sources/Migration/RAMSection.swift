import CGuestMemory
import Foundation
import Machine

/// How the RAM section encodes pages, fixed at setup from the capabilities and parameters.
struct RAMEncodingSettings {
    var xbzrleCacheSize: UInt64?
    var compression: (method: CompressionMethod, level: Int, threads: Int)?
    /// Asked at each pass: a new XBZRLE cache size set during the migration.
    var cacheSizeNow: () -> UInt64 = { 0 }
    /// Encodings announced beyond those in use, so that SLO escalation may turn them on later.
    var mayAdd: [PageEncoding] = []
    /// Measure what the encoders would save (for SLO escalation).
    var probeSavings = false
}

/// Guest RAM as a live section: a first pass over all of RAM (never-written RAM as zero runs,
/// found with SEEK_HOLE without reading it), then passes over what the dirty log says the
/// guest wrote since, each page through the encoder chain (zero, XBZRLE, compressed, raw).
final class OutgoingRAMSection: PostcopyLiveSection {
    let name = "ram"
    let version: UInt32 = 1
    private let memory: GuestMemory
    private let tracker: DirtyPageTracker
    private let pageSize = MigrationStreamFormat.pageSize
    /// Pages per batch: each batch is encoded, then flushed as whole records.
    private let batchPages = min(XBZRLEPageEncoder.maximumBatch, CompressedPageEncoder.batchPages)
    private var bitmap: DirtyBitmap
    /// Pages a mid-pass dirty-rate sample took from the dirty log: they join the next pass.
    private var carried: DirtyBitmap?
    private var cursor = 0
    private var remainingPages = 0
    private let zero = ZeroPageEncoder()
    private var xbzrle: XBZRLEPageEncoder?
    private var compressed: CompressedPageEncoder?
    private let probe: PageSavingsProbe?
    private let raw = RawPageEncoder()
    /// The encoder that takes every page the others leave: raw, or the multifd channels'.
    private var last: PageEncoder
    private var chain: [PageEncoder]
    /// Every encoder this migration used, for the statistics (the chain shrinks in postcopy).
    private var allEncoders: [PageEncoder]
    private let settings: RAMEncodingSettings
    private var dirtyPagesRate: UInt64 = 0
    private var pagesDirtiedSinceRateSync = 0
    private var lastRateSync = WallClock.monotonicMilliseconds()
    private let log: (String) -> Void

    init(machine: Machine, settings: RAMEncodingSettings, log: @escaping (String) -> Void) throws(MigrationStreamError) {
        memory = machine.memory
        tracker = DirtyPageTracker(machine: machine)
        bitmap = DirtyBitmap(pageCount: tracker.pageCount)
        self.settings = settings
        self.log = log
        if let size = settings.xbzrleCacheSize {
            guard let cache = XBZRLECache(bytes: size) else {
                throw MigrationStreamError("cannot allocate the \(size >> 20) MiB XBZRLE cache")
            }
            xbzrle = XBZRLEPageEncoder(cache: cache)
        } else {
            xbzrle = nil
        }
        compressed = settings.compression.map { CompressedPageEncoder(method: $0.method, level: $0.level, threads: $0.threads) }
        last = raw
        chain = [zero] + [xbzrle as PageEncoder?, compressed].compactMap { $0 } + [raw]
        allEncoders = chain
        probe = settings.probeSavings ? PageSavingsProbe(memory: memory) : nil
    }

    var encodings: [PageEncoding] {
        let used = allEncoders.map(\.encoding)
        return used + settings.mayAdd.filter { !used.contains($0) }
    }

    /// Whether XBZRLE encodes re-sent pages now.
    var usesXBZRLE: Bool { xbzrle != nil }

    /// What the encoders would save on the pages dirtied lately (nil unless probing).
    var savings: PageSavings? { probe?.savings }

    /// SLO escalation: starts XBZRLE from here on (its cache fills as pages go).
    func enableXBZRLE(cacheSize: UInt64) -> Bool {
        guard xbzrle == nil, settings.mayAdd.contains(.xbzrle), let cache = XBZRLECache(bytes: cacheSize) else { return false }
        let encoder = XBZRLEPageEncoder(cache: cache)
        xbzrle = encoder
        // Its cache must hold what the destination got: the channels' pages are copied when offered.
        (last as? MultifdPageEncoder)?.copiesPages = true
        rebuildChain()
        return true
    }

    /// SLO escalation: compresses pages from here on.
    func enableCompression(method: CompressionMethod, level: Int, threads: Int) -> Bool {
        guard compressed == nil, settings.mayAdd.contains(method.encoding) else { return false }
        compressed = CompressedPageEncoder(method: method, level: level, threads: threads)
        rebuildChain()
        return true
    }

    /// The `multifd` capability: raw pages go to the channels instead of the main stream
    /// (before the first pass).
    func useMultifd(_ sender: MultifdSender) {
        last = MultifdPageEncoder(sender: sender, guestBase: UnsafeRawPointer(memory.hostBase), copiesPages: xbzrle != nil)
        rebuildChain()
    }

    private func rebuildChain() {
        chain = [zero] + [xbzrle as PageEncoder?, compressed].compactMap { $0 } + [last]
        for encoder in chain where !allEncoders.contains(where: { $0 === encoder }) { allEncoders.append(encoder) }
    }

    func setup(_ stream: SectionStream) throws(MigrationStreamError) {
        do { try tracker.start() } catch { throw MigrationStreamError("cannot start dirty page tracking: \(error)") }
        var position: UInt64 = 0
        for extent in memory.dataExtents(offset: 0, length: memory.size) {
            if extent.offset > position { zero.add(page: Int(position / pageSize), count: Int((extent.offset - position) / pageSize)) }
            let first = Int(extent.offset / pageSize)
            let last = Int((extent.offset + extent.length + pageSize - 1) / pageSize)
            for page in first..<min(last, bitmap.pageCount) { bitmap.set(page) }
            position = UInt64(last) * pageSize
        }
        if position < memory.size { zero.add(page: Int(position / pageSize), count: Int((memory.size - position) / pageSize)) }
        zero.flush(stream)
        remainingPages = bitmap.count
        cursor = 0
    }

    var passComplete: Bool { remainingPages == 0 }

    var pending: PendingBytes { PendingBytes(beforeSwitchover: UInt64(remainingPages) * pageSize) }

    func beginPass() throws(MigrationStreamError) -> UInt64 {
        let fresh: DirtyBitmap
        do { fresh = try tracker.collect() } catch { throw MigrationStreamError("dirty log sync failed: \(error)") }
        var merged = fresh
        if let carried {
            var page = 0
            while let next = carried.nextSet(from: page) { merged.set(next); page = next + 1 }
            self.carried = nil
        }
        let dirtied = merged.count
        probe?.measure(merged)
        pagesDirtiedSinceRateSync += dirtied
        if remainingPages > 0 {
            var page = cursor
            while let next = bitmap.nextSet(from: page) { merged.set(next); page = next + 1 }
        }
        bitmap = merged
        cursor = 0
        remainingPages = bitmap.count
        let now = WallClock.monotonicMilliseconds()
        if now > lastRateSync + 1000 {
            dirtyPagesRate = UInt64(pagesDirtiedSinceRateSync) * 1000 / (now - lastRateSync)
            pagesDirtiedSinceRateSync = 0
            lastRateSync = now
        }
        if let xbzrle {
            xbzrle.closePeriod()
            let wanted = settings.cacheSizeNow()
            if wanted != xbzrle.cache.sizeInBytes, wanted > 0, let fresh = XBZRLECache(bytes: wanted) {
                xbzrle.replaceCache(fresh)
                log("XBZRLE cache resized to \(wanted >> 20) MiB")
            }
        }
        return UInt64(dirtied) * pageSize
    }

    func iterate(_ stream: SectionStream, budget: UInt64) throws(MigrationStreamError) {
        var pages = Int(min(UInt64(batchPages), max(budget / pageSize, 1)))
        while pages > 0, let start = bitmap.nextSet(from: cursor) {
            let end = min(bitmap.nextClear(from: start), start + pages)
            for page in start..<end { encode(page, stream) }
            pages -= end - start
            cursor = end
            remainingPages -= end - start
        }
        if bitmap.nextSet(from: cursor) == nil { remainingPages = 0 }
        for encoder in chain.reversed() { encoder.flush(stream) } // raw first: it has a record open
        if let error = stream.error { throw error }
    }

    private func encode(_ page: Int, _ stream: SectionStream) {
        var candidate = PageCandidate(page: page, contents: UnsafeRawPointer(memory.hostBase + page * Int(pageSize)))
        for encoder in chain where encoder.offer(&candidate, stream) {
            for other in chain where other !== encoder { other.pageTaken(page, by: encoder.encoding) }
            return
        }
    }

    func complete(_ stream: SectionStream, _ context: SwitchoverContext) throws(MigrationStreamError) {
        _ = try beginPass()
        if Self.dropsOneDirtyPage { dropOneDirtyPage(stream) }
        while remainingPages > 0 {
            try iterate(stream, budget: .max)
        }
    }

    /// Syncs the dirty log in the middle of a pass to see how fast the guest dirties distinct
    /// pages right now (a whole pass only shows its working set once it saturates). The pages
    /// found are carried into the next pass, so nothing is lost. Returns the pages found.
    func sampleDirtyPages() throws(MigrationStreamError) -> Int {
        let fresh: DirtyBitmap
        do { fresh = try tracker.collect() } catch { throw MigrationStreamError("dirty log sync failed: \(error)") }
        var keep = carried ?? DirtyBitmap(pageCount: bitmap.pageCount)
        var page = 0
        while let next = fresh.nextSet(from: page) { keep.set(next); page = next + 1 }
        carried = keep
        probe?.measure(fresh) // a first sample early, so the pass end can judge the encoders
        return fresh.count
    }

    // MARK: postcopy

    func beginPostcopy() throws(MigrationStreamError) -> [ReturnPathMessage.PageRun] {
        _ = try beginPass()
        // XBZRLE needs the old page and the destination is about to drop it; compression
        // would work but its threads add latency to every request. (Every iterate ends
        // flushed, so nothing is pending in the encoders left out.)
        chain = [zero, raw]
        return runs(of: bitmap)
    }

    private func runs(of bitmap: DirtyBitmap) -> [ReturnPathMessage.PageRun] {
        bitmap.runs.flatMap { run in
            // A run's page count is a u32.
            stride(from: run.lowerBound, to: run.upperBound, by: Int(UInt32.max)).map { first in
                ReturnPathMessage.PageRun(offset: UInt64(first) * pageSize, pages: UInt32(min(run.upperBound - first, Int(UInt32.max))))
            }
        }
    }

    func sendRequested(_ stream: SectionStream, offset: UInt64, length: UInt64) throws(MigrationStreamError) {
        let first = Int(offset / pageSize)
        let last = min(Int((offset + length) / pageSize), bitmap.pageCount)
        for page in first..<last {
            // Bits behind the cursor stay set but were sent: only pages ahead of it still count.
            if page >= cursor && bitmap.isSet(page) {
                bitmap.clear(page)
                remainingPages -= 1
            }
            encode(page, stream)
        }
        for encoder in chain.reversed() { encoder.flush(stream) }
        if let error = stream.error { throw error }
    }

    func resume(lacking: [ReturnPathMessage.PageRun]) {
        var fresh = DirtyBitmap(pageCount: bitmap.pageCount)
        for run in lacking {
            let first = Int(run.offset / pageSize)
            for page in first..<min(first + Int(run.pages), fresh.pageCount) { fresh.set(page) }
        }
        bitmap = fresh
        cursor = 0
        remainingPages = bitmap.count
    }

    func report(into statistics: inout MigrationStatistics) {
        statistics.normal = 0
        statistics.duplicate = 0
        for encoder in allEncoders { encoder.report(into: &statistics) }
        statistics.remaining = UInt64(remainingPages) * pageSize
        statistics.dirtyPagesRate = dirtyPagesRate
    }

    func cleanup() { try? tracker.stop() }

    // MARK: test hook

    /// With TERN_TEST_DROP_DIRTY_PAGE=1 the final copy leaves out one dirty page holding data,
    /// so a test can prove that the memory-digest check catches a lost page.
    static let dropsOneDirtyPage = ProcessInfo.processInfo.environment["TERN_TEST_DROP_DIRTY_PAGE"] == "1"

    private func isZero(_ page: Int) -> Bool {
        cguest_is_zero(memory.hostBase + page * Int(pageSize), Int(pageSize)) != 0
    }

    private func dropOneDirtyPage(_ stream: SectionStream) {
        var page = cursor
        while let candidate = bitmap.nextSet(from: page) {
            if !isZero(candidate) {
                bitmap.clear(candidate)
                remainingPages -= 1
                log("TEST HOOK: dropped dirty page at offset 0x\(String(UInt64(candidate) * pageSize, radix: 16))")
                return
            }
            page = candidate + 1
        }
        // Nothing was dirty at the end: lose the last update of a page with data instead, by
        // sending it as zero, so the hook always leaves the destination different.
        for extent in memory.dataExtents(offset: 0, length: memory.size) {
            var offset = extent.offset
            while offset < extent.offset + extent.length {
                let candidate = Int(offset / pageSize)
                if !isZero(candidate) {
                    zero.add(page: candidate, count: 1)
                    for encoder in chain { encoder.pageTaken(candidate, by: .zero) }
                    zero.flush(stream)
                    log("TEST HOOK: dropped dirty page at offset 0x\(String(offset, radix: 16)) (sent as zero)")
                    return
                }
                offset += pageSize
            }
        }
    }
}

/// The destination's RAM section: each record's first byte names its page encoding, and the
/// decoder for it applies the rest.
final class IncomingRAMSection: IncomingLiveSection {
    private let memory: GuestMemory
    private var decoders: [PageEncoding: PageDecoder] = [:]
    private(set) var pagesLoaded: UInt64 = 0
    private(set) var zeroPagesLoaded: UInt64 = 0

    /// `encodings` are those the source announced; a record in any other is refused.
    init(memory: GuestMemory, encodings: [PageEncoding], decompressThreads: Int) {
        self.memory = memory
        for encoding in encodings {
            switch encoding {
            case .zero: decoders[.zero] = ZeroPageDecoder()
            case .raw: decoders[.raw] = RawPageDecoder()
            case .xbzrle: decoders[.xbzrle] = XBZRLEPageDecoder()
            case .zlib, .zstd: decoders[encoding] = CompressedPageDecoder(encoding: encoding, threads: decompressThreads)
            }
        }
    }

    /// Set once postcopy has begun: pages then go in through userfaultfd.
    var postcopy: PostcopyDestination?

    /// A raw run's header (encoding, offset, count): the reader offers it before the data.
    static let directPrefix = 13
    /// Pages of the run the reader put straight into guest memory, for the `load` that follows.
    private var placedDirectly: UInt64?

    /// Where a raw run's page data may be read straight into guest memory: a whole checked run
    /// of pages already present (so the read faults in nothing fresh, which `place` does
    /// better), before postcopy (whose pages go in through userfaultfd). Nil: the usual path.
    func directTarget(prefix: UnsafeRawBufferPointer, bodyLength: Int) -> UnsafeMutableRawPointer? {
        guard postcopy == nil, decoders[.raw] != nil, let run = Self.rawRun(prefix, bodyLength: bodyLength, in: memory),
              memory.isPlaced(offset: run.offset, length: run.count * MigrationStreamFormat.pageSize) else { return nil }
        placedDirectly = run.count
        return run.pointer
    }

    /// A raw run's prefix checked as the raw decoder checks it (page-aligned, inside guest RAM,
    /// the body exactly the pages): where its pages go and how many, or nil. Also the multifd
    /// channels' check.
    static func rawRun(_ prefix: UnsafeRawBufferPointer, bodyLength: Int, in memory: GuestMemory)
        -> (pointer: UnsafeMutableRawPointer, offset: UInt64, count: UInt64)? {
        let header = ByteCursor(prefix)
        guard prefix.count == directPrefix,
              (try? header.read(UInt8.self, "page encoding")) == PageEncoding.raw.rawValue,
              let offset = try? header.read(UInt64.self, "page run offset"),
              let count = (try? header.read(UInt32.self, "page run count")).map(UInt64.init),
              let pointer = try? guestPages(memory, offset: offset, count: count, "page"),
              UInt64(bodyLength) == UInt64(directPrefix) + count * MigrationStreamFormat.pageSize else { return nil }
        return (pointer, offset, count)
    }

    func load(_ body: ByteCursor) throws(MigrationStreamError) {
        if let placed = placedDirectly {
            placedDirectly = nil
            guard body.remaining == Self.directPrefix else {
                throw MigrationStreamError("a RAM record read into guest memory came back with \(body.remaining) body bytes")
            }
            pagesLoaded += placed
            return
        }
        let raw = try body.read(UInt8.self, "page encoding")
        guard let encoding = PageEncoding(rawValue: raw) else {
            throw MigrationStreamError("a RAM record in unknown page encoding 0x\(String(raw, radix: 16))")
        }
        if let postcopy {
            try loadPostcopy(encoding, body, into: postcopy)
            return
        }
        guard let decoder = decoders[encoding] else {
            throw MigrationStreamError("a RAM record in page encoding '\(encoding.name)', which the source did not announce")
        }
        let pages = try decoder.apply(body, to: memory)
        if encoding == .zero { zeroPagesLoaded += pages } else { pagesLoaded += pages }
    }

    /// A zero or raw run after the switchover, checked as in pre-copy, then installed whole.
    private func loadPostcopy(_ encoding: PageEncoding, _ body: ByteCursor,
                              into postcopy: PostcopyDestination) throws(MigrationStreamError) {
        guard encoding == .zero || encoding == .raw else {
            throw MigrationStreamError("a RAM record in page encoding '\(encoding.name)' during postcopy (only zero and raw may follow the switchover)")
        }
        let offset = try body.read(UInt64.self, "page run offset")
        let count = UInt64(try body.read(UInt32.self, "page run count"))
        _ = try guestPages(memory, offset: offset, count: count, encoding == .zero ? "zero run" : "page")
        if encoding == .zero {
            try body.finish("a zero run")
            try postcopy.install(offset: offset, count: count, data: nil)
            zeroPagesLoaded += count
        } else {
            let data = try body.take(Int(count * MigrationStreamFormat.pageSize), "page data")
            try body.finish("a page run")
            try postcopy.install(offset: offset, count: count, data: data.baseAddress!)
            pagesLoaded += count
        }
    }
}
