/// When to stop iterating and switch over: QEMU's downtime test (the bytes still pending must
/// fit in bandwidth × downtime limit), applied at the end of each pass, plus tern's rule that a
/// guest which is still converging gets another pass first (`anotherPassPays`), so the final
/// copy, and the downtime, is the tail of a converged pass rather than a whole limit's worth.
struct ConvergencePolicy {
    /// The bytes that fit in the downtime limit at the measured bandwidth.
    private(set) var maximumFinalBytes: UInt64 = 0
    private var previousPassBytes: UInt64 = .max

    /// A 100 ms window closed: `bytesPerMillisecond` is what it carried.
    mutating func bandwidthMeasured(bytesPerMillisecond: UInt64, downtimeLimitNanoseconds: UInt64) {
        maximumFinalBytes = bytesPerMillisecond.multipliedReportingOverflow(by: downtimeLimitNanoseconds / 1_000_000).partialValue
    }

    /// Whether the migration should switch over now, at the end of a pass with `pending` bytes
    /// left after `passes` dirty syncs.
    mutating func shouldSwitchOver(pending: UInt64, passes: Int) -> Bool {
        defer { previousPassBytes = pending }
        if pending == 0 { return true }
        return pending < maximumFinalBytes && !Self.anotherPassPays(pending: pending, previous: previousPassBytes, passes: passes)
    }

    /// After a pass, whether one more pass (with the guest running) would shrink the final copy
    /// enough to be worth it: the dirty set is still more than 256 KiB and at most half the last
    /// pass's.
    static func anotherPassPays(pending: UInt64, previous: UInt64, passes: Int) -> Bool {
        pending > 256 << 10 && pending * 2 <= previous && passes < 30
    }
}

/// What a pass observer learns at the end of each pass.
struct PassReport {
    /// Monotonic milliseconds now.
    var now: UInt64
    /// Guest bytes (whole pages) found dirty at this sync.
    var dirtiedBytes: UInt64
    /// Stream bytes written so far.
    var transferredBytes: UInt64
    /// Pages put on the wire so far, in any encoding.
    var pagesSent: UInt64
    var passes: Int
}

/// Something that acts on the migration's progress at each pass: auto-converge is one.
protocol PassObserver: AnyObject {
    func passEnded(_ report: PassReport)
    /// The migration ended, whatever its outcome: undo anything done to the guest.
    func migrationEnded()
}

/// Auto-converge: when the guest keeps dirtying faster than the link carries its pages, throttle
/// its vCPUs, and raise the throttle step by step while that holds.
///
/// The trigger is QEMU's (over a period of at least a second, the bytes the guest dirtied
/// exceed half the bytes sent), with two differences that throttle the guest less: dirtied
/// bytes are weighed by what a page actually costs on the wire this migration (XBZRLE and
/// compression make a dirty page cheaper), and the first step goes straight to the throttle
/// the measured rates call for (at least `initial`) instead of creeping up from `initial`.
/// Two periods in a row must call for it (QEMU waits for three).
final class AutoConverge: PassObserver {
    struct Settings {
        var initial: Int
        var increment: Int
        var maximum: Int
    }
    private let settings: Settings
    private let setThrottle: (Int) -> Void
    private(set) var throttle = 0
    private(set) var maximumReached = 0
    private var periodStart: PassReport?
    private var highPeriods = 0
    private var dirtiedInPeriod: UInt64 = 0

    init(settings: Settings, setThrottle: @escaping (Int) -> Void) {
        self.settings = settings
        self.setThrottle = setThrottle
    }

    /// Whether the guest outruns the link, from one period's figures; and the throttle that
    /// would bring its dirtying down to a third of what the link carries.
    static func assess(pagesDirtied: UInt64, sent: UInt64, pagesSent: UInt64, currentThrottle: Int)
        -> (tooFast: Bool, wanted: Int) {
        // Bytes one dirty page costs on the wire, from this period's traffic.
        let bytesPerPage = pagesSent > 0 ? Double(sent) / Double(pagesSent) : Double(MigrationStreamFormat.pageSize)
        let weighted = Double(pagesDirtied) * bytesPerPage
        let tooFast = weighted > Double(sent) / 2
        let unthrottled = weighted / max(1 - Double(currentThrottle) / 100, 0.01)
        let wanted = unthrottled > 0 ? Int((100 * (1 - Double(sent) / 3 / unthrottled)).rounded(.up)) : 0
        return (tooFast, wanted)
    }

    func passEnded(_ report: PassReport) {
        guard let start = periodStart else { periodStart = report; return }
        dirtiedInPeriod += report.dirtiedBytes
        guard report.now >= start.now + 1000 else { return }
        let dirtied = dirtiedInPeriod
        dirtiedInPeriod = 0
        periodStart = report
        let verdict = Self.assess(pagesDirtied: dirtied / MigrationStreamFormat.pageSize,
                                  sent: report.transferredBytes - start.transferredBytes,
                                  pagesSent: report.pagesSent - start.pagesSent, currentThrottle: throttle)
        guard verdict.tooFast else { highPeriods = 0; return }
        highPeriods += 1
        guard highPeriods >= 2 else { return }
        highPeriods = 0
        let next = throttle == 0 ? max(settings.initial, verdict.wanted) : throttle + max(settings.increment, 0)
        let capped = min(next, settings.maximum)
        guard capped != throttle else { return }
        throttle = capped
        maximumReached = max(maximumReached, throttle)
        setThrottle(throttle)
    }
    func migrationEnded() {
        guard throttle > 0 else { return }
        throttle = 0
        setThrottle(0)
    }
}
