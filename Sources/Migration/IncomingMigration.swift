import Foundation
import Machine

/// What the destination brings to a load: its capabilities and thread counts.
struct IncomingSettings {
    var capabilities: [String] = []
    var decompressThreads = 2
    /// `multifd-channels` here: the source must use as many.
    var multifdChannels = 2
}

/// The destination side: reads the stream header and hands the rest to the loader of its
/// version — version 2 (`load`, below) or version 1 (`StreamV1Loader`, for VMs saved by older
/// terns).
///
/// Version 2 guarantees: the configuration record is checked against this machine before any
/// page is loaded; every record's length is bounded before it is read and its checksum checked
/// before it is used; each page decoder checks every offset and length before it writes, and
/// never writes outside the pages its record names; device state is applied only after the
/// stream has ended and every section decodes. Where the source asked for a return path and
/// the connection is a socket, the verdict (loaded, or failed with the reason) goes back on it.
final class IncomingMigration {
    private let target: MigrationTarget
    private let descriptor: Int32
    private let io: ConnectionIO
    private var reader: MigrationStreamReader
    private let settings: IncomingSettings
    /// What the controller does when postcopy starts, breaks and resumes.
    var hooks = IncomingPostcopyHooks()
    private(set) var statistics = IncomingStatistics()
    /// Wall-clock nanoseconds when the source stopped its vCPUs, from the stream.
    private(set) var sourceStoppedAt: UInt64?
    private var returnPath: ReturnPathSender?
    // The version 2 load, across its records (and, in postcopy, its connections).
    private var records: StreamRecordReader!
    private var sections: [UInt16: IncomingLiveSection] = [:]
    private var ram: IncomingRAMSection?
    private var devices: IncomingDeviceStateSection?
    private var advisedPostcopy = false
    private var postcopy: PostcopyDestination?
    /// With multifd: the channels, once MULTIFD_SETUP has named them.
    private var multifd: MultifdReceiver?
    private var ramSectionID: UInt16?
    /// Accepts the next connection on the listener the main stream came in on (nil: there is
    /// none, as with exec: or fd:, and multifd cannot be used).
    var acceptChannel: (() throws(MigrationStreamError) -> MigrationConnection)?
    /// When the first switchover record arrived, and what dropping pages cost (for the log).
    private var switchoverStarted: UInt64?
    private var discardNanoseconds: UInt64 = 0
    private var discardedRuns = 0
    /// Where progress worth a line goes (the controller's log).
    var log: (String) -> Void = { _ in }
    /// Bytes read on connections that postcopy recovery has replaced.
    private var bytesOnEarlierConnections: UInt64 = 0
    /// The guest runs here while pages still arrive.
    private(set) var postcopyRunning = false

    var postcopyDestination: PostcopyDestination? { postcopy }

    /// Fault statistics once postcopy has started.
    var postcopyFaults: PostcopyFaultStatistics? { postcopy?.faultStatistics }

    /// Loads from `descriptor`, through `io` when the connection has a layer of its own (TLS).
    init(target: MigrationTarget, descriptor: Int32, io: ConnectionIO? = nil, settings: IncomingSettings = IncomingSettings()) {
        self.target = target
        self.descriptor = descriptor
        self.io = io ?? PlainConnectionIO(descriptor: descriptor)
        self.reader = MigrationStreamReader(io: self.io)
        self.settings = settings
    }

    convenience init(machine: Machine, connection: MigrationConnection, settings: IncomingSettings = IncomingSettings()) {
        self.init(target: machine as MigrationTarget, descriptor: connection.descriptor, io: connection.io, settings: settings)
        machine.waitUntilStarted() // the vCPU threads must exist to take their state
    }

    convenience init(machine: Machine, descriptor: Int32, settings: IncomingSettings = IncomingSettings()) {
        self.init(machine: machine, connection: MigrationConnection(descriptor: descriptor), settings: settings)
    }

