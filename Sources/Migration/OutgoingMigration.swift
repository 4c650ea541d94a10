import Foundation
import KVM
import Machine

/// The source side: one thread that runs the live sections (RAM, device state) through
/// QEMU's migration loop and ends the migration as completed, failed or cancelled.
///
/// The loop: within each 100 ms window's allowance, let the sections iterate; measure the
/// bandwidth per window; at the end of each pass sync the sections' dirty tracking, tell the
/// pass observers (auto-converge), and ask the convergence policy whether to switch over;
/// then stop the vCPUs, let every section complete, and, where the connection has a return
/// path, wait for the destination to confirm the load before declaring success. Any failure
/// before that confirmation restarts the source guest.
final class OutgoingMigration: @unchecked Sendable {
    // Sendable: run entirely on its own thread; shared results go through the controller.
    let machine: Machine
    let controller: MigrationController
    var connection: MigrationConnection
    var writer: MigrationStreamWriter
    let plan: MigrationPlan
    var sections: [OutgoingLiveSection] = []
    var observers: [PassObserver] = []
    private var autoConverge: AutoConverge?
    var returnPath: ReturnPathListener?
    var stats = MigrationStatistics()
    private var policy = ConvergencePolicy()
    /// Bytes written on connections that postcopy recovery has replaced.
    var bytesOnEarlierConnections: UInt64 = 0
    private var drainPings: UInt32 = 0
    var forecaster = MigrationForecaster(now: WallClock.monotonicMilliseconds())
    var ladder: EscalationLadder?
    var lastWindowPageBytes: UInt64 = 0
    /// The throttle SLO escalation holds, in percent.
    var escalationThrottle = 0
    private var lastPassDirtied: UInt64 = 0
    /// The pass whose dirty rate was sampled mid-pass (none yet: .max).
    var sampledPass: UInt64 = .max
    /// When the dirty log was last sampled mid-pass (monotonic ms).
    var lastDirtySample: UInt64 = 0
    /// The stream position when postcopy's guest started on the destination.
    var postcopyStart: UInt64?
    /// The multifd channels, with the `multifd` capability.
    var multifd: MultifdSender?
    private var multifdSyncs: UInt32 = 0
    /// How long the source waits at the end for the destination's verdict.
    static let verdictTimeoutSeconds = 30.0

    init(machine: Machine, controller: MigrationController, connection: MigrationConnection, plan: MigrationPlan) {
        self.machine = machine
        self.controller = controller
        self.connection = connection
        self.plan = plan
        self.writer = MigrationStreamWriter(io: connection.io)
        writer.checksums = plan.checksums
    }

    /// The thread body.
    func run() {
        machine.waitUntilStarted() // a monitor may ask before the vCPU threads exist
        let setupStart = WallClock.monotonicMilliseconds()
        stats = controller.statistics
        stats.total = machine.memory.size
        do {
            try setUp()
        } catch {
            finish(failure: error.message, stopped: nil)
            return
        }
        stats.setupTime = WallClock.monotonicMilliseconds() - setupStart
        forecaster = MigrationForecaster(now: WallClock.monotonicMilliseconds())
        forecaster.memorySize = machine.memory.size
        stats.expectedDowntime = controller.parameters.downtimeLimit
        flushStatistics()
        guard controller.transition(from: .setup, to: .active) else {
            finish(failure: nil, stopped: nil)
            return
        }
        do throws(LoopFailure) {
            let wasRunning = try iterateUntilConverged()
            finish(failure: nil, stopped: wasRunning)
        } catch {
            finish(failure: error.message, stopped: error.stoppedGuestWasRunning)
        }
    }

    /// A failure of the loop, and whether it had stopped the guest (and so must restart it).
    struct LoopFailure: Error {
        var message: String
        var stoppedGuestWasRunning: Bool?
    }

