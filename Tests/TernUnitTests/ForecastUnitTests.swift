import Testing
@testable import Migration

@Suite("Forecast and SLO escalation")
struct ForecastUnitTests {
    /// A forecaster that has seen `windows` of `bandwidth` page bytes per ms and passes that
    /// found `dirtied` bytes each, `passMilliseconds` apart.
    func forecaster(bandwidth: UInt64, dirtied: [UInt64], passMilliseconds: UInt64) -> (MigrationForecaster, UInt64) {
        var forecaster = MigrationForecaster(now: 0)
        forecaster.windowMeasured(pageBytes: bandwidth * 100, milliseconds: 100)
        var now: UInt64 = 0
        for bytes in dirtied {
            now += passMilliseconds
            forecaster.passEnded(now: now, dirtied: bytes)
        }
        return (forecaster, now)
    }

    @Test("before the first sync it assumes convergence and the ETA is the pass")
    func firstPass() {
        var forecaster = MigrationForecaster(now: 0)
        forecaster.windowMeasured(pageBytes: 10_000_000, milliseconds: 100) // 100 000 B/ms
        let forecast = forecaster.forecast(now: 100, pending: 50_000_000, passesDone: 0, downtimeLimit: 300)
        #expect(forecast.converges && forecast.basis == "first-pass")
        #expect(forecast.etaMilliseconds == 500)
    }

    @Test("the dirty rate is smoothed between passes, but a throttle change starts it afresh")
    func throttleRestartsTheRate() {
        var forecaster = MigrationForecaster(now: 0)
        forecaster.passEnded(now: 1000, dirtied: 100_000_000)               // 100 000 B/ms
        forecaster.passEnded(now: 2000, dirtied: 50_000_000)                // smoothed: 75 000
        #expect(forecaster.dirtyRate == 75_000)
        forecaster.passEnded(now: 3000, dirtied: 10_000_000, throttle: 99)  // the first pass at 99%
        #expect(forecaster.dirtyRate == 10_000)
        forecaster.dirtySampled(bytes: 5_000_000, milliseconds: 250, throttle: 99)
        #expect(forecaster.dirtyRate == 15_000)
    }

    @Test("a guest that dirties a fixed working set faster than the link does not converge")
    func saturated() {
        // 64 MiB found dirty every pass, 50 000 B/ms link: each pass takes ~1.3 s and finds it all again.
        let (forecaster, now) = forecaster(bandwidth: 50_000, dirtied: [64 << 20, 64 << 20], passMilliseconds: 1340)
        let forecast = forecaster.forecast(now: now, pending: 64 << 20, passesDone: 2, downtimeLimit: 300)
        #expect(!forecast.converges && forecast.etaMilliseconds == 0 && forecast.basis == "passes")
        #expect(forecast.dirtySet == 64 << 20)
    }

    @Test("a slow dirtier converges, and each pass shrinks the set: passes and ETA follow")
    func shrinking() {
        // 1 MiB dirtied in a 1 s pass (1048 B/ms) over a 100 000 B/ms link; 300 ms allows 30 MB.
        let (forecaster, now) = forecaster(bandwidth: 100_000, dirtied: [1 << 20], passMilliseconds: 1000)
        let forecast = forecaster.forecast(now: now, pending: 1 << 20, passesDone: 1, downtimeLimit: 300)
        #expect(forecast.converges)
        #expect(forecast.remainingPasses == 1)
        // The current pass (about 10 ms) and a final stop of a few ms.
        #expect(forecast.etaMilliseconds >= 10 && forecast.etaMilliseconds < 50)
        #expect(forecast.expectedDowntimeMilliseconds <= 1)
    }

    @Test("a set that halves each pass gets more passes, as the switchover test gives them: the stop is the tail")
    func halvingPassesShrinkTheStop() {
        // 30 MB dirtied in a 1 s pass (30 000 B/ms) over a 100 000 B/ms link; 300 ms allows 30 MB.
        // The next set (9 MB) fits the limit, but it is under half the last one, so the policy
        // runs another pass, and so on: 2.7 MB, 0.81 MB, then 0.24 MB, under 256 KiB, goes.
        let (forecaster, now) = forecaster(bandwidth: 100_000, dirtied: [30_000_000], passMilliseconds: 1000)
        let forecast = forecaster.forecast(now: now, pending: 30_000_000, passesDone: 1, downtimeLimit: 300)
        #expect(forecast.converges)
        #expect(forecast.remainingPasses == 4, "\(forecast)")
        #expect(forecast.expectedDowntimeMilliseconds <= 3, "a limit's worth (90 ms) is what the old model said: \(forecast)")
        #expect(forecast.etaMilliseconds >= 300 + 90 + 27 + 8 && forecast.etaMilliseconds < 440, "\(forecast)")
    }

