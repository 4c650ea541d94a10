import Foundation

/// A step SLO escalation took, in order of cost to the guest.
public enum EscalationStep: String, Sendable, CaseIterable {
    case xbzrle
    case compress
    case throttle
    case postcopy
    case cancel
}

/// One escalation, as `query-migrate`'s `x-escalations` and the X_MIGRATION_ESCALATION event
/// report it.
public struct Escalation: Equatable, Sendable {
    public var step: EscalationStep
    /// What was done and why ("throttle 40%: forecast ETA 9.1 s > budget left 6.0 s").
    public var detail: String
    /// Milliseconds since the migration started.
    public var at: UInt64
}

/// The operator's targets: `x-slo-downtime` (the stop the switchover may take) and
/// `x-slo-total-time` (the budget for the whole migration), both in ms.
/// (The downtime target acts through the switchover test, as the downtime limit does.)
struct SLOSettings {
    var totalBudget: UInt64
    var postcopyAllowed: Bool
    var throttleInitial: Int
    var throttleIncrement: Int
    var throttleMaximum: Int
    /// The XBZRLE cache escalation would use (`xbzrle-cache-size`).
    var xbzrleCacheSize: UInt64 = 64 << 20
}

/// Decides, at each pass end, whether the forecast misses the SLO and which step comes next:
/// the encoders that pay for this guest's pages (XBZRLE when the sampled deltas are under half
/// a page, compression when sampled pages shrink below 60%), then a vCPU throttle raised step
/// by step, then postcopy if both sides allow it, and when nothing is left, a cancel with the
/// reason, early enough that the budget is not exceeded. After a step it waits one pass to
/// see the step's effect before the next, and two before giving up: at a high throttle the
/// vCPUs run in slices about a pass long (10 ms per second at 99%), so one pass may catch one
/// slice or two, and only two passes average that out.
struct EscalationLadder {
    enum Action: Equatable {
        case none
        case enable(EscalationStep)
        case throttle(Int)
        case postcopy
        case cancel(String)
    }

    let settings: SLOSettings
    private(set) var taken: Set<EscalationStep> = []
    private(set) var throttle = 0
    private var passesSinceStep = Int.max
    private var enabledXBZRLE = false
    /// XBZRLE pays when a page dirtied again differs from its copy in under this share.
    static let xbzrleWorthIt = 0.5
    /// Compression pays when pages shrink below this share.
    static let compressionWorthIt = 0.6

    init(settings: SLOSettings) { self.settings = settings }

    /// Whether the forecast, `elapsed` ms into the migration, misses the targets; the reason.
    func miss(_ forecast: MigrationForecast, elapsed: UInt64) -> String? {
        guard forecast.basis == "passes" else { return nil }
        if !forecast.converges {
            return "the forecast says pre-copy does not converge (dirty \(forecast.dirtyRate >> 20) MiB/s, link \(forecast.bandwidth >> 20) MiB/s)"
        }
        if settings.totalBudget > 0 && elapsed + forecast.etaMilliseconds > settings.totalBudget {
            return "forecast completion at \(Self.seconds(elapsed + forecast.etaMilliseconds)) is past the budget of \(Self.seconds(settings.totalBudget))"
        }
        return nil
    }

    /// At a pass end: the next step, if the forecast misses.
    mutating func passEnded(_ forecast: MigrationForecast, elapsed: UInt64, savings: PageSavings?) -> (Action, String) {
        if passesSinceStep < Int.max { passesSinceStep += 1 }
        guard let reason = miss(forecast, elapsed: elapsed) else { return (.none, "") }
        // Judge a step by one whole pass run under it; give up only after two.
        let deadline = nearDeadline(elapsed)
        if passesSinceStep < 1 && !deadline { return (.none, "") }
        let judgedTwice = passesSinceStep >= 2 || deadline
        // An encoder is ruled out only once the sample has judged it (no sample yet: ask again).
        if !taken.contains(.xbzrle), let ratio = savings?.xbzrleRatio {
            taken.insert(.xbzrle)
            // Deltas need the old copy: a working set larger than the cache would thrash it.
            if ratio < Self.xbzrleWorthIt && forecast.dirtySet <= settings.xbzrleCacheSize {
                enabledXBZRLE = true
                return stepped(.enable(.xbzrle), "\(reason); dirtied pages differ in \(Int(ratio * 100))% of their bytes")
            }
        }
        if !taken.contains(.compress), let ratio = savings?.compressionRatio {
            taken.insert(.compress)
            // XBZRLE, once on, takes every page it has a copy of: compression pays only where it
            // does better than the deltas.
            let deltas = enabledXBZRLE ? savings?.xbzrleRatio ?? 1 : 1
            if ratio < Self.compressionWorthIt && ratio < deltas {
                return stepped(.enable(.compress), "\(reason); dirtied pages compress to \(Int(ratio * 100))%")
            }
        }
        if throttle < settings.throttleMaximum {
            // At least the next step; more when the rates say a pass must shrink by more:
            // dirtying at rate × (1 − t) below half the link makes each pass at least halve.
            let needed = forecast.dirtyRate > 0
                ? Int((100 * (1 - 0.5 * Double(forecast.bandwidth) / Double(forecast.dirtyRate))).rounded(.up)) : 0
            let step = throttle == 0 ? settings.throttleInitial : throttle + settings.throttleIncrement
            throttle = min(max(step, needed), settings.throttleMaximum)
            taken.insert(.throttle)
            return stepped(.throttle(throttle), reason)
        }
        if settings.postcopyAllowed && !taken.contains(.postcopy) {
            taken.insert(.postcopy)
            return stepped(.postcopy, reason)
        }
        guard settings.totalBudget > 0, !taken.contains(.cancel) else { return (.none, "") } // no budget: keep trying
        guard judgedTwice else { return (.none, "") }
        taken.insert(.cancel)
        return stepped(.cancel("nothing left to try: \(reason)"), reason)
    }

    /// A step is taken: the passes that judge it count from here.
    private mutating func stepped(_ action: Action, _ detail: String) -> (Action, String) {
        passesSinceStep = 0
        return (action, detail)
    }

    /// Within every window: when the budget is about to run out, switch to postcopy if allowed,
    /// else cancel, so the budget is never exceeded by pre-copy.
    mutating func windowClosed(elapsed: UInt64, expectedDowntime: UInt64) -> Action {
        guard settings.totalBudget > 0, elapsed + max(expectedDowntime, 100) + 100 >= settings.totalBudget else { return .none }
        if settings.postcopyAllowed && !taken.contains(.postcopy) {
            taken.insert(.postcopy)
            return .postcopy
        }
        guard !taken.contains(.cancel) else { return .none }
        taken.insert(.cancel)
        return .cancel("the total-time budget of \(Self.seconds(settings.totalBudget)) runs out at \(Self.seconds(elapsed)) and pre-copy has not converged")
    }

    private func nearDeadline(_ elapsed: UInt64) -> Bool {
        settings.totalBudget > 0 && elapsed * 10 >= settings.totalBudget * 8
    }

    static func seconds(_ milliseconds: UInt64) -> String {
        String(format: "%.1f s", Double(milliseconds) / 1000)
    }
}