    private func setUp() throws(MigrationStreamError) {
        ladder = Self.ladder(controller.parameters, postcopy: plan.postcopy, cacheSize: controller.xbzrleCacheSize)
        var ramSettings = plan.ramSettings(controller)
        if ladder != nil {
            // Escalation may turn encoders on later: the destination must know them from the start.
            ramSettings.mayAdd = [.xbzrle, controller.parameters.compressionMethod == .zstd ? .zstd : .zlib]
            ramSettings.probeSavings = true
        }
        // With XBZRLE on, the forecast prices re-sends at the deltas the probe measures.
        if ramSettings.xbzrleCacheSize != nil { ramSettings.probeSavings = true }
        let ram = try OutgoingRAMSection(machine: machine, settings: ramSettings, log: controller.log)
        // The disks' section goes only with disks, so a disk-less stream is what it always was.
        let block: [OutgoingLiveSection] = machine.disks.isEmpty ? []
            : [OutgoingBlockSection(machine: machine, mode: plan.blockMode, zeroBlocks: plan.zeroBlocks)]
        sections = [ram] + block + [OutgoingDeviceStateSection(machine: machine)]
        if let settings = plan.autoConverge {
            let converge = AutoConverge(settings: settings) { [machine, controller] percent in
                controller.log(percent > 0 ? "auto-converge: vCPUs throttled to \(percent)%" : "auto-converge: throttle off")
                machine.setCPUThrottle(percent: percent)
            }
            autoConverge = converge
            observers.append(converge)
        }
        let hasReturnPath = isSocket(connection.descriptor)
        writeStreamHeader()
        let configuration = StreamConfiguration(
            ramSize: machine.memory.size, cpuCount: UInt32(machine.configuration.cpuCount),
            deviceSections: machine.stateSectionNames, capabilities: plan.capabilities,
            encodings: sections.flatMap(\.encodings),
            sections: sections.enumerated().map { .init(id: UInt16($0.offset), name: $0.element.name, version: $0.element.version) },
            returnPath: hasReturnPath)
        writer.record(.configuration, required: true) { configuration.encode(into: $0) }
        if hasReturnPath {
            let listener = ReturnPathListener(io: connection.io, ramSize: machine.memory.size, log: controller.log)
            listener.start()
            returnPath = listener
            writer.record(.ping, required: false) { $0.append(UInt32(1)) }
        }
        if let setup = plan.multifd {
            // The destination learns the channel count and session before the channels connect
            // (after the return path, so that a refusal reaches the user with its reason).
            let session = UInt64.random(in: 1...UInt64.max)
            writer.record(.multifdSetup, required: true) {
                $0.append(UInt32(setup.channels))
                $0.append(session)
            }
            writer.flush()
            if let error = writer.error { throw error }
            let sender = try MultifdSender(uri: setup.uri, count: setup.channels, session: session, ramSection: 0,
                                           checksums: plan.checksums, tls: plan.tls)
            multifd = sender
            ram.useMultifd(sender)
            controller.log("multifd: \(setup.channels) channels connected")
        }
        for (index, section) in sections.enumerated() {
            try section.setup(SectionStream(writer: writer, id: UInt16(index)))
        }
        if let error = writer.error { throw error }
    }

