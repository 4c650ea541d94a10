/// With the `multifd` capability, the raw encoder's place at the end of the RAM section's chain:
/// pages that no other encoder took go in batches to the multifd channels instead of the main
/// stream. The channel's thread copies them from guest memory, so the migration thread only
/// scans; a page the guest writes before its copy is taken is sent as it is then, and is dirty
/// again for the next pass anyway. With XBZRLE on, whose cache must hold exactly what the
/// destination got, the copy is taken here when the page is offered, as the raw encoder does.
final class MultifdPageEncoder: PageEncoder {
    let encoding = PageEncoding.raw
    private let sender: MultifdSender
    private var batch = MultifdBatch()
    private(set) var pages: UInt64 = 0
    private let pageSize = Int(MigrationStreamFormat.pageSize)
    private let guestBase: UnsafeRawPointer
    /// Whether pages are copied when offered (XBZRLE is on). Set between iterations, when no
    /// batch is open (each iteration ends with a flush).
    var copiesPages: Bool {
        didSet {
            send()
            batch = fresh()
        }
    }

    init(sender: MultifdSender, guestBase: UnsafeRawPointer, copiesPages: Bool) {
        self.sender = sender
        self.guestBase = guestBase
        self.copiesPages = copiesPages
        batch = fresh()
    }

    private func fresh() -> MultifdBatch {
        var batch = MultifdBatch()
        if copiesPages {
            batch.data.reserveCapacity(MultifdSender.batchPages * pageSize)
        } else {
            batch.guestBase = guestBase
        }
        return batch
    }

    func offer(_ candidate: inout PageCandidate, _ stream: SectionStream) -> Bool {
        if let last = batch.runs.last, last.page + last.count == candidate.page, last.count < RawPageEncoder.maximumRun {
            batch.runs[batch.runs.count - 1].count += 1
        } else {
            batch.runs.append((candidate.page, 1))
        }
        if copiesPages { batch.data.append(contentsOf: UnsafeRawBufferPointer(start: candidate.contents, count: pageSize)) }
        pages += 1
        batched += 1
        if batched >= MultifdSender.batchPages { send() }
        return true
    }

    /// The end of every RAM iteration: what is batched goes, so a pass's pages are all with the
    /// channels before its MULTIFD_SYNC.
    func flush(_ stream: SectionStream) { send() }

    private var batched = 0

    private func send() {
        guard !batch.runs.isEmpty else { return }
        sender.send(batch)
        batch = fresh()
        batched = 0
    }

    func report(into statistics: inout MigrationStatistics) {
        statistics.normal += pages
        statistics.multifdBytes = sender.bytesQueued
    }
}
