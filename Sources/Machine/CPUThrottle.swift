import Foundation
import Synchronization

/// Slows the guest down by a percentage, as QEMU's cpu-throttle does for auto-converge: in
/// every slice of 10 ms of guest time, each vCPU thread is taken out of the guest and sleeps
/// `percent / (100 - percent)` of a slice, so the guest runs `100 - percent` % of the time.
/// A driver thread exists only while the throttle is above zero.
final class CPUThrottle: @unchecked Sendable {
    // Sendable: everything mutable is guarded by `state`.
    static let sliceNanoseconds: UInt64 = 10_000_000
    private struct State {
        var percent = 0
        var driverRunning = false
        var threads: [VCPUThread] = []
    }
    private let state = Mutex(State())

    /// The vCPU threads to throttle, once the machine has started them.
    func attach(_ threads: [VCPUThread]) { state.withLock { $0.threads = threads } }

    var percent: Int { state.withLock { $0.percent } }

    /// One slice of running plus its sleep at `percent`: the span over which the guest runs
    /// its share (a second at 99%).
    static func periodNanoseconds(percent: Int) -> UInt64 {
        sliceNanoseconds + sleepNanoseconds(percent: percent)
    }

    private static func sleepNanoseconds(percent: Int) -> UInt64 {
        percent > 0 ? sliceNanoseconds * UInt64(percent) / UInt64(100 - percent) : 0
    }

    /// Sets the throttle (0 ends it; at most 99).
    func set(_ percent: Int) {
        let clamped = min(max(percent, 0), 99)
        let startDriver = state.withLock { state -> Bool in
            state.percent = clamped
            guard clamped > 0, !state.driverRunning else { return false }
            state.driverRunning = true
            return true
        }
        guard startDriver else { return }
        let thread = Thread { [self] in drive() }
        thread.name = "cpu-throttle"
        thread.start()
    }

    private func drive() {
        while true {
            let (percent, threads) = state.withLock { state -> (Int, [VCPUThread]) in
                if state.percent == 0 { state.driverRunning = false }
                return (state.percent, state.threads)
            }
            guard percent > 0 else { return }
            let sleep = Self.sleepNanoseconds(percent: percent)
            for thread in threads { thread.throttle(sleeping: sleep) }
            // The next slice starts once this one's sleep and its running time are over.
            let period = Self.sliceNanoseconds + sleep
            var remaining = timespec(tv_sec: Int(period / 1_000_000_000), tv_nsec: Int(period % 1_000_000_000))
            while true {
                var request = remaining
                guard nanosleep(&request, &remaining) != 0, errno == EINTR else { break }
            }
        }
    }
}