    /// Iterates until the policy says switch over, then completes. Returns whether the guest was
    /// running when it was stopped.
    private func iterateUntilConverged() throws(LoopFailure) -> Bool {
        var limiter = RateLimiter(bandwidth: controller.parameters.maxBandwidth,
                                  now: WallClock.monotonicMilliseconds(), position: position)
        var windowClosed = false
        let activeStart = WallClock.monotonicMilliseconds()
        while controller.status == .active {
            if let refusal = returnPath?.earlyFailure {
                throw LoopFailure(message: "the destination refused the migration: \(refusal)")
            }
            if let bad = returnPath?.protocolError {
                throw LoopFailure(message: "the destination sent a bad return-path message: \(bad)")
            }
            if let failure = multifd?.error { throw LoopFailure(message: failure) }
            if plan.postcopy {
                _ = returnPath?.takeRequests() // before the switchover every page is on its way anyway
                if controller.postcopyRequested {
                    return try runPostcopy()
                }
            }
            if !limiter.isExhausted(position: position) {
                var switchOver = false
                if sections.allSatisfy(\.passComplete) {
                    // A pass is done: sync, then apply the downtime test to what is left.
                    do throws(MigrationStreamError) { try endPass() } catch { throw LoopFailure(message: error.message) }
                    if !windowClosed {
                        // No 100 ms window has closed yet: estimate the bandwidth from the
                        // stream so far, so a small guest neither waits nor spins on syncs.
                        let elapsed = max(WallClock.monotonicMilliseconds() - activeStart, 1)
                        policy.bandwidthMeasured(bytesPerMillisecond: position / elapsed,
                                                 downtimeLimitNanoseconds: downtimeLimitNanoseconds)
                    }
                    switchOver = policy.shouldSwitchOver(pending: pending.total, passes: Int(stats.dirtySyncCount))
                    if !switchOver && forecastPass(dirtied: lastPassDirtied, pending: pending.total) == .startPostcopy {
                        return try runPostcopy()
                    }
                    guard controller.status == .active else { break }
                    if !switchOver && plan.postcopy && plan.postcopyAfterPasses > 0
                        && stats.dirtySyncCount >= UInt64(plan.postcopyAfterPasses) {
                        controller.log("pre-copy has not converged after \(stats.dirtySyncCount) passes: switching to postcopy")
                        return try runPostcopy()
                    }
                }
                if switchOver {
                    drainBeforeStop()
                    return try switchOverAndComplete()
                }
                let budget = limiter.allowance(position: position)
                for (index, section) in sections.enumerated() where !section.passComplete {
                    do throws(MigrationStreamError) {
                        try section.iterate(SectionStream(writer: writer, id: UInt16(index)), budget: budget)
                    } catch {
                        throw LoopFailure(message: error.message)
                    }
                    break // one section per round, in order, as QEMU's iterate does
                }
            }
            if let error = writer.error { throw LoopFailure(message: error.message) }
            let now = WallClock.monotonicMilliseconds()
            if let window = limiter.closeWindowIfElapsed(now: now, position: position) {
                windowClosed = true
                // The forecast first, so that the statistics the window publishes carry it.
                if try forecastWindow(window, pending: pending.total) == .startPostcopy {
                    return try runPostcopy()
                }
                windowClosedWith(window)
                limiter.limitPerWindow = RateLimiter.limit(for: controller.parameters.maxBandwidth)
            }
            if limiter.isExhausted(position: position) {
                writer.flush() // nothing waits in the buffer while the window sleeps
                usleep(UInt32(max(limiter.millisecondsLeft(now: now), 1) * 1000))
            }
        }
        throw LoopFailure(message: "cancelled")
    }

    /// The magic and version every connection's stream begins with.
    func writeStreamHeader() {
        writer.appendHeader(MigrationStreamFormat.magic + withUnsafeBytes(of: MigrationStreamFormat.version.littleEndian) { Array($0) })
    }

    /// Lets the backlog reach the destination and be loaded there while the guest still runs;
    /// the few pages dirtied meanwhile go in the final copy. With a return path a PING's PONG
    /// says the destination has read everything before it (on loopback the send queue empties
    /// into the peer's receive queue at once, so it alone says little); else the send queue.
    func drainBeforeStop() {
        writer.flush()
        connection.waitForSendQueue(below: 256 << 10, timeout: 0.5)
        guard let returnPath, returnPath.isAlive else { return }
        drainPings &+= 1
        let value = 0x4452_0000 | drainPings // "DR": tells these from setup's PING 1
        writer.record(.ping, required: false) { $0.append(value) }
        writer.flush()
        _ = returnPath.waitForPong(value, seconds: 1)
    }

    private var pending: PendingBytes { sections.reduce(PendingBytes()) { $0 + $1.pending } }

