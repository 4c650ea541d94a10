/// Where a pre-copy migration is heading: `x-forecast` in `query-migrate`, the ETA in
/// `tern migrate`'s progress line, and what SLO escalation decides on.
public struct MigrationForecast: Equatable, Sendable {
    /// Whether pre-copy reaches a final copy within the downtime limit under today's settings.
    public var converges: Bool
    /// Passes still to run before the switchover (when it converges).
    public var remainingPasses: Int
    /// Milliseconds until the migration completes (when it converges).
    public var etaMilliseconds: UInt64
    /// Milliseconds of the final stop.
    public var expectedDowntimeMilliseconds: UInt64
    /// Page bytes per second the link carries (after the encoders' savings).
    public var bandwidth: UInt64
    /// Bytes per second the guest dirties.
    public var dirtyRate: UInt64
    /// The largest dirty set a pass has found, in bytes.
    public var dirtySet: UInt64
    /// What the forecast rests on: "first-pass" (no dirty rate yet) or "passes".
    public var basis: String
}

/// Builds the forecast from what the migration measures: page bandwidth per 100 ms window,
/// the bytes each pass found dirty and how long it took. The model is QEMU's iteration made
/// explicit: a pass over R bytes takes R / bandwidth, during which the guest dirties
/// rate × time bytes, but never more than the largest dirty set seen (its working set); the
/// migration converges when a pass leaves no more than bandwidth × downtime limit and, as the
/// switchover test (`ConvergencePolicy`) has it, one more pass would not halve it.
///
/// The first pass and the re-sends run at different speeds, so each has its own bandwidth: the
/// first pass writes into fresh destination memory (3-15 µs a page on this host, 190 MiB/s
/// against 1.4 GiB/s for re-sends, docs/performance.md) and sends every page raw, while re-sent
/// pages land in memory already there and shrink to XBZRLE deltas. Pricing the later passes at
/// the first pass's speed put the ETA 2-8x off (bench/migrate, scenarios c and d).
struct MigrationForecaster {
    /// Page bytes per millisecond the current pass moves.
    private(set) var bandwidth: Double = 0
    /// Page bytes per millisecond the passes after this one are expected to move.
    private(set) var resendBandwidth: Double = 0
    /// Stream bytes per millisecond the link carried lately: what the switchover test weighs.
    private(set) var wireBandwidth: Double = 0
    /// Dirtied bytes per millisecond.
    private(set) var dirtyRate: Double?
    private(set) var largestDirtySet: UInt64 = 0
    private var passStart: UInt64
    /// The most passes a forecast looks ahead before it calls the migration non-converging.
    static let simulatedPasses = 200
    /// Auto-converge's settings when it is on: the forecast raises the throttle as it would.
    var autoConverge: AutoConverge.Settings?
    /// The vCPU throttle in force now, in percent.
    var throttleNow = 0

    init(now: UInt64) { passStart = now }

    /// One 100 ms window: page bytes (every page counted whole, however it was encoded) and
    /// stream bytes.
    private struct Window {
        var pageBytes: UInt64
        var wireBytes: UInt64
        var milliseconds: UInt64
        var pageRate: Double { Double(pageBytes) / Double(milliseconds) }
    }

    /// The first pass's windows and those after it, each the last `bandwidthWindows`. A rate is
    /// their sum over their time: one 100 ms window swings with a dirty sync or a scheduling
    /// hiccup on a busy host (an EWMA of weight ½ put ETAs 2.5x off a quarter into a run); a
    /// second's worth does not.
    private var firstPassWindows: [Window] = []
    private var resendWindows: [Window] = []
    /// The fastest first-pass window: what the link has shown it carries once the destination
    /// keeps up, the best guess for re-sends before one is seen.
    private var bestFirstPassRate: Double = 0
    static let bandwidthWindows = 10
    private var passesEnded = 0

