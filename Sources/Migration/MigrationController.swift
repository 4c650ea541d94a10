import Foundation
import Machine
import Synchronization

/// A migration command refused, with QEMU's text.
public struct MigrationError: Error, CustomStringConvertible, Equatable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// Something a monitor wants to know about: QMP turns these into MIGRATION and
/// MIGRATION_PASS events.
public enum MigrationEvent: Equatable, Sendable {
    case statusChanged(MigrationStatus)
    case passCompleted(Int)
    /// SLO escalation took a step (tern's X_MIGRATION_ESCALATION).
    case escalated(Escalation)
}

/// The migration engine's front door: one outgoing migration at a time, the incoming side,
/// capabilities, parameters, blockers and statistics. It sees the machine only through its
/// run state, its memory, and the device state the machine saves and loads.
public final class MigrationController: @unchecked Sendable {
    // Sendable: mutable state lives in `state`, under its mutex; `observer` and `log` are set
    // once before any migration starts.
    struct State {
        var statistics = MigrationStatistics()
        var incoming = IncomingStatistics()
        var capabilities: [MigrationCapability: Bool] = [:]
        var parameters = MigrationParameters()
        /// QEMU's default XBZRLE cache: 64 MiB.
        var xbzrleCacheSize: UInt64 = 64 << 20
        var blockers: [String] = []
        var connection: MigrationConnection?
        var incomingRequested = false
        var incomingStarted = false
        var incomingDeferred = false
        var autostart = true
        /// `migrate-start-postcopy` was sent for the migration under way.
        var postcopyRequested = false
        /// The incoming connection of the moment (postcopy may replace it).
        var incomingConnection: MigrationConnection?
        var incomingPostcopy: PostcopyDestination?
        var recoveryPending = false
        /// The source has sent its last record (END): the destination may already run the
        /// guest, so a cancel can no longer take it back and the destination's verdict decides.
        var switchoverCommitted = false
    }
    /// Where `migrate ... resume` hands its connection to the paused source thread.
    let resumeHandoff = ConnectionHandoff()
    /// Where `migrate-recover` hands its connection to the paused destination thread.
    let recoveryHandoff = ConnectionHandoff()

    public let machine: Machine
    /// The `tls-creds-x509` and `authz-simple` objects that `tls-creds` and `tls-authz` name.
    public let tlsObjects = TLSObjectRegistry()
    /// Everything mutable, under one lock (the incoming side, in MigrationControllerIncoming.swift, too).
    let state = Mutex(State())
    let descriptorNamed: @Sendable (String) -> Int32?
    /// Told of status changes and passes.
    public var observer: @Sendable (MigrationEvent) -> Void = { _ in }
    /// Where transitions are logged (standard error by default).
    public var log: @Sendable (String) -> Void = { message in
        FileHandle.standardError.write(Data("tern: migration: \(message)\n".utf8))
    }
    /// Called when an incoming load fails: the command line prints it and exits non-zero.
    public var incomingFailed: @Sendable (String) -> Void = { _ in }

    public init(machine: Machine, descriptorNamed: @escaping @Sendable (String) -> Int32?) {
        self.machine = machine
        self.descriptorNamed = descriptorNamed
        if machine.configuration.exposeInvariantTSC {
            addBlocker("State blocked by non-migratable CPU device (invtsc flag)")
        }
    }

    // MARK: state

    public var status: MigrationStatus { state.withLock { $0.statistics.status } }
    public var statistics: MigrationStatistics { state.withLock { $0.statistics } }
    public var incomingStatistics: IncomingStatistics {
        let (statistics, postcopy) = state.withLock { ($0.incoming, $0.incomingPostcopy) }
        var result = statistics
        if let postcopy { result.postcopyFaults = postcopy.faultStatistics }
        return result
    }
    public var parameters: MigrationParameters { state.withLock { $0.parameters } }

    func update(_ statistics: MigrationStatistics) {
        state.withLock { state in
            let status = state.statistics.status
            state.statistics = statistics
            state.statistics.status = status
        }
    }