    /// Loads the whole stream. Returns the run state the source recorded.
    func load(progress: (IncomingStatistics) -> Void) throws(MigrationStreamError) -> RunState {
        do {
            let state = try loadStream(progress: progress)
            returnPath?.send(.loaded)
            return state
        } catch {
            // A channel's failure stops the main stream's reading: its reason is the one to give.
            let error = multifd?.failure.map { MigrationStreamError($0) } ?? error
            multifd?.abort()
            returnPath?.send(.failed(error.message))
            postcopy?.stop()
            throw error
        }
    }

    private func loadStream(progress: (IncomingStatistics) -> Void) throws(MigrationStreamError) -> RunState {
        let magic = try reader.readBytes(MigrationStreamFormat.magic.count)
        guard magic == MigrationStreamFormat.magic else {
            if magic.first == TLSSession.handshakeRecordType && magic.dropFirst().first == 3 { // a TLS ClientHello (version 3.x)
                throw MigrationStreamError("the source speaks TLS but this destination does not: set tls-creds here "
                                           + "(a tls-creds-x509 object with endpoint=server) before migrate-incoming")
            }
            throw MigrationStreamError("not a tern migration stream (bad magic)")
        }
        let version = try reader.read(UInt32.self)
        guard MigrationStreamFormat.readableVersions.contains(version) else {
            throw MigrationStreamError("stream version \(version) is not supported (this tern reads versions \(MigrationStreamFormat.readableVersions.lowerBound) to \(MigrationStreamFormat.readableVersions.upperBound))")
        }
        if version == 1 {
            let v1 = StreamV1Loader(target: target, reader: reader)
            defer { statistics = v1.statistics; sourceStoppedAt = v1.sourceStoppedAt }
            return try v1.load(progress: progress)
        }
        return try loadVersion2(progress: progress)
    }

    private func loadVersion2(progress: (IncomingStatistics) -> Void) throws(MigrationStreamError) -> RunState {
        records = StreamRecordReader(reader: reader)
        let first = try records.next()
        guard first.type == .configuration else {
            throw MigrationStreamError("the stream does not begin with its configuration record")
        }
        let configuration = try records.withBody { (body) throws(MigrationStreamError) in try StreamConfiguration.decode(body) }
        if configuration.returnPath && isSocket(descriptor) { returnPath = ReturnPathSender(io: io) }
        if let mismatch = configuration.mismatch(ramSize: target.memory.size, cpuCount: target.cpuCount,
                                                 deviceSections: target.deviceSectionNames,
                                                 capabilities: settings.capabilities) {
            throw MigrationStreamError(mismatch)
        }
        advisedPostcopy = configuration.capabilities.contains(MigrationCapability.postcopyRAM.rawValue)
        if advisedPostcopy && returnPath == nil {
            throw MigrationStreamError("the source advises postcopy, but this connection cannot carry a return path")
        }
        if advisedPostcopy, let reason = UserfaultRegion.unavailableReason {
            throw MigrationStreamError("the source advises postcopy, but this destination cannot take it: \(reason)")
        }
        for section in configuration.sections {
            switch (section.name, section.version) {
            case ("ram", 1):
                let loader = IncomingRAMSection(memory: target.memory, encodings: configuration.encodings,
                                                decompressThreads: settings.decompressThreads)
                ram = loader
                sections[section.id] = loader
            case ("devices", 1):
                let loader = IncomingDeviceStateSection(target: target)
                devices = loader
                sections[section.id] = loader
            case ("block", 1):
                sections[section.id] = IncomingBlockSection(disks: target.disks)
            case ("ram", _), ("devices", _), ("block", _):
                throw MigrationStreamError("live section '\(section.name)' version \(section.version) is not supported (this tern reads version 1)")
            default:
                throw MigrationStreamError("the stream has live section '\(section.name)', which this tern does not know")
            }
        }
        guard ram != nil, devices != nil else { throw MigrationStreamError("the stream has no RAM or no device-state section") }
        ramSectionID = configuration.sections.first(where: { $0.name == "ram" })?.id
        if let ramLoader = ram, let ramID = ramSectionID {
            records.placementPrefix = IncomingRAMSection.directPrefix
            records.placement = { [unowned ramLoader] section, prefix, length in
                section == ramID ? ramLoader.directTarget(prefix: prefix, bodyLength: length) : nil
            }
        }
        while true {
            do {
                if let state = try loadRecord(progress: progress) { return state }
            } catch {
                // Once the guest runs here, neither side holds all of it: wait for a new
                // connection instead of failing (QEMU 3.0's postcopy recovery).
                guard postcopyRunning, let postcopy else { throw error }
                try recover(postcopy, after: error.message)
            }
        }
    }

