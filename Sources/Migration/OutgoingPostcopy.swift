import Foundation
import Machine

/// The source after the switchover to postcopy (QEMU's postcopy_start and the loop after it):
/// the guest stops, the destination learns which pages it must drop, the device state goes as
/// one package closed by POSTCOPY_RUN, and the destination runs the guest. The source then
/// serves page requests first and streams what is left behind them, keeping the socket's send
/// queue short so a request never waits behind much background data. A broken connection is
/// not the end: both sides pause, and `migrate ... resume` carries on with what the
/// destination still lacks.
extension OutgoingMigration {
    /// How much unsent background data may sit in the socket before a request (bytes).
    static let postcopySendQueueLimit: Int32 = 64 << 10
    /// The most background data written between two looks at the request queue.
    static let postcopyBackgroundChunk: UInt64 = 64 << 10
    /// DISCARD runs per record (16 bytes each, within the record size limit).
    static let discardRunsPerRecord = 65_536

    /// Switches over and streams the rest; returns whether the guest was running when stopped.
    func runPostcopy() throws(LoopFailure) -> Bool {
        guard controller.transition(from: .active, to: .postcopyActive) else { throw LoopFailure(message: "cancelled") }
        stats.enteredPostcopy = true
        // As before a pre-copy switchover, so the destination reaches POSTCOPY_RUN soon after
        // the stop instead of first working through a backlog.
        drainBeforeStop()
        let stopTime = WallClock.monotonicMilliseconds()
        let wasRunning = machine.pause(to: .finishMigrate)
        let stoppedAt = WallClock.nanoseconds()
        endThrottles() // the source guest stays stopped
        var lacking: UInt64 = 0
        do throws(MigrationStreamError) {
            for (index, section) in sections.enumerated() {
                if let postcopyable = section as? PostcopyLiveSection {
                    let runs = try postcopyable.beginPostcopy()
                    lacking += runs.reduce(0) { $0 + UInt64($1.pages) }
                    writeDiscard(runs)
                } else {
                    try section.complete(SectionStream(writer: writer, id: UInt16(index)), SwitchoverContext(guestWasRunning: wasRunning))
                }
                if let error = writer.error { throw error }
            }
            writer.record(.sourceStopped, required: false) { $0.append(stoppedAt) }
            writer.record(.postcopyRun, required: true) { $0.append(lacking) }
            writer.flush()
            if let error = writer.error { throw error }
        } catch {
            // POSTCOPY_RUN goes last, and a failed write means it never arrived whole: the
            // destination has not started the guest, so it may run on here.
            throw LoopFailure(message: error.message, stoppedGuestWasRunning: wasRunning)
        }
        stats.downtime = WallClock.monotonicMilliseconds() - stopTime
        postcopyStart = bytesOnEarlierConnections + writer.position
        controller.log("postcopy: the guest ran on the destination after \(stats.downtime ?? 0) ms; \(lacking) pages follow")
        flushStatistics()
        try streamRemainingPages(guestWasRunning: wasRunning)
        return wasRunning
    }

    private func writeDiscard(_ runs: [ReturnPathMessage.PageRun]) {
        var index = 0
        while index < runs.count {
            let chunk = runs[index..<min(index + Self.discardRunsPerRecord, runs.count)]
            writer.record(.discard, required: true) { writer in
                writer.append(UInt32(chunk.count))
                for run in chunk {
                    writer.append(run.offset)
                    writer.append(UInt64(run.pages) * MigrationStreamFormat.pageSize)
                }
            }
            index += chunk.count
        }
    }

    private var postcopySections: [(index: Int, section: PostcopyLiveSection)] {
        sections.enumerated().compactMap { item in (item.element as? PostcopyLiveSection).map { (item.offset, $0) } }
    }