    @Test("the first pass's slow start is not its steady rate, and later passes are priced at the best window before a re-send is seen")
    func firstPassRamp() {
        var forecaster = MigrationForecaster(now: 0)
        forecaster.windowMeasured(pageBytes: 1_000_000, milliseconds: 100)    // the ramp: 10 000 B/ms
        forecaster.windowMeasured(pageBytes: 10_000_000, milliseconds: 100)   // 100 000 B/ms
        forecaster.windowMeasured(pageBytes: 8_000_000, milliseconds: 100)    // 80 000 B/ms
        #expect(forecaster.bandwidth == 90_000, "the ramp window is left out: \(forecaster.bandwidth)")
        #expect(forecaster.resendBandwidth == 100_000)
        let forecast = forecaster.forecast(now: 300, pending: 90_000_000, passesDone: 0, downtimeLimit: 300)
        #expect(forecast.etaMilliseconds == 1000)
    }

    @Test("after the first pass, the passes run at the re-send rate (fresh destination memory no longer slows them)")
    func resendRate() {
        var forecaster = MigrationForecaster(now: 0)
        forecaster.windowMeasured(pageBytes: 5_000_000, milliseconds: 100)    // first pass: 50 000 B/ms
        forecaster.passEnded(now: 1000, dirtied: 20_000_000)                  // 20 000 B/ms dirtied
        #expect(forecaster.bandwidth == 50_000)
        forecaster.windowMeasured(pageBytes: 20_000_000, milliseconds: 100)   // re-sends: 200 000 B/ms
        #expect(forecaster.bandwidth == 200_000 && forecaster.resendBandwidth == 200_000)
        let forecast = forecaster.forecast(now: 1100, pending: 18_000_000, passesDone: 1, downtimeLimit: 300)
        // 90 ms for this pass (3.8 MB dirtied in its 190 ms), 19 ms for the next, 2 ms for the
        // last; at the first pass's 50 000 B/ms it would be 360 + 76 + 30.
        #expect(forecast.converges && forecast.etaMilliseconds >= 105 && forecast.etaMilliseconds < 120, "\(forecast)")
    }

    @Test("with XBZRLE on, its measured deltas make re-sends cheap: a guest dirtying faster than the link still converges")
    func xbzrleDeltas() {
        func forecast(resendCost: Double) -> MigrationForecast {
            var forecaster = MigrationForecaster(now: 0)
            forecaster.memorySize = 512 << 20
            forecaster.resendCost = resendCost
            forecaster.windowMeasured(pageBytes: 6_400_000, milliseconds: 100) // 64 000 B/ms, raw first pass
            forecaster.dirtySampled(bytes: 25_000_000, milliseconds: 250)      // 100 000 B/ms
            return forecaster.forecast(now: 2000, pending: 400 << 20, passesDone: 0, downtimeLimit: 300)
        }
        #expect(!forecast(resendCost: 1).converges)
        let cheap = forecast(resendCost: 0.04)
        #expect(cheap.converges, "\(cheap)")
        // The first pass's 400 MiB at 64 000 B/ms (6.6 s) is most of it.
        #expect(cheap.etaMilliseconds > 6_500 && cheap.etaMilliseconds < 9_000, "\(cheap)")
    }

