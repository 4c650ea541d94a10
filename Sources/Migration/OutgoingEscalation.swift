import Foundation
import Machine

/// The source's forecast and SLO escalation (docs/qmp.md, "Forecast and SLO"): the forecast is
/// refreshed at every window and pass; with an SLO set, each pass end may take the next
/// escalation step, and a window near the end of the budget switches to postcopy or cancels.
extension OutgoingMigration {
    enum EscalationOutcome { case carryOn, startPostcopy }

    /// The downtime the switchover test allows: the SLO's target where one is set.
    var downtimeLimitNanoseconds: UInt64 {
        let parameters = controller.parameters
        return parameters.sloDowntime > 0 ? parameters.sloDowntime * 1_000_000 : parameters.downtimeLimitNanoseconds
    }

    private var elapsed: UInt64 { WallClock.milliseconds() - stats.startMilliseconds }

    private var pageBytesSent: UInt64 {
        (stats.normal + (stats.xbzrle?.pages ?? 0) + (stats.compression?.pages ?? 0)) * MigrationStreamFormat.pageSize
    }

    private func refreshForecast(pending: UInt64) {
        if let ram = sections.compactMap({ $0 as? OutgoingRAMSection }).first, ram.usesXBZRLE,
           let ratio = ram.savings?.xbzrleRatio {
            forecaster.resendCost = ratio
        }
        forecaster.autoConverge = plan.autoConverge
        forecaster.throttleNow = machine.cpuThrottlePercent
        stats.forecast = forecaster.forecast(now: WallClock.monotonicMilliseconds(), pending: pending,
                                             passesDone: Int(stats.dirtySyncCount),
                                             downtimeLimit: downtimeLimitNanoseconds / 1_000_000)
    }

    /// A 100 ms window closed during pre-copy.
    func forecastWindow(_ window: (bytes: UInt64, milliseconds: UInt64), pending: UInt64) throws(LoopFailure) -> EscalationOutcome {
        sections.forEach { $0.report(into: &stats) } // the page counts as of now
        let sent = pageBytesSent
        forecaster.windowMeasured(pageBytes: sent - min(sent, lastWindowPageBytes), wireBytes: window.bytes,
                                  milliseconds: window.milliseconds)
        lastWindowPageBytes = sent
        try sampleDirtyRateIfLongPass(pending: pending)
        refreshForecast(pending: pending)
        guard ladder != nil else { return .carryOn }
        switch ladder!.windowClosed(elapsed: elapsed, expectedDowntime: stats.forecast?.expectedDowntimeMilliseconds ?? 0) {
        case .postcopy:
            escalated(.postcopy, "the total-time budget is about to run out")
            return .startPostcopy
        case let .cancel(reason):
            cancelForSLO(reason)
        default:
            break
        }
        return .carryOn
    }

    /// A quarter second into a pass that will last a second or more, sample the dirty log: the
    /// rate at which distinct pages are dirtied now, before the pass saturates. A long pass is
    /// sampled again every second, so that the XBZRLE probe sees pages dirtied twice long before
    /// the pass ends (in a 64 MiB/s migration of 512 MiB the first pass is most of it).
    private func sampleDirtyRateIfLongPass(pending: UInt64) throws(LoopFailure) {
        let now = WallClock.monotonicMilliseconds()
        let firstSample = sampledPass != stats.dirtySyncCount
        let since = firstSample ? forecaster.currentPassStart : lastDirtySample
        let interval = now - min(now, since)
        // At least a throttle period, so that the sample holds the guest's share of running.
        guard interval >= max(firstSample ? 250 : 1000, machine.cpuThrottlePeriodMilliseconds),
              forecaster.bandwidth > 0,
              Double(pending) / forecaster.bandwidth >= 750,
              let ram = sections.compactMap({ $0 as? OutgoingRAMSection }).first else { return }
        sampledPass = stats.dirtySyncCount
        lastDirtySample = now
        do {
            let pages = try ram.sampleDirtyPages()
            forecaster.dirtySampled(bytes: UInt64(pages) * MigrationStreamFormat.pageSize, milliseconds: interval,
                                    throttle: machine.cpuThrottlePercent)
        } catch {
            throw LoopFailure(message: error.message)
        }
    }

    /// A pass ended during pre-copy (and the switchover test said go on).
    func forecastPass(dirtied: UInt64, pending: UInt64) -> EscalationOutcome {
        forecaster.passEnded(now: WallClock.monotonicMilliseconds(), dirtied: dirtied, throttle: machine.cpuThrottlePercent)
        refreshForecast(pending: pending)
        guard ladder != nil, let forecast = stats.forecast else { return .carryOn }
        let ram = sections.compactMap { $0 as? OutgoingRAMSection }.first
        let (action, reason) = ladder!.passEnded(forecast, elapsed: elapsed, savings: ram?.savings)
        let parameters = controller.parameters
        switch action {
        case .none:
            break
        case .enable(.xbzrle):
            if ram?.enableXBZRLE(cacheSize: controller.xbzrleCacheSize) == true {
                escalated(.xbzrle, "XBZRLE on (\(controller.xbzrleCacheSize >> 20) MiB cache): \(reason)")
            }
        case .enable(_):
            let method: CompressionMethod = parameters.compressionMethod == .zstd ? .zstd : .zlib
            if ram?.enableCompression(method: method, level: Int(parameters.compressLevel), threads: Int(parameters.compressThreads)) == true {
                escalated(.compress, "\(method == .zstd ? "zstd" : "zlib") compression on: \(reason)")
            }
        case let .throttle(percent):
            machine.setCPUThrottle(percent: percent)
            escalationThrottle = percent
            escalated(.throttle, "vCPUs throttled to \(percent)%: \(reason)")
        case .postcopy:
            escalated(.postcopy, "switching to postcopy: \(reason)")
            return .startPostcopy
        case let .cancel(reason):
            cancelForSLO(reason)
        }
        return .carryOn
    }

    private func escalated(_ step: EscalationStep, _ detail: String) {
        let escalation = Escalation(step: step, detail: detail, at: elapsed)
        stats.escalations.append(escalation)
        flushStatistics()
        controller.escalated(escalation)
    }

    /// Cancels as migrate_cancel would, with the reason kept for `query-migrate`.
    private func cancelForSLO(_ reason: String) {
        escalated(.cancel, "cancelled: \(reason)")
        stats.errorDescription = "SLO: \(reason)"
        flushStatistics()
        controller.cancelForSLO()
    }

    /// The SLO from the parameters, or nil when none is set.
    static func ladder(_ parameters: MigrationParameters, postcopy: Bool, cacheSize: UInt64) -> EscalationLadder? {
        guard parameters.sloTotalTime > 0 || parameters.sloDowntime > 0 else { return nil }
        return EscalationLadder(settings: SLOSettings(
            totalBudget: parameters.sloTotalTime, postcopyAllowed: postcopy,
            throttleInitial: Int(parameters.cpuThrottleInitial), throttleIncrement: Int(parameters.cpuThrottleIncrement),
            throttleMaximum: Int(parameters.maxCPUThrottle), xbzrleCacheSize: cacheSize))
    }
}