    private func publish(_ progress: (IncomingStatistics) -> Void) {
        statistics.pagesLoaded = (ram?.pagesLoaded ?? 0) + (multifd?.pagesLoaded ?? 0)
        statistics.zeroPagesLoaded = ram?.zeroPagesLoaded ?? 0
        statistics.bytesRead = bytesOnEarlierConnections + records.bytesRead + (multifd?.bytesRead ?? 0)
        progress(statistics)
    }

    /// Loads one record; returns the recorded run state once the stream has ended.
    private func loadRecord(progress: (IncomingStatistics) -> Void) throws(MigrationStreamError) -> RunState? {
        let record = try records.next()
        guard let type = record.type else {
            if record.isRequired {
                throw MigrationStreamError("a required record of unknown type 0x\(String(record.typeByte, radix: 16)) at byte \(record.streamOffset)")
            }
            return nil // an optional record from a newer tern
        }
        switch type {
        case .configuration:
            throw MigrationStreamError("a second configuration record at byte \(record.streamOffset)")
        case .resume:
            throw MigrationStreamError("a RESUME record in the middle of the stream at byte \(record.streamOffset)")
        case .sectionData:
            guard let section = sections[record.section] else {
                throw MigrationStreamError("a record for live section \(record.section), which the configuration does not list")
            }
            try records.withBody { (body) throws(MigrationStreamError) in try section.load(body) }
            if records.recordsRead % 4096 == 0 { publish(progress) }
        case .passEnd:
            publish(progress)
        case .ping:
            let value = try records.withBody { (body) throws(MigrationStreamError) -> UInt32 in
                let value = try body.read(UInt32.self, "ping value")
                try body.finish("a PING record")
                return value
            }
            returnPath?.send(.pong(value))
        case .sourceStopped:
            sourceStoppedAt = try records.withBody { (body) throws(MigrationStreamError) -> UInt64 in
                try body.read(UInt64.self, "stop time")
            }
        case .discard:
            let started = WallClock.nanoseconds()
            switchoverStarted = switchoverStarted ?? started
            let destination = try preparePostcopy("DISCARD")
            let runs = try records.withBody { (body) throws(MigrationStreamError) in try Self.decodeDiscard(body) }
            try destination.discard(runs)
            discardNanoseconds += WallClock.nanoseconds() - started
            discardedRuns += runs.count
        case .postcopyRun:
            let destination = try preparePostcopy("POSTCOPY_RUN")
            let total = try records.withBody { (body) throws(MigrationStreamError) -> UInt64 in
                let total = try body.read(UInt64.self, "lacking page count")
                try body.finish("the POSTCOPY_RUN record")
                return total
            }
            guard total == UInt64(destination.lackingCount) else {
                throw MigrationStreamError("the source will send \(total) pages after the switchover, but \(destination.lackingCount) were dropped here")
            }
            limitReceiveQueue(descriptor)
            destination.startFaultThread() // before the device state, in case loading it touches RAM
            try devices!.finish()
            postcopyRunning = true
            publish(progress)
            hooks.started(devices!.recordedRunState ?? .paused)
            let now = WallClock.nanoseconds()
            let sinceStop = sourceStoppedAt.map { now >= $0 ? "\((now - $0) / 1_000_000) ms after the source stopped it" : "" } ?? ""
            log("postcopy: the guest runs here \(sinceStop) (switchover records took \((now - (switchoverStarted ?? now)) / 1_000_000) ms, "
                + "\(discardedRuns) discarded runs \(discardNanoseconds / 1_000_000) ms); \(destination.lackingCount) pages to come")
        case .multifdSetup:
            try startMultifd()
        case .multifdSync:
            guard let multifd else { throw MigrationStreamError("a MULTIFD_SYNC record at byte \(record.streamOffset) without MULTIFD_SETUP") }
            let number = try records.withBody { (body) throws(MigrationStreamError) -> UInt32 in
                let number = try body.read(UInt32.self, "sync number")
                try body.finish("a MULTIFD_SYNC record")
                return number
            }
            try multifd.mainReached(number)
            publish(progress)
        case .end:
            try multifd?.finish()
            let expected = try records.withBody { (body) throws(MigrationStreamError) -> UInt64 in
                let count = try body.read(UInt64.self, "record count")
                try body.finish("the END record")
                return count
            }
            guard expected == records.recordsRead - 1 else {
                throw MigrationStreamError("the source wrote \(expected) records but \(records.recordsRead - 1) arrived")
            }
            if let postcopy {
                guard postcopy.lackingCount == 0 else {
                    throw MigrationStreamError("the stream ended with \(postcopy.lackingCount) pages still missing")
                }
                postcopy.stop()
            }
            publish(progress)
            for section in sections.values where section !== devices { try section.finish() }
            if !postcopyRunning { try devices!.finish() }
            return devices!.recordedRunState ?? .paused
        }
        return nil
    }

