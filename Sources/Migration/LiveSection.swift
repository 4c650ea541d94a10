import Machine

/// Bytes a live section still has to send: what must go before the switchover, and what could
/// follow it once the guest runs on the destination (postcopy).
struct PendingBytes: Equatable {
    var beforeSwitchover: UInt64 = 0
    var postcopyable: UInt64 = 0
    var total: UInt64 { beforeSwitchover + postcopyable }

    static func + (lhs: PendingBytes, rhs: PendingBytes) -> PendingBytes {
        PendingBytes(beforeSwitchover: lhs.beforeSwitchover + rhs.beforeSwitchover,
                     postcopyable: lhs.postcopyable + rhs.postcopyable)
    }
}

/// What a section is told when the guest has stopped for the switchover.
struct SwitchoverContext {
    /// Whether the guest was running when the migration stopped it.
    var guestWasRunning: Bool
}

/// The source side of everything that migrates, in the spirit of QEMU's SaveVMHandlers: guest
/// RAM iterates while the guest runs, device state only completes with the guest stopped, a
/// disk will iterate too. The migration thread sees only these, the stream, the rate limiter
/// and the convergence policy.
protocol OutgoingLiveSection: AnyObject {
    /// The name the destination looks the loader up by, and its format version.
    var name: String { get }
    var version: UInt32 { get }
    /// The page encodings this section may write (listed in the configuration record).
    var encodings: [PageEncoding] { get }
    /// Writes what goes before the first iteration. The guest is running.
    func setup(_ stream: SectionStream) throws(MigrationStreamError)
    /// Whether the current pass has sent everything it found dirty.
    var passComplete: Bool { get }
    /// Starts the next pass (syncs dirty tracking); returns the bytes found dirty.
    func beginPass() throws(MigrationStreamError) -> UInt64
    /// Sends up to about `budget` bytes of the current pass.
    func iterate(_ stream: SectionStream, budget: UInt64) throws(MigrationStreamError)
    var pending: PendingBytes { get }
    /// Sends everything left; the guest is stopped.
    func complete(_ stream: SectionStream, _ context: SwitchoverContext) throws(MigrationStreamError)
    /// Adds this section's counters to the statistics.
    func report(into statistics: inout MigrationStatistics)
    /// Releases what the section holds (dirty tracking, caches), whatever the outcome.
    func cleanup()
}

/// A section whose remaining data can follow the guest to the destination (postcopy): RAM.
/// After the switchover the migration thread serves the destination's page requests first and
/// lets the section `iterate` in the background with what is left.
protocol PostcopyLiveSection: OutgoingLiveSection {
    /// The guest has stopped for the switchover: syncs one last time, keeps everything not yet
    /// sent as the remaining set, and returns it: the destination drops those pages and fetches
    /// them on demand. From now on only encodings that need no old copy are used.
    func beginPostcopy() throws(MigrationStreamError) -> [ReturnPathMessage.PageRun]
    /// Sends the pages of a request at once, whether or not they were already sent.
    func sendRequested(_ stream: SectionStream, offset: UInt64, length: UInt64) throws(MigrationStreamError)
    /// A resumed connection: the remaining set becomes what the destination says it lacks.
    func resume(lacking: [ReturnPathMessage.PageRun])
}

/// A section that never iterates: it has nothing to send until the switchover.
extension OutgoingLiveSection {
    var encodings: [PageEncoding] { [] }
    func setup(_ stream: SectionStream) throws(MigrationStreamError) {}
    var passComplete: Bool { true }
    func beginPass() throws(MigrationStreamError) -> UInt64 { 0 }
    func iterate(_ stream: SectionStream, budget: UInt64) throws(MigrationStreamError) {}
    var pending: PendingBytes { PendingBytes() }
    func report(into statistics: inout MigrationStatistics) {}
    func cleanup() {}
}

/// A section's view of the outgoing stream: records it writes carry its id.
struct SectionStream {
    let writer: MigrationStreamWriter
    let id: UInt16

    /// Writes one SECTION_DATA record for this section.
    func record(_ body: (MigrationStreamWriter) -> Void) {
        writer.record(.sectionData, section: id, required: true, body)
    }

    func begin() { writer.beginRecord(.sectionData, section: id, required: true) }
    func end() { writer.endRecord() }
    var error: MigrationStreamError? { writer.error }
}

/// The destination side of a live section: takes its records one at a time, in stream order,
/// and finishes once the stream has ended.
protocol IncomingLiveSection: AnyObject {
    /// Applies one SECTION_DATA record; every length and offset is checked before any write.
    func load(_ body: ByteCursor) throws(MigrationStreamError)
    /// The stream has ended: apply what waited for the end (device state).
    func finish() throws(MigrationStreamError)
}

extension IncomingLiveSection {
    func finish() throws(MigrationStreamError) {}
}

/// What a destination loads into: the machine, as far as the loader needs it. Narrow, so that
/// the loader can be driven without KVM.
protocol MigrationTarget: AnyObject {
    var memory: GuestMemory { get }
    var cpuCount: Int { get }
    /// The disk images a block migration writes into.
    var disks: [DiskImage] { get }
    /// The device-state section names this machine saves and must be given.
    var deviceSectionNames: [String] { get }
    /// Applies device state; returns the run state the source recorded.
    func loadDeviceState(_ sections: [StateSection]) throws(StateLoadError) -> RunState
}

extension Machine: MigrationTarget {
    var cpuCount: Int { configuration.cpuCount }
    var deviceSectionNames: [String] { stateSectionNames }
    func loadDeviceState(_ sections: [StateSection]) throws(StateLoadError) -> RunState {
        try loadState(sections)
    }
}