    func windowClosedWith(_ window: (bytes: UInt64, milliseconds: UInt64)) {
        let bandwidth = window.milliseconds > 0 ? window.bytes / window.milliseconds : 0 // bytes per ms
        policy.bandwidthMeasured(bytesPerMillisecond: bandwidth, downtimeLimitNanoseconds: downtimeLimitNanoseconds)
        stats.mbps = window.milliseconds > 0 ? Double(window.bytes) * 8 / (Double(window.milliseconds) / 1000) / 1_000_000 : 0
        let dirtyRate = stats.dirtyPagesRate * MigrationStreamFormat.pageSize // as the sections last reported it
        if dirtyRate > 0 && window.bytes > 10_000 && bandwidth > 0 {
            stats.expectedDowntime = dirtyRate / bandwidth
        }
        flushStatistics()
    }

    /// Syncs every section's dirty tracking and tells the observers.
    private func endPass() throws(MigrationStreamError) {
        try syncChannels()
        var dirtied: UInt64 = 0
        let syncStart = WallClock.monotonicNanoseconds()
        for section in sections { dirtied += try section.beginPass() }
        // The switchover repeats this sync with the guest stopped: the forecast counts it in.
        forecaster.syncMeasured(nanoseconds: WallClock.monotonicNanoseconds() - syncStart)
        lastPassDirtied = dirtied
        stats.dirtySyncCount += 1
        controller.passCompleted(Int(stats.dirtySyncCount))
        writer.record(.passEnd, required: false) { $0.append(UInt32(truncatingIfNeeded: self.stats.dirtySyncCount)) }
        sections.forEach { $0.report(into: &stats) }
        let report = PassReport(now: WallClock.monotonicMilliseconds(), dirtiedBytes: dirtied,
                                transferredBytes: position, pagesSent: pagesSent, passes: Int(stats.dirtySyncCount))
        observers.forEach { $0.passEnded(report) }
    }

    private var pagesSent: UInt64 {
        stats.normal + stats.duplicate + (stats.xbzrle?.pages ?? 0) + (stats.compression?.pages ?? 0)
    }

    /// The vCPUs stop; every section sends what is left; the destination confirms.
    private func switchOverAndComplete() throws(LoopFailure) -> Bool {
        let stopTime = WallClock.monotonicMilliseconds()
        let wasRunning = machine.pause(to: .finishMigrate)
        let stoppedAt = WallClock.nanoseconds()
        endThrottles() // the guest is stopped: no throttle on resume
        do throws(MigrationStreamError) {
            for (index, section) in sections.enumerated() {
                try section.complete(SectionStream(writer: writer, id: UInt16(index)), SwitchoverContext(guestWasRunning: wasRunning))
                if let error = writer.error { throw error }
                guard controller.status == .active else { throw MigrationStreamError("cancelled") }
            }
            try syncChannels()
            guard controller.commitSwitchover() else { throw MigrationStreamError("cancelled") }
            writer.record(.sourceStopped, required: false) { $0.append(stoppedAt) }
            let records = writer.recordsWritten
            writer.record(.end, required: true) { $0.append(records) }
            writer.flush()
            if let error = writer.error { throw error }
            if let failure = multifd?.finish() { throw MigrationStreamError(failure) }
        } catch {
            throw LoopFailure(message: error.message, stoppedGuestWasRunning: wasRunning)
        }
        stats.downtime = WallClock.monotonicMilliseconds() - stopTime
        sections.forEach { $0.report(into: &stats) }
        if let returnPath {
            switch returnPath.waitForVerdict(seconds: Self.verdictTimeoutSeconds) {
            case .loaded?:
                break
            case let .failed(reason)?:
                throw LoopFailure(message: "the destination failed to load the migration: \(reason)", stoppedGuestWasRunning: wasRunning)
            default:
                if returnPath.isAlive {
                    throw LoopFailure(message: "the destination did not confirm that it loaded the migration",
                                      stoppedGuestWasRunning: wasRunning)
                }
                controller.log("the destination sent no return-path messages; completing without its confirmation")
            }
        }
        return wasRunning
    }