    /// Compare-and-set of the outgoing status: moves only from `old`, only along a legal
    /// transition; logs the change and tells the observer.
    @discardableResult
    func transition(from old: MigrationStatus, to new: MigrationStatus) -> Bool {
        let moved = state.withLock { state -> Bool in
            guard state.statistics.status == old, old.canMove(to: new) else { return false }
            state.statistics.status = new
            return true
        }
        if moved {
            log("\(old.rawValue) -> \(new.rawValue)")
            if capability(.events) { observer(.statusChanged(new)) }
        }
        return moved
    }

    func passCompleted(_ pass: Int) {
        if capability(.events) { observer(.passCompleted(pass)) }
    }

    /// SLO escalation took a step: logged always, an event with the `events` capability.
    func escalated(_ escalation: Escalation) {
        log("SLO escalation: \(escalation.step.rawValue): \(escalation.detail)")
        if capability(.events) { observer(.escalated(escalation)) }
    }

    /// SLO escalation gave up: the migration ends as migrate_cancel would end it.
    func cancelForSLO() {
        _ = transition(from: .active, to: .cancelling)
    }

    // MARK: blockers, capabilities, parameters

    /// Registers a reason this machine cannot migrate; the newest is reported first.
    public func addBlocker(_ reason: String) {
        state.withLock { $0.blockers.insert(reason, at: 0) }
    }

    public func capability(_ capability: MigrationCapability) -> Bool {
        state.withLock { $0.capabilities[capability] ?? false }
    }

    public var capabilities: [(MigrationCapability, Bool)] {
        state.withLock { state in MigrationCapability.allCases.map { ($0, state.capabilities[$0] ?? false) } }
    }

    /// Applies capability changes in order; refused while a migration is in setup or active,
    /// and for capabilities tern does not implement yet.
    public func setCapabilities(_ changes: [(MigrationCapability, Bool)]) throws(MigrationError) {
        try state.withLock { (state) throws(MigrationError) in
            let status = state.statistics.status
            if status.isInProgress && status != .cancelling {
                throw MigrationError("There's a migration process in progress")
            }
            for (capability, enabled) in changes where enabled && !capability.isImplemented {
                throw MigrationError("Capability '\(capability.rawValue)' is not supported by tern yet")
            }
            for (capability, enabled) in changes {
                for name in capability.aliases { state.capabilities[name] = enabled }
            }
            for message in MigrationCapability.applyRules(&state.capabilities) { log(message) }
        }
    }

    /// Validates every value first, then applies them all (QEMU 2015 applied some before
    /// failing; see docs/migration-reference.md).
    public func setParameters(_ values: [(String, MigrationParameterValue)]) throws(MigrationError) {
        var cacheSize: UInt64?
        for (name, value) in values {
            if let error = MigrationParameters.validate(name, value) { throw MigrationError(error) }
            if name == "xbzrle-cache-size", case let .integer(size) = value { cacheSize = try checkedCacheSize(size) }
        }
        state.withLock { state in
            for (name, value) in values { state.parameters.set(name, value) }
            if let cacheSize { state.xbzrleCacheSize = cacheSize }
        }
    }

    /// The XBZRLE cache size in bytes (`query-migrate-cache-size`).
    public var xbzrleCacheSize: UInt64 { state.withLock { $0.xbzrleCacheSize } }

    /// `migrate-set-cache-size`: allowed at any time; a running migration replaces its cache
    /// at its next pass.
    public func setCacheSize(_ value: Int64) throws(MigrationError) {
        let size = try checkedCacheSize(value)
        state.withLock { $0.xbzrleCacheSize = size }
    }

    /// The reference's checks, in its order and with its texts; the size stored is rounded
    /// down to a power of two.
    private func checkedCacheSize(_ value: Int64) throws(MigrationError) -> UInt64 {
        let unsigned = UInt64(bitPattern: value) // QEMU compares unsigned: negative is huge
        guard unsigned <= machine.memory.size else {
            throw MigrationError("Parameter 'cache size' expects exceeds guest ram size ")
        }
        guard unsigned >= MigrationStreamFormat.pageSize else {
            throw MigrationError("Parameter 'cache size' expects is smaller than page size")
        }
        return XBZRLECache.roundedSize(unsigned)
    }

