import Foundation
import Machine
import Synchronization

/// The destination's multifd channels: one receiving thread per channel, each reading raw page
/// runs straight into guest memory after checking them as the main loader checks a raw run
/// (page-aligned, inside guest RAM, the body exactly the pages), and a barrier at every
/// MULTIFD_SYNC: no channel reads past its mark, and the main stream does not go past the same
/// mark, until all have reached it. So pages of pass N (on any channel) are in memory before
/// anything of pass N+1 (on any channel or the main stream) is applied, and the main stream's
/// END is taken only once every channel has ended.
final class MultifdReceiver: @unchecked Sendable {
    // Sendable: `state` is mutex-guarded and waited on through `changed`; the rest is fixed.
    private struct State {
        var reached: [UInt32]
        var released: UInt32 = 0
        var ended: [Bool]
        var failure: String?
        var running: Int
    }

    private let connections: [MigrationConnection]
    /// Each channel's reader, used by its thread only.
    private let readers: [MigrationStreamReader]
    private let memory: GuestMemory
    private let ramSection: UInt16
    private let state: Mutex<State>
    private let changed = NSCondition()
    private let loaded = Atomic<UInt64>(0)
    private let bytes = Atomic<UInt64>(0)

    /// How long the destination waits for the channels to connect after MULTIFD_SETUP.
    static let connectTimeoutSeconds: Int32 = 10

    /// Accepts `count` channel connections (in any order; each names its index and the session),
    /// then starts a thread for each.
    init(count: Int, session: UInt64, memory: GuestMemory, ramSection: UInt16,
         accept: () throws(MigrationStreamError) -> MigrationConnection,
         onFailure: @escaping @Sendable () -> Void) throws(MigrationStreamError) {
        self.onFailure = onFailure
        // Each channel's reader reads on from its header: it may already hold the first records.
        var byIndex = [(connection: MigrationConnection, reader: MigrationStreamReader)?](repeating: nil, count: count)
        for _ in 0..<count {
            let connection = try accept()
            let reader = MigrationStreamReader(io: connection.io)
            do throws(MigrationStreamError) {
                let index = try Self.readHeader(reader, session: session, count: count)
                guard byIndex[index] == nil else { throw MigrationStreamError("multifd channel \(index) connected twice") }
                byIndex[index] = (connection, reader)
            } catch {
                _ = connection.close()
                byIndex.compactMap { $0 }.forEach { _ = $0.connection.close() }
                throw error
            }
        }
        let channels = byIndex.map { $0! }
        connections = channels.map(\.connection)
        readers = channels.map(\.reader)
        self.memory = memory
        self.ramSection = ramSection
        state = Mutex(State(reached: Array(repeating: 0, count: count), ended: Array(repeating: false, count: count), running: count))
        for index in channels.indices {
            let thread = Thread { [self] in run(index, readers[index]) }
            thread.name = "multifd-recv-\(index)"
            thread.start()
        }
    }

    private static func readHeader(_ reader: MigrationStreamReader, session: UInt64, count: Int) throws(MigrationStreamError) -> Int {
        let magic = try reader.readBytes(MultifdChannelHeader.magic.count)
        guard magic == MultifdChannelHeader.magic else {
            throw MigrationStreamError("a connection that is not a multifd channel arrived while the channels were expected")
        }
        let version = try reader.read(UInt32.self)
        guard version == MultifdChannelHeader.version else {
            throw MigrationStreamError("multifd channel format version \(version) (this tern reads \(MultifdChannelHeader.version))")
        }
        guard try reader.read(UInt64.self) == session else {
            throw MigrationStreamError("a multifd channel of another migration connected")
        }
        let index = Int(try reader.read(UInt32.self))
        guard index < count else { throw MigrationStreamError("multifd channel \(index) of \(count) channels") }
        return index
    }

    /// Pages the channels loaded, and the bytes they read.
    var pagesLoaded: UInt64 { loaded.load(ordering: .relaxed) }
    var bytesRead: UInt64 { bytes.load(ordering: .relaxed) }