    /// MULTIFD_SETUP: the channel count must be this side's, and the channels connect now.
    private func startMultifd() throws(MigrationStreamError) {
        guard multifd == nil else { throw MigrationStreamError("a second MULTIFD_SETUP record") }
        let (count, session) = try records.withBody { (body) throws(MigrationStreamError) -> (UInt32, UInt64) in
            let count = try body.read(UInt32.self, "channel count")
            let session = try body.read(UInt64.self, "session")
            try body.finish("the MULTIFD_SETUP record")
            return (count, session)
        }
        guard settings.capabilities.contains(MigrationCapability.multifd.rawValue) else {
            throw MigrationStreamError("the source uses multifd but the capability is off here (set it with migrate-set-capabilities before migrate-incoming)")
        }
        guard Int(count) == settings.multifdChannels else {
            throw MigrationStreamError("the source uses \(count) multifd channels, this destination \(settings.multifdChannels) "
                                       + "(set multifd-channels to the same number on both sides)")
        }
        guard let acceptChannel, let ramSectionID else {
            throw MigrationStreamError("the source uses multifd, but this destination does not listen for its channels (use tcp: or unix:)")
        }
        let main = descriptor
        multifd = try MultifdReceiver(count: Int(count), session: session, memory: target.memory, ramSection: ramSectionID,
                                      accept: acceptChannel, onFailure: { _ = shutdown(main, Int32(SHUT_RD)) })
        log("multifd: \(count) channels connected")
    }

    /// After the switchover a requested page queues behind whatever background pages the
    /// socket holds: a short receive queue keeps that wait short.
    private func limitReceiveQueue(_ socket: Int32) {
        var bytes: Int32 = Int32(IncomingMigration.postcopyReceiveBuffer)
        _ = setsockopt(socket, SOL_SOCKET, SO_RCVBUF, &bytes, socklen_t(MemoryLayout<Int32>.size))
    }

    static let postcopyReceiveBuffer = 64 << 10

    /// DISCARD's body: u32 count, count × (u64 offset, u64 length).
    static func decodeDiscard(_ body: ByteCursor) throws(MigrationStreamError) -> [ReturnPathMessage.PageRun] {
        let count = Int(try body.read(UInt32.self, "discard count"))
        guard count <= body.remaining / 16 else { throw MigrationStreamError("a DISCARD record claims \(count) runs but carries \(body.remaining) bytes") }
        var runs: [ReturnPathMessage.PageRun] = []
        runs.reserveCapacity(count)
        for _ in 0..<count {
            let offset = try body.read(UInt64.self, "discard offset")
            let length = try body.read(UInt64.self, "discard length")
            let pageSize = MigrationStreamFormat.pageSize
            guard offset % pageSize == 0, length % pageSize == 0, length > 0, length / pageSize <= UInt64(UInt32.max) else {
                throw MigrationStreamError("a DISCARD run at 0x\(String(offset, radix: 16)) of \(length) bytes is misaligned")
            }
            runs.append(.init(offset: offset, pages: UInt32(length / pageSize)))
        }
        try body.finish("a DISCARD record")
        return runs
    }