    /// `migrate_set_speed`: bytes per second, negative becomes 0 (unlimited below 10).
    public func setSpeed(_ bytesPerSecond: Int64) {
        // (QEMU 2015 had no way to read this back; `max-bandwidth` shows it.)
        state.withLock { $0.parameters.maxBandwidth = UInt64(max(bytesPerSecond, 0)) }
    }

    /// `migrate_set_downtime`: seconds as a float, clamped at 0.
    public func setDowntime(seconds: Double) {
        let nanoseconds = seconds * 1e9
        let clamped: UInt64 = nanoseconds.isNaN || nanoseconds <= 0 ? 0
            : nanoseconds >= Double(UInt64.max) ? .max : UInt64(nanoseconds)
        state.withLock { $0.parameters.downtimeLimitNanoseconds = clamped }
    }

    // MARK: outgoing

    /// Starts a migration to `uri` in the background. `blk` copies the disks whole, `inc` only
    /// what was written since they were opened; without either they are shared storage.
    public func migrate(uri: String, blk: Bool = false, inc: Bool = false, resume: Bool = false) throws(MigrationError) {
        if resume { return try resumePostcopy(uri: uri) }
        try state.withLock { (state) throws(MigrationError) in
            if state.statistics.status.isInProgress { throw MigrationError("There's a migration process in progress") }
            // A destination may migrate on once its incoming migration has loaded (ping-pong).
            if machine.runState == .inmigrate {
                throw MigrationError("Guest is waiting for an incoming migration")
            }
            if let blocker = state.blockers.first { throw MigrationError(blocker) }
            switch machine.runState {
            case .shutdown, .internalError:
                throw MigrationError("the guest has stopped (\(machine.runState.rawValue)); there is nothing to migrate")
            default: break
            }
            var fresh = MigrationStatistics()
            fresh.startMilliseconds = WallClock.milliseconds()
            fresh.status = state.statistics.status
            state.statistics = fresh
            state.postcopyRequested = false
        }
        guard transition(from: status, to: .setup) else { throw MigrationError("There's a migration process in progress") }
        let parsed: MigrationURI
        do {
            parsed = try MigrationURI(parsing: uri)
        } catch {
            fail("Parameter 'uri' expects a valid migration protocol")
            throw MigrationError("Parameter 'uri' expects a valid migration protocol")
        }
        if capability(.multifd) {
            // Each channel is a connection of its own to the same address.
            let refusal: String? = switch parsed {
            case .tcp, .unix: capability(.postcopyRAM) ? "Multifd is not compatible with postcopy in tern yet" : nil
            default: "Multifd needs a tcp: or unix: URI: each channel connects to the destination on its own"
            }
            if let refusal {
                fail(refusal)
                throw MigrationError(refusal)
            }
        }
        let connection: MigrationConnection
        let tls: TLSClientSettings?
        do {
            tls = try outgoingTLS(to: parsed)
            connection = try MigrationConnection.connect(parsed, tls: tls, descriptorNamed: descriptorNamed)
        } catch {
            fail(error.message)
            throw MigrationError(error.message)
        }
        if let session = connection.io as? TLSSession {
            log("TLS: connected to the destination and accepted by it (\(session.agreement))")
        }
        if capability(.postcopyRAM) && !isSocket(connection.descriptor) {
            // Postcopy's page requests need a return path, which only a socket carries.
            _ = connection.close()
            fail("Unable to open return-path for postcopy")
            throw MigrationError("Unable to open return-path for postcopy")
        }
        let plan = state.withLock { state in
            state.connection = connection
            state.switchoverCommitted = false
            var plan = MigrationPlan(capabilities: state.capabilities, parameters: state.parameters, xbzrleCacheSize: state.xbzrleCacheSize)
            if state.capabilities[.multifd] == true { plan.multifd = (parsed, Int(state.parameters.multifdChannels)) }
            plan.blockMode = inc ? .incremental : blk ? .full : .shared
            plan.tls = tls
            return plan
        }
        let outgoing = OutgoingMigration(machine: machine, controller: self, connection: connection, plan: plan)
        let thread = Thread {
            outgoing.run()
            self.state.withLock { $0.connection = nil }
        }
        thread.name = "migration"
        thread.start()
    }

