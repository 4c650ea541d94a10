import Foundation
import Synchronization

/// The first bytes of a multifd channel's connection: they tell the destination's listener a
/// channel from the main stream (which starts with "TERNMIGR") and which channel it is.
/// `"TERNMFDC"`, u32 version (1), u64 session (the main stream's MULTIFD_SETUP names it), u32
/// channel index. Then version 2 records: SECTION_DATA raw runs for the RAM section and
/// MULTIFD_SYNC (docs/migration-stream.md).
enum MultifdChannelHeader {
    static let magic = Array("TERNMFDC".utf8)
    static let version: UInt32 = 1
    static let size = 8 + 4 + 8 + 4
}

/// Runs of guest pages on their way to a channel: either copied out already (`data`, in the
/// order of `runs`), or to be copied by the channel's thread straight from guest memory
/// (`guestBase`), which takes the copy off the migration thread.
struct MultifdBatch: @unchecked Sendable {
    // Sendable: `guestBase` is guest RAM's mapping, which outlives the migration.
    /// (first page, page count) for each run.
    var runs: [(page: Int, count: Int)] = []
    var data: [UInt8] = []
    var guestBase: UnsafeRawPointer?
    var pages: Int { runs.reduce(0) { $0 + $1.count } }
}

/// The source's multifd channels: one connection and one thread per channel. The RAM section's
/// encoder hands it batches of raw pages (round robin over the channels, each queue bounded, so
/// the migration thread waits for a slow channel instead of buffering without end), and at each
/// pass end `sync` puts a MULTIFD_SYNC after every channel's pages of that pass; the main
/// stream carries the same number, and the destination holds every channel and the main stream
/// at that mark until all have reached it, so no page of an older pass lands after a newer one.
final class MultifdSender: @unchecked Sendable {
    // Sendable: the queues are mutex-guarded; each writer is used by its channel thread only.
    private enum Item {
        case batch(MultifdBatch)
        case sync(UInt32)
        case finish
    }

    private final class Channel: @unchecked Sendable {
        // Sendable: `queue` is only touched under `ready`; the writer by the channel's thread.
        let index: Int
        let connection: MigrationConnection
        let writer: MigrationStreamWriter
        var queue: [Item] = []
        let ready = NSCondition()
        init(index: Int, connection: MigrationConnection, checksums: Bool) {
            self.index = index
            self.connection = connection
            writer = MigrationStreamWriter(io: connection.io)
            writer.checksums = checksums
        }
    }

    private let channels: [Channel]
    private let ramSection: UInt16
    private var next = 0
    private let failure = Mutex<String?>(nil)
    private let queued = Atomic<UInt64>(0)
    private let done = NSCondition()
    private var running: Int
    /// Batches a channel holds before the migration thread waits for it.
    static let queueDepth = 4
    /// Pages in one batch (512 KiB).
    static let batchPages = 128
    /// With TERN_TEST_MULTIFD_DELAY_US=N each channel waits N µs before it takes a batch's
    /// pages, widening the time between a page's offer and its copy, so a test can show that
    /// XBZRLE's copy-when-offered rule holds (without it the cache and the destination differ).
    static let testDelay = UInt32(ProcessInfo.processInfo.environment["TERN_TEST_MULTIFD_DELAY_US"] ?? "") ?? 0

    /// Connects `count` channels to `uri` (tcp or unix) and sends each its header.
    init(uri: MigrationURI, count: Int, session: UInt64, ramSection: UInt16, checksums: Bool,
         tls: TLSClientSettings? = nil) throws(MigrationStreamError) {
        var channels: [Channel] = []
        for index in 0..<count {
            let connection: MigrationConnection
            do {
                connection = try MigrationConnection.connect(uri, tls: tls, descriptorNamed: { _ in nil })
            } catch {
                channels.forEach { _ = $0.connection.close() }
                throw MigrationStreamError("multifd channel \(index): \(error.message)")
            }
            let channel = Channel(index: index, connection: connection, checksums: checksums)
            channel.writer.appendHeader(MultifdChannelHeader.magic)
            channel.writer.append(MultifdChannelHeader.version)
            channel.writer.append(session)
            channel.writer.append(UInt32(index))
            channel.writer.flush()
            if let error = channel.writer.error {
                channels.forEach { _ = $0.connection.close() }
                _ = connection.close()
                throw MigrationStreamError("multifd channel \(index): \(error.message)")
            }
            channels.append(channel)
        }
        self.channels = channels
        self.ramSection = ramSection
        running = count
        for channel in channels {
            let thread = Thread { [self] in run(channel) }
            thread.name = "multifd-send-\(channel.index)"
            thread.start()
        }
    }