    @Test("with auto-converge on, a guest that outruns the link converges once the throttle steps up; without it, it does not")
    func autoConvergeThrottles() {
        func forecast(_ autoConverge: AutoConverge.Settings?) -> MigrationForecast {
            // 256 MiB/s link, 400 MiB/s dirtied over a 512 MiB working set.
            var (forecaster, now) = forecaster(bandwidth: 268_435, dirtied: [512 << 20], passMilliseconds: 2000)
            forecaster.autoConverge = autoConverge
            return forecaster.forecast(now: now, pending: 512 << 20, passesDone: 1, downtimeLimit: 300)
        }
        #expect(!forecast(nil).converges)
        let throttled = forecast(AutoConverge.Settings(initial: 20, increment: 10, maximum: 99))
        #expect(throttled.converges, "\(throttled)")
        #expect(throttled.etaMilliseconds > 2_000 && throttled.etaMilliseconds < 15_000, "\(throttled)")
        #expect(!forecast(AutoConverge.Settings(initial: 5, increment: 0, maximum: 5)).converges,
                "a 5% cap cannot bring 400 MiB/s under 256")
    }

    func ladder(budget: UInt64 = 10_000, postcopy: Bool = false, maximum: Int = 99) -> EscalationLadder {
        EscalationLadder(settings: SLOSettings(totalBudget: budget, postcopyAllowed: postcopy,
                                               throttleInitial: 20, throttleIncrement: 10, throttleMaximum: maximum))
    }

    let missing = MigrationForecast(converges: false, remainingPasses: 0, etaMilliseconds: 0, expectedDowntimeMilliseconds: 0,
                                    bandwidth: 50 << 20, dirtyRate: 50 << 20, dirtySet: 64 << 20, basis: "passes")

    @Test("the ladder's order: encoders that pay, throttle up to the maximum, postcopy, then cancel")
    func order() {
        var ladder = ladder(postcopy: true, maximum: 40)
        let cheap = PageSavings(xbzrleRatio: 0.1, compressionRatio: 0.05)
        var actions: [EscalationLadder.Action] = []
        for pass in 0..<8 {
            let (action, _) = ladder.passEnded(missing, elapsed: UInt64(pass) * 100, savings: cheap)
            if action != .none { actions.append(action) }
        }
        // dirty == link: a pass halves only at a 50% throttle, capped here at 40.
        #expect(actions.count == 5, "\(actions)")
        #expect(Array(actions.prefix(4)) == [.enable(.xbzrle), .enable(.compress), .throttle(40), .postcopy])
        if case let .cancel(reason)? = actions.last {
            #expect(reason.hasPrefix("nothing left to try: the forecast says pre-copy does not converge"))
        } else {
            Issue.record("the ladder should end in a cancel: \(actions)")
        }
    }

    /// Savings that rule both encoders out.
    let useless = PageSavings(xbzrleRatio: 0.95, compressionRatio: 0.99)

    /// The ladder's answer at each of `passes` pass ends, 100 ms apart, for a missing forecast.
    func actions(_ ladder: inout EscalationLadder, passes: Int) -> [EscalationLadder.Action] {
        (0..<passes).map { ladder.passEnded(missing, elapsed: UInt64($0) * 100, savings: useless).0 }
    }

    @Test("encoders that do not pay are skipped; the throttle climbs a step per pass; no budget, no cancel")
    func skipsAndClimbs() {
        var ladder = ladder(budget: 0, maximum: 70)
        #expect(actions(&ladder, passes: 6) == [.throttle(50), .throttle(60), .throttle(70), .none, .none, .none])
    }

    @Test("the cancel waits for two passes under the last step (at a high throttle one pass may hold one run slice or two), unless the budget is near its end")
    func cancelWaitsTwoPasses() {
        var ladder = ladder(budget: 10_000, maximum: 50)
        let actions = actions(&ladder, passes: 4)
        #expect(actions.count == 4 && Array(actions.prefix(2)) == [.throttle(50), .none] && actions.last == EscalationLadder.Action.none,
                "\(actions)")
        if actions.count == 4, case .cancel = actions[2] {} else { Issue.record("the third pass end should cancel: \(actions)") }
        var late = self.ladder(budget: 10_000, maximum: 50)
        #expect(late.passEnded(missing, elapsed: 100, savings: useless).0 == .throttle(50))
        guard case .cancel? = Optional(late.passEnded(missing, elapsed: 8500, savings: useless).0) else {
            Issue.record("past 80% of the budget the ladder cancels without waiting")
            return
        }
    }

    @Test("XBZRLE is skipped when the working set outgrows its cache, and compression when deltas do better")
    func encoderChoice() {
        var big = missing
        big.dirtySet = 128 << 20
        var ladder = ladder()
        #expect(ladder.passEnded(big, elapsed: 100, savings: PageSavings(xbzrleRatio: 0.1, compressionRatio: 0.3)).0 == .enable(.compress))
        var second = self.ladder()
        #expect(second.passEnded(missing, elapsed: 100, savings: PageSavings(xbzrleRatio: 0.2, compressionRatio: 0.3)).0 == .enable(.xbzrle))
        #expect(second.passEnded(missing, elapsed: 200, savings: PageSavings(xbzrleRatio: 0.2, compressionRatio: 0.3)).0 == .throttle(50))
    }

    @Test("a forecast that meets the budget takes no step; near the budget's end the window check cancels")
    func deadline() {
        var ladder = ladder(budget: 5000)
        let fine = MigrationForecast(converges: true, remainingPasses: 1, etaMilliseconds: 1000, expectedDowntimeMilliseconds: 5,
                                     bandwidth: 1, dirtyRate: 1, dirtySet: 1, basis: "passes")
        #expect(ladder.passEnded(fine, elapsed: 1000, savings: nil).0 == .none)
        #expect(ladder.windowClosed(elapsed: 1000, expectedDowntime: 5) == .none)
        guard case .cancel? = Optional(ladder.windowClosed(elapsed: 4850, expectedDowntime: 5)) else {
            Issue.record("the budget is about to run out: cancel")
            return
        }
        #expect(ladder.windowClosed(elapsed: 4900, expectedDowntime: 5) == .none, "cancel only once")
    }
}