    /// The main stream reached MULTIFD_SYNC `number`: waits until every channel has, then lets
    /// them all go on.
    func mainReached(_ number: UInt32) throws(MigrationStreamError) {
        try wait { state in state.reached.allSatisfy { $0 >= number } }
        state.withLock { $0.released = number }
        signal()
    }

    /// The main stream ended: waits until every channel has sent its END.
    func finish() throws(MigrationStreamError) {
        try wait { state in state.ended.allSatisfy { $0 } }
        close()
    }

    /// A failed load: cuts every channel and waits for the threads.
    func abort() {
        aborting.store(true, ordering: .relaxed)
        fail("the migration was aborted")
        for connection in connections { connection.shutdownIO() }
        changed.lock()
        while state.withLock({ $0.running }) > 0 { changed.wait() }
        changed.unlock()
        close()
    }

    private func close() {
        for connection in connections { _ = connection.close() }
    }

    private func wait(until condition: (State) -> Bool) throws(MigrationStreamError) {
        changed.lock()
        defer { changed.unlock() }
        while true {
            let (met, failure) = state.withLock { (condition($0), $0.failure) }
            if let failure { throw MigrationStreamError(failure) }
            if met { return }
            changed.wait()
        }
    }

    private func signal() {
        changed.lock()
        changed.broadcast()
        changed.unlock()
    }

    private func fail(_ message: String) {
        let first = state.withLock { state -> Bool in
            guard state.failure == nil else { return false }
            state.failure = message
            return true
        }
        signal()
        if first && !aborting.load(ordering: .relaxed) { onFailure() }
    }

    /// Called once, on the first failure: the main loader may be reading its own stream rather
    /// than waiting at a mark, and must stop to report the channel's failure.
    private let onFailure: @Sendable () -> Void
    private let aborting = Atomic<Bool>(false)

    /// Why the channels failed, if they did.
    var failure: String? { state.withLock { $0.failure } }

    private func run(_ index: Int, _ reader: MigrationStreamReader) {
        defer {
            state.withLock { $0.running -= 1 }
            signal()
        }
        let records = StreamRecordReader(reader: reader)
        var placed: UInt64?
        records.placementPrefix = IncomingRAMSection.directPrefix
        records.placement = { [memory, ramSection] section, prefix, length in
            guard section == ramSection, let run = IncomingRAMSection.rawRun(prefix, bodyLength: length, in: memory) else { return nil }
            placed = run.count
            return run.pointer
        }
        do throws(MigrationStreamError) {
            while true {
                placed = nil
                let before = records.bytesRead
                let record = try records.next()
                bytes.add(records.bytesRead - before, ordering: .relaxed)
                switch record.type {
                case .sectionData?:
                    guard let count = placed else {
                        throw MigrationStreamError("a record at byte \(record.streamOffset) that is not a raw run inside guest RAM")
                    }
                    loaded.add(count, ordering: .relaxed)
                case .multifdSync?:
                    let number = try records.withBody { (body) throws(MigrationStreamError) -> UInt32 in
                        let number = try body.read(UInt32.self, "sync number")
                        try body.finish("a MULTIFD_SYNC record")
                        return number
                    }
                    let expected = state.withLock { $0.reached[index] } + 1
                    guard number == expected else {
                        throw MigrationStreamError("MULTIFD_SYNC \(number) where \(expected) was due")
                    }
                    state.withLock { $0.reached[index] = number }
                    signal()
                    try wait { state in state.released >= number }
                case .end?:
                    state.withLock { $0.ended[index] = true }
                    signal()
                    return
                default:
                    throw MigrationStreamError("a \(record.type?.name ?? "0x\(String(record.typeByte, radix: 16))") record at byte \(record.streamOffset), which a channel does not carry")
                }
            }
        } catch {
            fail("multifd channel \(index): \(error.message)")
        }
    }
}