    /// What a re-sent page costs on the wire against a raw one (XBZRLE's measured delta size),
    /// 1 without XBZRLE; it only prices re-sends until one has been measured.
    var resendCost: Double = 1

    mutating func windowMeasured(pageBytes: UInt64, wireBytes: UInt64? = nil, milliseconds: UInt64) {
        guard milliseconds > 0 else { return }
        let window = Window(pageBytes: pageBytes, wireBytes: wireBytes ?? pageBytes, milliseconds: milliseconds)
        if passesEnded == 0 {
            Self.keep(window, in: &firstPassWindows)
            bestFirstPassRate = max(bestFirstPassRate, window.pageRate)
        } else {
            Self.keep(window, in: &resendWindows)
        }
        refreshBandwidths()
    }

    private static func keep(_ window: Window, in windows: inout [Window]) {
        windows.append(window)
        if windows.count > bandwidthWindows { windows.removeFirst(windows.count - bandwidthWindows) }
    }

    private mutating func refreshBandwidths() {
        // The start of the first pass ramps up (connection, the destination's first pages): the
        // windows before the first at half the best rate say nothing of the steady rate.
        let ramp = firstPassWindows.firstIndex { $0.pageRate >= bestFirstPassRate / 2 } ?? 0
        let steady = Array(firstPassWindows[ramp...])
        let firstPass = Self.rates(steady)
        if resendWindows.isEmpty {
            bandwidth = firstPass.page
            wireBandwidth = firstPass.wire
            resendBandwidth = max(firstPass.page, bestFirstPassRate) / max(min(resendCost, 1), 0.1)
        } else {
            let resend = Self.rates(resendWindows)
            bandwidth = resend.page
            wireBandwidth = resend.wire
            resendBandwidth = resend.page
        }
    }

    private static func rates(_ windows: [Window]) -> (page: Double, wire: Double) {
        let time = Double(windows.reduce(0) { $0 + $1.milliseconds })
        guard time > 0 else { return (0, 0) }
        return (Double(windows.reduce(0) { $0 + $1.pageBytes }) / time, Double(windows.reduce(0) { $0 + $1.wireBytes }) / time)
    }

    /// How long the last dirty sync took, in milliseconds: the final one runs during the stop.
    private(set) var syncMilliseconds: Double = 0

    mutating func syncMeasured(nanoseconds: UInt64) {
        syncMilliseconds = Double(nanoseconds) / 1_000_000
    }

    /// A pass ended at `now` and the sync found `dirtied` bytes, with the vCPUs throttled to
    /// `throttle` % during it. Its average rate only counts when no short sample measured the
    /// pass (a long pass saturates at the working set).
    mutating func passEnded(now: UInt64, dirtied: UInt64, throttle: Int = 0) {
        let elapsed = max(now - passStart, 1)
        if !sampledThisPass {
            measuredDirtyRate(Double(dirtied) / Double(elapsed), throttle: throttle)
        }
        largestDirtySet = max(largestDirtySet, dirtied)
        lastPassBytes = dirtied
        passStart = now
        sampledThisPass = false
        passesEnded += 1
    }
    /// What the pass now running found dirty when it began (nil in the first pass).
    private var lastPassBytes: UInt64?

    /// A mid-pass sample: `bytes` of distinct pages dirtied in `milliseconds` under `throttle` %.
    mutating func dirtySampled(bytes: UInt64, milliseconds: UInt64, throttle: Int = 0) {
        guard milliseconds > 0 else { return }
        measuredDirtyRate(Double(bytes) / Double(milliseconds), throttle: throttle)
        largestDirtySet = max(largestDirtySet, bytes)
        sampledThisPass = true
    }

    /// Smooths the dirty rate, except across a throttle change: a rate measured under another
    /// throttle says nothing about this one (CI saw a 99% throttle judged on a smoothed
    /// 60 MiB/s, most of it from before the step, while the guest dirtied 14).
    private mutating func measuredDirtyRate(_ sample: Double, throttle: Int) {
        if let rate = dirtyRate, rateThrottle == throttle {
            dirtyRate = (rate + sample) / 2
        } else {
            dirtyRate = sample
        }
        rateThrottle = throttle
    }
    private var rateThrottle = 0