    /// Requests first, background behind them, END once nothing is left, then the verdict.
    private func streamRemainingPages(guestWasRunning: Bool) throws(LoopFailure) {
        var limiter = RateLimiter(bandwidth: postcopyBandwidth, now: WallClock.monotonicMilliseconds(), position: writer.position)
        var endSent = false
        while true {
            if !endSent, let refusal = returnPath?.earlyFailure {
                // A destination sends FAILED only if it never started the guest (once it has,
                // it pauses instead), so the guest is still whole here and runs on.
                throw LoopFailure(message: "the destination failed to load the migration: \(refusal)",
                                  stoppedGuestWasRunning: guestWasRunning)
            }
            if let reason = brokenLink() {
                if endSent, case .loaded? = returnPath?.waitForVerdict(seconds: 0) {
                    sections.forEach { $0.report(into: &stats) }
                    return // the destination confirmed, then closed: done
                }
                if !endSent, let refusal = returnPath?.earlyFailure { // it came just before the close
                    throw LoopFailure(message: "the destination failed to load the migration: \(refusal)",
                                      stoppedGuestWasRunning: guestWasRunning)
                }
                try pauseUntilResumed(reason)
                limiter = RateLimiter(bandwidth: postcopyBandwidth, now: WallClock.monotonicMilliseconds(), position: writer.position)
                endSent = false
                continue
            }
            guard let returnPath else { throw LoopFailure(message: "Unable to open return-path for postcopy") }
            let requests = returnPath.takeRequests()
            for request in requests {
                for (index, section) in postcopySections {
                    try? section.sendRequested(SectionStream(writer: writer, id: UInt16(index)),
                                               offset: request.offset, length: UInt64(request.length))
                }
            }
            if !requests.isEmpty {
                stats.postcopyRequests += UInt64(requests.count)
                writer.flush()
            }
            if endSent {
                if let verdict = returnPath.waitForVerdict(seconds: 0.1) {
                    if case let .failed(reason) = verdict {
                        throw LoopFailure(message: "the destination failed to load the migration: \(reason)")
                    }
                    sections.forEach { $0.report(into: &stats) }
                    return
                }
                continue
            }
            if requests.isEmpty && postcopySections.allSatisfy({ $0.section.passComplete }) {
                let records = writer.recordsWritten
                writer.record(.end, required: true) { $0.append(records) }
                writer.flush()
                endSent = true
                continue
            }
            if !limiter.isExhausted(position: writer.position) && connection.sendQueueBytes < Self.postcopySendQueueLimit {
                let budget = min(limiter.allowance(position: writer.position), Self.postcopyBackgroundChunk)
                if let (index, section) = postcopySections.first(where: { !$0.section.passComplete }) {
                    try? section.iterate(SectionStream(writer: writer, id: UInt16(index)), budget: budget)
                }
                writer.flush()
            } else {
                returnPath.waitForMessage(seconds: 0.001) // a request wakes this at once
            }
            if let window = limiter.closeWindowIfElapsed(now: WallClock.monotonicMilliseconds(), position: writer.position) {
                windowClosedWith(window)
                limiter.limitPerWindow = RateLimiter.limit(for: postcopyBandwidth)
            }
        }
    }

    /// `max-postcopy-bandwidth`, 0 meaning unlimited as in QEMU.
    private var postcopyBandwidth: UInt64 {
        let limit = controller.parameters.maxPostcopyBandwidth
        return limit == 0 ? UInt64(Int64.max) : limit
    }

    /// Why the connection can no longer carry the postcopy, if it cannot.
    private func brokenLink() -> String? {
        if let error = writer.error { return error.message }
        if let bad = returnPath?.protocolError { return "the destination sent a bad return-path message: \(bad)" }
        if returnPath?.isClosed ?? true { return "the destination closed the connection" }
        return nil
    }

    /// postcopy-paused until `migrate ... resume` brings a connection on which the destination
    /// says what it still lacks; then postcopy-active again with exactly those pages to send.
    private func pauseUntilResumed(_ first: String) throws(LoopFailure) {
        var reason = first
        while true {
            stats.errorDescription = reason
            flushStatistics()
            _ = controller.transition(from: controller.status, to: .postcopyPaused)
            controller.log("postcopy paused: \(reason); the source keeps the guest's pages; resume with migrate and resume=true")
            connection.shutdownIO()
            returnPath?.waitUntilClosed()
            _ = connection.close()
            bytesOnEarlierConnections += writer.position
            let fresh = controller.waitForResumeConnection()
            connection = fresh
            writer = MigrationStreamWriter(io: fresh.io)
            writer.checksums = plan.checksums
            writeStreamHeader()
            writer.record(.resume, required: true) { [machine] writer in
                writer.append(machine.memory.size)
                writer.append(UInt32(MigrationStreamFormat.pageSize))
            }
            writer.flush()
            let listener = ReturnPathListener(io: fresh.io, ramSize: machine.memory.size, log: controller.log)
            listener.start()
            returnPath = listener
            guard writer.error == nil, let lacking = listener.waitForLacking(seconds: 30) else {
                reason = "resuming failed: " + (listener.protocolError ?? writer.error?.message ?? "the destination did not say which pages it lacks")
                continue
            }
            for (_, section) in postcopySections { section.resume(lacking: lacking) }
            stats.errorDescription = nil
            flushStatistics()
            _ = controller.transition(from: .postcopyRecover, to: .postcopyActive)
            controller.log("postcopy resumed: the destination lacks \(lacking.reduce(0) { $0 + UInt64($1.pages) }) pages")
            return
        }
    }
}