    /// The destination's postcopy state, created (guest RAM registered) by the first record
    /// of the switchover; only for a source that advised postcopy, before the guest runs.
    private func preparePostcopy(_ what: String) throws(MigrationStreamError) -> PostcopyDestination {
        guard advisedPostcopy else {
            throw MigrationStreamError("a \(what) record, but the source did not advise postcopy in its configuration")
        }
        guard !postcopyRunning else { throw MigrationStreamError("a \(what) record after postcopy has started") }
        if let postcopy { return postcopy }
        let fresh = try PostcopyDestination(memory: target.memory, sender: returnPath)
        postcopy = fresh
        ram!.postcopy = fresh // from now on this thread never writes guest RAM directly
        return fresh
    }

    /// The connection broke during postcopy: wait for `migrate-recover`'s connection, check
    /// that its RESUME matches, tell the source what is still lacking, and go on.
    private func recover(_ postcopy: PostcopyDestination, after reason: String) throws(MigrationStreamError) {
        var reason = reason
        while true {
            postcopy.disconnected()
            returnPath = nil
            guard let fresh = hooks.paused(reason) else { throw MigrationStreamError(reason) }
            do {
                try resume(on: fresh, postcopy)
                hooks.resumed()
                return
            } catch {
                reason = "resuming postcopy failed: \(error.message)"
            }
        }
    }

    private func resume(on fresh: MigrationConnection, _ postcopy: PostcopyDestination) throws(MigrationStreamError) {
        bytesOnEarlierConnections += records.bytesRead
        reader = MigrationStreamReader(io: fresh.io)
        let magic = try reader.readBytes(MigrationStreamFormat.magic.count)
        let version = try reader.read(UInt32.self)
        guard magic == MigrationStreamFormat.magic, version == MigrationStreamFormat.version else {
            throw MigrationStreamError("the resumed connection does not carry a version \(MigrationStreamFormat.version) tern stream")
        }
        records = StreamRecordReader(reader: reader)
        let first = try records.next()
        guard first.type == .resume else { throw MigrationStreamError("the resumed stream does not begin with a RESUME record") }
        let (ramSize, pageSize) = try records.withBody { (body) throws(MigrationStreamError) -> (UInt64, UInt32) in
            let size = try body.read(UInt64.self, "RAM size")
            let page = try body.read(UInt32.self, "page size")
            try body.finish("the RESUME record")
            return (size, page)
        }
        guard ramSize == target.memory.size, UInt64(pageSize) == MigrationStreamFormat.pageSize else {
            throw MigrationStreamError("the resuming source has \(ramSize >> 20) MiB of RAM in \(pageSize)-byte pages; this guest has \(target.memory.size >> 20) MiB")
        }
        limitReceiveQueue(fresh.descriptor)
        let sender = ReturnPathSender(io: fresh.io)
        returnPath = sender
        postcopy.reconnected(sender)
        let runs = postcopy.lackingRuns()
        var index = 0
        repeat {
            let chunk = Array(runs[index..<min(index + ReturnPathMessage.maximumRunsPerMessage, runs.count)])
            guard sender.send(.lacking(chunk)) else { throw MigrationStreamError("the resuming source went away") }
            index += chunk.count
        } while index < runs.count
        guard sender.send(.resumeReady(runs.reduce(0) { $0 + UInt64($1.pages) })) else {
            throw MigrationStreamError("the resuming source went away")
        }
    }
}

/// What the destination's controller does at postcopy's turning points.
struct IncomingPostcopyHooks {
    /// The device state is loaded and pages will follow: start the guest in the recorded state.
    var started: (RunState) -> Void = { _ in }
    /// The connection broke after the guest started (the reason given): returns a new
    /// connection once `migrate-recover` has one, or nil to give up.
    var paused: (String) -> MigrationConnection? = { _ in nil }
    /// The new connection is set up; pages flow again.
    var resumed: () -> Void = {}
}