    /// Ends the migration as completed (when `failure` is nil and the guest was stopped for it),
    /// failed or cancelled; restarts the guest if this migration stopped it and did not complete.
    private func finish(failure: String?, stopped wasRunning: Bool?) {
        var failure = failure
        if failure != nil, let returnPath, case let .failed(reason)? = returnPath.waitForVerdict(seconds: 1) {
            // A destination that refuses the stream closes the connection, so the source's
            // writes may fail first; its reason is what the user needs to see.
            failure = (stats.downtime == nil && wasRunning == nil ? "the destination refused the migration: "
                       : "the destination failed to load the migration: ") + reason
        }
        if failure != nil || controller.status == .cancelling { multifd?.abort() }
        flushStatistics()
        endThrottles() // the throttle ends with the migration
        sections.forEach { $0.cleanup() }
        if let returnPath {
            connection.shutdownIO()
            returnPath.waitUntilClosed()
        }
        let closeError = connection.close()
        let status = controller.status
        // A cancel after the last record was sent (.cancelling here) is too late to stop it:
        // the destination has confirmed and may run the guest already.
        if failure == nil && closeError == nil && (status == .active || status == .postcopyActive || status == .cancelling)
            && stats.downtime != nil {
            stats.totalTime = WallClock.milliseconds() - stats.startMilliseconds
            stats.remaining = 0
            stats.dirtyPagesRate = 0
            if let total = stats.totalTime, total > 0 {
                // Every byte sent, the multifd channels' too: the same count as `transferred`.
                stats.mbps = Double(bytesOnEarlierConnections + position) * 8 / Double(total) / 1000
            }
            machine.setStoppedState(.postmigrate)
            flushStatistics()
            _ = controller.transition(from: status, to: .completed)
            return
        }
        if let wasRunning { machine.endFailedSwitchover(resume: wasRunning) }
        if status == .cancelling {
            flushStatistics()
            _ = controller.transition(from: .cancelling, to: .cancelled)
        } else {
            stats.errorDescription = failure ?? closeError?.message ?? "the migration ended unexpectedly"
            flushStatistics()
            _ = controller.transition(from: status, to: .failed)
        }
    }

    /// Auto-converge's and SLO escalation's throttles end with pre-copy.
    func endThrottles() {
        observers.forEach { $0.migrationEnded() }
        if escalationThrottle > 0 {
            machine.setCPUThrottle(percent: 0)
            controller.log("SLO escalation: throttle off")
            escalationThrottle = 0
        }
    }

    /// Bytes put on the wire: the main stream's and the multifd channels'.
    var position: UInt64 { writer.position + (multifd?.bytesQueued ?? 0) }

    /// The end of a pass, or of the last copy, on the multifd channels and the main stream.
    private func syncChannels() throws(MigrationStreamError) {
        guard let multifd else { return }
        if let failure = multifd.error { throw MigrationStreamError(failure) }
        multifdSyncs += 1
        multifd.sync(multifdSyncs)
        writer.record(.multifdSync, required: true) { $0.append(self.multifdSyncs) }
        // Now, not when the buffer fills: the destination's channels wait at this mark for the
        // main stream, and the next pass's pages wait behind them.
        writer.flush()
    }

    func flushStatistics() {
        stats.transferred = bytesOnEarlierConnections + position
        if let postcopyStart { stats.postcopyBytes = stats.transferred - postcopyStart }
        // Frozen once a pre-copy completes; postcopy counts down after its switchover.
        if stats.downtime == nil || stats.enteredPostcopy { sections.forEach { $0.report(into: &stats) } }
        stats.cpuThrottlePercentage = max(autoConverge?.throttle ?? 0, escalationThrottle)
        stats.cpuThrottleMaximum = max(autoConverge?.maximumReached ?? 0, stats.cpuThrottleMaximum, escalationThrottle)
        controller.update(stats)
    }
}
