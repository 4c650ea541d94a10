/// With the `multifd` capability, the raw encoder's place at the end of the RAM section's chain:
/// pages that no other encoder took are copied into batches for the multifd channels instead of
/// the main stream. The copy is taken when the page is offered, as the raw encoder's is, so a
/// page the guest writes afterwards is simply dirty again for the next pass.
final class MultifdPageEncoder: PageEncoder {
    let encoding = PageEncoding.raw
    private let sender: MultifdSender
    private var batch = MultifdBatch()
    private(set) var pages: UInt64 = 0
    private let pageSize = Int(MigrationStreamFormat.pageSize)

    init(sender: MultifdSender) {
        self.sender = sender
        batch.data.reserveCapacity(MultifdSender.batchPages * pageSize)
    }

    func offer(_ candidate: inout PageCandidate, _ stream: SectionStream) -> Bool {
        if let last = batch.runs.last, last.page + last.count == candidate.page, last.count < RawPageEncoder.maximumRun {
            batch.runs[batch.runs.count - 1].count += 1
        } else {
            batch.runs.append((candidate.page, 1))
        }
        batch.data.append(contentsOf: UnsafeRawBufferPointer(start: candidate.contents, count: pageSize))
        pages += 1
        if batch.data.count >= MultifdSender.batchPages * pageSize { send() }
        return true
    }

    /// The end of every RAM iteration: what is batched goes, so a pass's pages are all with the
    /// channels before its MULTIFD_SYNC.
    func flush(_ stream: SectionStream) { send() }

    private func send() {
        guard !batch.runs.isEmpty else { return }
        sender.send(batch)
        batch = MultifdBatch()
        batch.data.reserveCapacity(MultifdSender.batchPages * pageSize)
    }

    func report(into statistics: inout MigrationStatistics) {
        statistics.normal += pages
        statistics.multifdBytes = sender.bytesQueued
    }
}