    /// The TLS the source's connections to `uri` use, from `tls-creds` and `tls-hostname` (nil: none).
    private func outgoingTLS(to uri: MigrationURI) throws(MigrationStreamError) -> TLSClientSettings? {
        let parameters = state.withLock { $0.parameters }
        return try tlsObjects.clientSettings(credentials: parameters.tlsCreds, hostname: parameters.tlsHostname, uri: uri)
    }

    private func fail(_ reason: String) {
        state.withLock { $0.statistics.errorDescription = reason }
        transition(from: .setup, to: .failed)
    }

    /// `migrate_cancel`: a migration in setup or active moves to cancelling, and its channel
    /// is shut down so a write stuck on a dead peer returns at once. After the switchover to
    /// postcopy the guest runs on the destination, so there is nothing to go back to: refused.
    public func cancel() throws(MigrationError) {
        let current = status
        if current.isPostcopy {
            throw MigrationError("Postcopy has started: the guest runs on the destination and cannot be cancelled")
        }
        guard current == .setup || current == .active else { return }
        if transition(from: current, to: .cancelling) {
            let (connection, committed) = state.withLock { ($0.connection, $0.switchoverCommitted) }
            if committed {
                log("migrate_cancel came after the last record was sent: the destination's verdict decides")
            } else {
                connection?.shutdownIO()
            }
        }
    }

    /// The migration thread is about to send its last record: from here a cancel neither cuts
    /// the connection nor stops the migration (the destination loads and runs the guest once it
    /// has END, so the source must follow its verdict, or both would run it). False if a cancel
    /// came first.
    func commitSwitchover() -> Bool {
        state.withLock { state in
            guard state.statistics.status == .active else { return false }
            state.switchoverCommitted = true
            return true
        }
    }

    // MARK: postcopy

    /// `migrate-start-postcopy`, with the reference's checks and texts. A migration that has
    /// already ended is not an error (that would race with the command).
    public func startPostcopy() throws(MigrationError) {
        try state.withLock { (state) throws(MigrationError) in
            guard state.capabilities[.postcopyRAM] == true else {
                throw MigrationError("Enable postcopy with migration_set_capability before the start of migration")
            }
            guard state.statistics.status != .none else {
                throw MigrationError("Postcopy must be started after migration has been started")
            }
            state.postcopyRequested = true
        }
    }

    var postcopyRequested: Bool { state.withLock { $0.postcopyRequested } }

    /// `migrate-pause`: breaks the connection of a postcopy on purpose (a stalled peer), so both
    /// sides go to postcopy-paused and can be resumed elsewhere.
    public func pausePostcopy() throws(MigrationError) {
        if status == .postcopyActive {
            state.withLock { $0.connection }?.shutdownIO()
            return
        }
        let incoming = state.withLock { ($0.incoming.status, $0.incomingConnection) }
        guard incoming.0 == .postcopyActive, let connection = incoming.1 else {
            throw MigrationError("migrate-pause is currently only supported during postcopy-active state")
        }
        connection.shutdownIO()
    }

    /// `migrate` with `resume: true`: a new connection for a postcopy paused by a broken link.
    private func resumePostcopy(uri: String) throws(MigrationError) {
        guard status == .postcopyPaused else { throw MigrationError("Cannot resume if there is no paused migration") }
        let connection: MigrationConnection
        do {
            let parsed = try MigrationURI(parsing: uri)
            connection = try MigrationConnection.connect(parsed, tls: try outgoingTLS(to: parsed), descriptorNamed: descriptorNamed)
        } catch {
            throw MigrationError(error.message)
        }
        guard isSocket(connection.descriptor) else {
            _ = connection.close()
            throw MigrationError("Unable to open return-path for postcopy")
        }
        guard transition(from: .postcopyPaused, to: .postcopyRecover) else {
            _ = connection.close()
            throw MigrationError("Cannot resume if there is no paused migration")
        }
        state.withLock { $0.connection = connection }
        resumeHandoff.offer(connection)
    }

    /// The source thread, paused: blocks until `migrate ... resume` connects.
    func waitForResumeConnection() -> MigrationConnection {
        state.withLock { $0.connection = nil }
        return resumeHandoff.wait()
    }

}