    /// When the current pass began, for scheduling the mid-pass sample.
    var currentPassStart: UInt64 { passStart }
    private var sampledThisPass = false
    /// Bounds the dirty set before a pass has measured one.
    var memorySize: UInt64 = 0

    /// The forecast with `pending` bytes left in the current pass, `passes` done so far, and
    /// `downtimeLimit` ms.
    func forecast(now: UInt64, pending: UInt64, passesDone: Int, downtimeLimit: UInt64) -> MigrationForecast {
        let perMillisecond = max(bandwidth, 1)
        let later = max(resendBandwidth, 1)
        // The switchover test weighs page bytes against what the link carried lately.
        let finalLimit = max(wireBandwidth, 1) * Double(downtimeLimit)
        var remaining = Double(pending)
        var total = remaining / perMillisecond
        var passes = 0
        var converges = false
        if let measured = dirtyRate {
            // Before any pass has ended the working set is unknown: all of RAM bounds it.
            let workingSet = Double(max(passesDone == 0 ? max(memorySize, largestDirtySet) : largestDirtySet, 1))
            // The rate was measured under one throttle; the guest runs under another from here.
            let unthrottled = measured / max(1 - Double(rateThrottle) / 100, 0.01)
            var throttle = throttleNow
            var rate = unthrottled * (1 - Double(throttle) / 100)
            var outrunFor = 0.0 // simulated ms in which the guest dirtied more than half what went
            // The current pass ends; what it leaves dirty is the next pass, and so on.
            var dirtyNext = min(rate * max(Double(now - passStart) + total, 1), workingSet)
            var previous = Double(lastPassBytes ?? max(pending, memorySize))
            while passes < Self.simulatedPasses {
                let fits = dirtyNext <= finalLimit
                if fits && !ConvergencePolicy.anotherPassPays(
                    pending: UInt64(dirtyNext), previous: UInt64(previous), passes: passesDone + passes + 1) {
                    converges = true
                    remaining = dirtyNext
                    break
                }
                let time = dirtyNext / later
                let following = min(rate * time, workingSet)
                let shrinks = fits || following < dirtyNext * 0.95 // a pass the policy adds to a set that fits goes on
                if let autoConverge, throttle < autoConverge.maximum {
                    // Auto-converge steps up after two periods of a second in which the guest outran half the link.
                    outrunFor = following > dirtyNext / 2 ? outrunFor + time : 0
                    if outrunFor >= 2000 {
                        let wanted = Int((100 * (1 - later / 3 / max(unthrottled, 1))).rounded(.up))
                        throttle = min(throttle == 0 ? max(autoConverge.initial, wanted) : throttle + autoConverge.increment,
                                       autoConverge.maximum)
                        rate = unthrottled * (1 - Double(throttle) / 100)
                        outrunFor = 0
                    }
                } else if !shrinks {
                    break // the passes no longer shrink, and nothing will make them
                }
                total += time
                passes += 1
                previous = dirtyNext
                dirtyNext = following
            }
        } else {
            // First pass: no dirty rate yet; converging is assumed, the ETA is the pass.
            converges = true
            remaining = 0
        }
        let downtime = remaining / later + syncMilliseconds
        return MigrationForecast(
            converges: converges, remainingPasses: converges ? passes + 1 : 0,
            etaMilliseconds: converges ? UInt64(total + downtime) : 0,
            expectedDowntimeMilliseconds: UInt64(downtime.rounded(.up)),
            bandwidth: UInt64(bandwidth * 1000), dirtyRate: UInt64((dirtyRate ?? 0) * 1000),
            dirtySet: largestDirtySet, basis: dirtyRate == nil ? "first-pass" : (passesDone == 0 ? "sample" : "passes"))
    }
}
