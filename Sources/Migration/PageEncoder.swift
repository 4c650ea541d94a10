import CGuestMemory

/// A dirty page on its way to the wire. `contents` starts as the page in guest memory; an
/// encoder that needs a stable copy (XBZRLE snapshots the page into its cache) replaces it,
/// so the encoders after it send exactly the bytes it recorded.
struct PageCandidate {
    let page: Int
    var contents: UnsafeRawPointer
    var offset: UInt64 { UInt64(page) * MigrationStreamFormat.pageSize }
}

/// One way of putting pages on the wire, chained by the RAM section in order of preference:
/// zero, XBZRLE, compressed, raw. Each page goes to the first encoder that takes it.
///
/// Encoders hold what they take until `flush`, which writes it as records; only the raw
/// encoder, always last, writes while pages are offered (its record is closed first by its
/// own flush). Every encoder holds at least one RAM-section batch, so none writes mid-batch. All pages offered between two flushes are distinct, so the order of the
/// records within one flush does not matter to the destination.
protocol PageEncoder: AnyObject {
    var encoding: PageEncoding { get }
    /// Takes the page and returns true, or returns false to pass it on.
    func offer(_ candidate: inout PageCandidate, _ stream: SectionStream) -> Bool
    /// Another encoder took the page; a cache of what the destination holds must follow.
    func pageTaken(_ page: Int, by encoding: PageEncoding)
    /// Writes everything taken since the last flush.
    func flush(_ stream: SectionStream)
    func report(into statistics: inout MigrationStatistics)
}

extension PageEncoder {
    func pageTaken(_ page: Int, by encoding: PageEncoding) {}
    func flush(_ stream: SectionStream) {}
    func report(into statistics: inout MigrationStatistics) {}
}

/// Pages that read as zero go as a run header only (QEMU's `duplicate`).
final class ZeroPageEncoder: PageEncoder {
    let encoding = PageEncoding.zero
    private var runs: [(start: Int, count: Int)] = []
    private(set) var pages: UInt64 = 0

    func offer(_ candidate: inout PageCandidate, _ stream: SectionStream) -> Bool {
        guard cguest_is_zero(candidate.contents, Int(MigrationStreamFormat.pageSize)) != 0 else { return false }
        add(page: candidate.page, count: 1)
        return true
    }

    /// Adds a run of pages known to be zero (never-written RAM found by SEEK_HOLE).
    func add(page: Int, count: Int) {
        if let last = runs.last, last.start + last.count == page, last.count + count <= Self.maximumRun {
            runs[runs.count - 1].count += count
        } else {
            var start = page
            var left = count
            while left > 0 {
                let chunk = min(left, Self.maximumRun)
                runs.append((start, chunk))
                start += chunk
                left -= chunk
            }
        }
        pages += UInt64(count)
    }

    static let maximumRun = Int(MigrationStreamFormat.maximumPagesPerRecord)

    func flush(_ stream: SectionStream) {
        for run in runs {
            stream.record { writer in
                writer.append(PageEncoding.zero.rawValue)
                writer.append(UInt64(run.start) * MigrationStreamFormat.pageSize)
                writer.append(UInt32(run.count))
            }
        }
        runs.removeAll(keepingCapacity: true)
    }

    func report(into statistics: inout MigrationStatistics) { statistics.duplicate += pages }
}

/// Pages with their contents, contiguous pages in one record of up to 64 pages, copied into
/// the stream buffer at once so the record's checksum covers what is sent.
final class RawPageEncoder: PageEncoder {
    let encoding = PageEncoding.raw
    static let maximumRun = 64
    private var open: (start: Int, count: Int)?
    private(set) var pages: UInt64 = 0

    func offer(_ candidate: inout PageCandidate, _ stream: SectionStream) -> Bool {
        if let run = open, run.start + run.count == candidate.page, run.count < Self.maximumRun {
            open = (run.start, run.count + 1)
        } else {
            close(stream)
            stream.begin()
            stream.writer.append(PageEncoding.raw.rawValue)
            stream.writer.append(candidate.offset)
            stream.writer.append(UInt32(0)) // the count, patched when the run closes
            open = (candidate.page, 1)
        }
        stream.writer.append(memory: candidate.contents, count: Int(MigrationStreamFormat.pageSize))
        pages += 1
        return true
    }

    private func close(_ stream: SectionStream) {
        guard let run = open else { return }
        open = nil
        stream.writer.patchRecordBody(at: 9, UInt32(run.count))
        stream.end()
    }

    func flush(_ stream: SectionStream) { close(stream) }

    func report(into statistics: inout MigrationStatistics) { statistics.normal += pages }
}
