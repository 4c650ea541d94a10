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
/// switchover test (`ConvergencePolicy`) has it, one more pass would not halve it. Rates are
/// smoothed so that one odd window does not swing the answer: the bandwidth over the last second
/// of windows, the dirty rate as an EWMA of weight ½ over passes and samples.
struct MigrationForecaster {
    /// Page bytes per millisecond.
    private(set) var bandwidth: Double = 0
    /// Dirtied bytes per millisecond.
    private(set) var dirtyRate: Double?
    private(set) var largestDirtySet: UInt64 = 0
    private var passStart: UInt64
    /// The most passes the convergence policy will run.
    static let maximumPasses = 30

    init(now: UInt64) { passStart = now }

    /// The last windows' page bytes and milliseconds: the bandwidth is their sum over their
    /// time. One 100 ms window swings with a dirty sync or a scheduling hiccup on a busy host
    /// (an EWMA of weight ½ put ETAs 2.5x off a quarter into a run); a second's worth does not.
    private var windows: [(bytes: UInt64, milliseconds: UInt64)] = []
    static let bandwidthWindows = 10

    mutating func windowMeasured(pageBytes: UInt64, milliseconds: UInt64) {
        guard milliseconds > 0 else { return }
        windows.append((pageBytes, milliseconds))
        if windows.count > Self.bandwidthWindows { windows.removeFirst(windows.count - Self.bandwidthWindows) }
        let bytes = windows.reduce(0) { $0 + $1.bytes }
        let time = windows.reduce(0) { $0 + $1.milliseconds }
        bandwidth = Double(bytes) / Double(time)
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
        let finalLimit = perMillisecond * Double(downtimeLimit)
        var remaining = Double(pending)
        var total = remaining / perMillisecond
        var passes = 0
        var converges = false
        if let rate = dirtyRate {
            // Before any pass has ended the working set is unknown: all of RAM bounds it.
            let workingSet = Double(max(passesDone == 0 ? max(memorySize, largestDirtySet) : largestDirtySet, 1))
            // The current pass ends; what it leaves dirty is the next pass, and so on.
            var dirtyNext = min(rate * max(Double(now - passStart) + total, 1), workingSet)
            var previous = Double(lastPassBytes ?? max(pending, memorySize))
            while passesDone + passes < Self.maximumPasses {
                let fits = dirtyNext <= finalLimit
                if fits && !ConvergencePolicy.anotherPassPays(
                    pending: UInt64(dirtyNext), previous: UInt64(previous), passes: passesDone + passes + 1) {
                    converges = true
                    remaining = dirtyNext
                    break
                }
                let time = dirtyNext / perMillisecond
                let following = min(rate * time, workingSet)
                // The passes no longer shrink (a pass the policy adds to a set that fits goes on).
                if !fits && following >= dirtyNext * 0.95 { break }
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
        let downtime = remaining / perMillisecond
        return MigrationForecast(
            converges: converges, remainingPasses: converges ? passes + 1 : 0,
            etaMilliseconds: converges ? UInt64(total + downtime) : 0,
            expectedDowntimeMilliseconds: UInt64(downtime.rounded(.up)),
            bandwidth: UInt64(bandwidth * 1000), dirtyRate: UInt64((dirtyRate ?? 0) * 1000),
            dirtySet: largestDirtySet, basis: dirtyRate == nil ? "first-pass" : (passesDone == 0 ? "sample" : "passes"))
    }
}