    /// The first channel failure, if any.
    var error: String? { failure.withLock { $0 } }

    /// Bytes handed to the channels so far (headers and checksums aside): what the rate limit
    /// and `ram.transferred` count besides the main stream.
    var bytesQueued: UInt64 { queued.load(ordering: .relaxed) }

    /// Hands a batch to the next channel, waiting while its queue is full.
    func send(_ batch: MultifdBatch) {
        guard !batch.runs.isEmpty else { return }
        let channel = channels[next]
        next = (next + 1) % channels.count
        queued.add(UInt64(batch.pages * Int(MigrationStreamFormat.pageSize) + 13 * batch.runs.count), ordering: .relaxed)
        enqueue(.batch(batch), on: channel, bounded: true)
    }

    /// Marks the end of a pass on every channel.
    func sync(_ number: UInt32) {
        for channel in channels { enqueue(.sync(number), on: channel, bounded: false) }
    }

    /// Sends what is queued, closes every channel and waits for the threads; returns the first
    /// failure.
    func finish() -> String? {
        for channel in channels { enqueue(.finish, on: channel, bounded: false) }
        done.lock()
        while running > 0 { done.wait() }
        done.unlock()
        // End of file after the last MULTIFD_SYNC tells each receiving thread it is done.
        for channel in channels { _ = channel.connection.close() }
        return error
    }

    /// Cuts every channel (a failed or cancelled migration): blocked writes return at once.
    func abort() {
        for channel in channels {
            channel.connection.shutdownIO()
            channel.ready.lock()
            channel.queue = [.finish]
            channel.ready.broadcast()
            channel.ready.unlock()
        }
        done.lock()
        while running > 0 { done.wait() }
        done.unlock()
        for channel in channels { _ = channel.connection.close() }
    }

    private func enqueue(_ item: Item, on channel: Channel, bounded: Bool) {
        channel.ready.lock()
        while bounded && channel.queue.count >= Self.queueDepth && error == nil {
            channel.ready.wait()
        }
        channel.queue.append(item)
        channel.ready.broadcast()
        channel.ready.unlock()
    }

    private func take(_ channel: Channel) -> Item {
        channel.ready.lock()
        defer { channel.ready.unlock() }
        while channel.queue.isEmpty { channel.ready.wait() }
        channel.ready.broadcast() // room for a producer waiting on a full queue
        return channel.queue.removeFirst()
    }

    private func run(_ channel: Channel) {
        defer {
            done.lock()
            running -= 1
            done.broadcast()
            done.unlock()
        }
        let writer = channel.writer
        loop: while true {
            switch take(channel) {
            case let .batch(batch):
                guard error == nil else { continue }
                if Self.testDelay > 0 { usleep(Self.testDelay) }
                batch.data.withUnsafeBytes { bytes in
                    var offset = 0
                    let pageSize = Int(MigrationStreamFormat.pageSize)
                    for run in batch.runs {
                        writer.record(.sectionData, section: ramSection, required: true) { writer in
                            writer.append(PageEncoding.raw.rawValue)
                            writer.append(UInt64(run.page) * MigrationStreamFormat.pageSize)
                            writer.append(UInt32(run.count))
                            let length = run.count * pageSize
                            // From guest memory the copy into the record is the one the checksum covers.
                            let source = batch.guestBase.map { $0 + run.page * pageSize } ?? UnsafeRawPointer(bytes.baseAddress! + offset)
                            writer.append(memory: source, count: length)
                            offset += length
                        }
                    }
                }
            case let .sync(number):
                writer.record(.multifdSync, required: true) { $0.append(number) }
                writer.flush()
            case .finish:
                // END, so the destination tells a finished channel from a broken one.
                let records = writer.recordsWritten
                writer.record(.end, required: true) { $0.append(records) }
                writer.flush()
                break loop
            }
            if let problem = writer.error { fail("multifd channel \(channel.index): \(problem.message)") }
        }
        // The last flush, after END.
        if let problem = writer.error { fail("multifd channel \(channel.index): \(problem.message)") }
    }

    private func fail(_ message: String) {
        let first = failure.withLock { current -> Bool in
            guard current == nil else { return false }
            current = message
            return true
        }
        guard first else { return }
        // Wake a migration thread waiting on a full queue: it sees the error and stops.
        for channel in channels {
            channel.ready.lock()
            channel.ready.broadcast()
            channel.ready.unlock()
        }
    }
}
