/// The `compress` capability: pages compressed one by one (zlib as QEMU 2015, or zstd) by a
/// pool of `compress-threads` threads, a batch at a time. A page that does not shrink below
/// 15/16 of its size goes on to the raw encoder. tern's source waits for its threads rather
/// than sending pages raw when they are busy, so `busy` stays 0.
///
/// Record body: u8 encoding, u16 count, count × (u64 offset, u32 length), then the data.
final class CompressedPageEncoder: PageEncoder {
    let encoding: PageEncoding
    private let pageSize = Int(MigrationStreamFormat.pageSize)
    private let pool: WorkerPool
    private let compressors: [PageCompressor]
    static let batchPages = 256
    private let input: UnsafeMutableRawPointer
    private let output: UnsafeMutableRawPointer
    private let outputStride: Int
    private var pages: [Int] = []
    private var lengths: [Int]
    private let worthIt = Int(MigrationStreamFormat.pageSize) * 15 / 16
    private let raw = RawPageEncoder()

    private(set) var compressedPages: UInt64 = 0
    private(set) var compressedBytes: UInt64 = 0

    init(method: CompressionMethod, level: Int, threads: Int) {
        encoding = method.encoding
        pool = WorkerPool(workers: threads, name: "compress")
        compressors = (0..<pool.workerCount).map { _ in PageCodecs.compressor(method.encoding, level: level) }
        outputStride = pageSize + 512 // zlib's and zstd's bound for one page stays under this
        input = .allocate(byteCount: Self.batchPages * pageSize, alignment: 64)
        output = .allocate(byteCount: Self.batchPages * outputStride, alignment: 64)
        lengths = [Int](repeating: 0, count: Self.batchPages)
    }

    deinit {
        pool.shutdown()
        input.deallocate()
        output.deallocate()
    }

    func offer(_ candidate: inout PageCandidate, _ stream: SectionStream) -> Bool {
        // Copied now: what is compressed later must be what the encoders before saw. The RAM
        // section's batches are never larger than this encoder's.
        precondition(pages.count < Self.batchPages, "the RAM section flushes every batch")
        (input + pages.count * pageSize).copyMemory(from: candidate.contents, byteCount: pageSize)
        pages.append(candidate.page)
        return true
    }

    func flush(_ stream: SectionStream) {
        guard !pages.isEmpty else { return }
        let count = pages.count
        let workers = pool.workerCount
        let job = CompressionJob(input: input, output: output, stride: outputStride, pageSize: pageSize, count: count,
                                 compressors: compressors)
        pool.run { worker in job.run(worker: worker, of: workers) }
        for index in 0..<count { lengths[index] = job.lengths[index] }
        var kept: [Int] = []
        for index in 0..<count {
            if lengths[index] > 0 && lengths[index] <= worthIt { kept.append(index) }
        }
        if !kept.isEmpty {
            stream.record { writer in
                writer.append(encoding.rawValue)
                writer.append(UInt16(kept.count))
                for index in kept {
                    writer.append(UInt64(pages[index]) * MigrationStreamFormat.pageSize)
                    writer.append(UInt32(lengths[index]))
                }
                for index in kept { writer.append(memory: output + index * outputStride, count: lengths[index]) }
            }
            compressedPages += UInt64(kept.count)
            for index in kept { compressedBytes += UInt64(lengths[index]) }
        }
        if kept.count < count {
            // Incompressible pages go raw, from the same copies.
            var keptIndex = 0
            for index in 0..<count {
                if keptIndex < kept.count && kept[keptIndex] == index { keptIndex += 1; continue }
                var candidate = PageCandidate(page: pages[index], contents: UnsafeRawPointer(input + index * pageSize))
                _ = raw.offer(&candidate, stream)
            }
            raw.flush(stream)
        }
        pages.removeAll(keepingCapacity: true)
    }

    func report(into statistics: inout MigrationStatistics) {
        statistics.normal += raw.pages
        statistics.compression = CompressionStatistics(
            pages: compressedPages, busy: 0, busyRate: 0, compressedSize: compressedBytes,
            compressionRate: compressedBytes > 0 ? Double(compressedPages * MigrationStreamFormat.pageSize) / Double(compressedBytes) : 0)
    }
}

/// One batch for the pool: worker `w` compresses pages w, w + n, w + 2n, ...
final class CompressionJob: @unchecked Sendable {
    // Sendable: each worker touches only its own pages' input, output and length slots.
    let input: UnsafeMutableRawPointer
    let output: UnsafeMutableRawPointer
    let stride: Int
    let pageSize: Int
    let count: Int
    let compressors: [PageCompressor]
    let lengths: UnsafeMutablePointer<Int>

    init(input: UnsafeMutableRawPointer, output: UnsafeMutableRawPointer, stride: Int, pageSize: Int, count: Int,
         compressors: [PageCompressor]) {
        self.input = input
        self.output = output
        self.stride = stride
        self.pageSize = pageSize
        self.count = count
        self.compressors = compressors
        lengths = .allocate(capacity: count)
        lengths.initialize(repeating: 0, count: count)
    }

    deinit { lengths.deallocate() }

    func run(worker: Int, of workers: Int) {
        var index = worker
        while index < count {
            lengths[index] = compressors[worker].compress(input + index * pageSize, length: pageSize,
                                                          into: output + index * stride, capacity: stride) ?? 0
            index += workers
        }
    }
}
