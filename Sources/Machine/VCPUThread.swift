import CKVM
import Foundation
import KVM
import Synchronization

/// What the machine decides after a vCPU exit.
enum ExitDisposition {
    /// Enter the guest again.
    case resume
    /// Park this vCPU for good (the machine is ending).
    case stop
}

/// The thread that owns one vCPU and runs `KVM_RUN` in a loop.
///
/// Other threads never touch the vCPU; they ask this thread to pause, resume or stop.
/// A pause request sets `kvm_run.immediate_exit` and sends `kickSignal` to the thread, so a
/// guest inside KVM_RUN comes out at once and one about to enter does not go in; `pause()`
/// returns only when the thread is parked outside KVM_RUN.
final class VCPUThread: @unchecked Sendable {
    // Sendable: all mutable fields are guarded by `condition`.
    enum Request { case run, pause, stop }

    static let kickSignal = SIGUSR2

    let vcpu: VCPU
    private let condition = NSCondition()
    private var request: Request
    private var parked = false
    private var finished = false
    private var pthread: pthread_t?
    private var pendingWork: (@Sendable (VCPU) -> Void)?
    /// Nanoseconds the thread is to sleep outside KVM_RUN before entering again (auto-converge).
    private var throttleSleep: UInt64 = 0
    /// The kernel's id for the thread (what QMP's query-cpus-fast reports).
    private(set) var threadID: Int32 = 0
    private let handleExit: @Sendable (VCPU, VCPUExit) -> ExitDisposition

    init(vcpu: VCPU, startPaused: Bool, handleExit: @escaping @Sendable (VCPU, VCPUExit) -> ExitDisposition) {
        self.vcpu = vcpu
        self.request = startPaused ? .pause : .run
        self.handleExit = handleExit
    }

    /// Installs the no-op kick handler once per process.
    static let installKickHandler: Void = {
        _ = ckvm_install_kick_handler(kickSignal)
    }()

    func start() {
        _ = Self.installKickHandler
        let thread = Thread { [self] in self.main() }
        thread.name = "vcpu\(vcpu.id)"
        thread.stackSize = 1 << 20
        thread.start()
        condition.lock()
        while pthread == nil { condition.wait() }
        condition.unlock()
    }

    private func main() {
        _ = ckvm_unblock_signal(Self.kickSignal)
        // The kernel's name for the thread (ps, top, /proc/PID/task/*/comm), as QEMU's
        // debug-threads=on gives: tools and tests find a vCPU's CPU time by it.
        _ = ckvm_set_thread_name("vcpu\(vcpu.id)")
        condition.lock()
        pthread = pthread_self()
        threadID = ckvm_thread_id()
        condition.broadcast()
        condition.unlock()

        // KVM finishes an I/O or MMIO exit (the value an IN reads, the step past the
        // instruction) only when KVM_RUN is entered again; until then the registers are half-way.
        // Before parking, where others read or replace the registers (migration, reset), the
        // thread re-enters once with immediate_exit set, which completes the exit and runs no
        // guest instruction (the KVM API's advice before saving state).
        var exitPending = false
        loop: while true {
            condition.lock()
            if request == .pause && exitPending {
                condition.unlock()
                vcpu.requestImmediateExit(true)
                _ = try? vcpu.run()
                exitPending = false
                condition.lock()
            }
            while request == .pause {
                parked = true
                if let work = pendingWork {
                    condition.unlock()
                    work(vcpu)
                    condition.lock()
                    pendingWork = nil
                }
                condition.broadcast()
                if request == .pause && pendingWork == nil { condition.wait() }
            }
            parked = false
            if request == .stop {
                condition.unlock()
                break loop
            }
            if throttleSleep > 0 {
                // Throttled: sleep out this slice's share, waking early for a pause or stop.
                let deadline = Date().addingTimeInterval(Double(throttleSleep) / 1e9)
                throttleSleep = 0
                while request == .run && condition.wait(until: deadline) {}
                condition.unlock()
                continue loop
            }
            // Cleared under the lock: a pause requested after this point sets it again.
            vcpu.requestImmediateExit(false)
            condition.unlock()

            let exit: VCPUExit
            do {
                exit = try vcpu.run()
            } catch {
                exit = .internalError(suberror: UInt32.max, data: [UInt64(error.errno)])
            }
            if case .interrupted = exit { continue }
            if handleExit(vcpu, exit) == .stop { break loop }
            exitPending = true
        }

        condition.lock()
        finished = true
        parked = true
        condition.broadcast()
        condition.unlock()
    }

    private func kick() {
        vcpu.requestImmediateExit(true)
        if let pthread, !finished { pthread_kill(pthread, Self.kickSignal) }
    }

    /// Asks the vCPU to leave KVM_RUN and waits until it has.
    func pause() {
        condition.lock()
        if request == .run { request = .pause }
        condition.broadcast() // a throttled thread sleeping outside KVM_RUN parks at once
        kick()
        while !parked {
            // The signal can land just before the thread enters KVM_RUN's wait; kick again.
            if !condition.wait(until: Date().addingTimeInterval(0.01)) { kick() }
        }
        condition.unlock()
    }

    /// Takes the vCPU out of the guest to sleep `nanoseconds` before it enters again; a later
    /// request replaces an earlier one not yet served. A paused vCPU ignores it.
    func throttle(sleeping nanoseconds: UInt64) {
        condition.lock()
        if request == .run {
            throttleSleep = nanoseconds
            kick()
        }
        condition.unlock()
    }

    /// Lets a paused vCPU run again.
    func resume() {
        condition.lock()
        if request == .pause { request = .run }
        condition.broadcast()
        condition.unlock()
    }

    /// Stops the thread for good and waits for it to leave KVM_RUN.
    func stop() {
        condition.lock()
        request = .stop
        condition.broadcast()
        kick()
        while !finished {
            if !condition.wait(until: Date().addingTimeInterval(0.01)) { kick() }
        }
        condition.unlock()
    }

    /// Runs `work` on this vCPU's own thread while it is paused, and returns its result; nil
    /// when the thread has stopped for good (the machine ended) or is not paused. The vCPU
    /// stays paused. Requests are served one at a time.
    func perform<T: Sendable>(_ work: @escaping @Sendable (VCPU) -> T) -> T? {
        let result = Mutex<T?>(nil)
        let box = ResultBox(result)
        condition.lock()
        defer { condition.unlock() }
        while pendingWork != nil && !finished { condition.wait() }
        guard !finished, parked, request == .pause else { return nil }
        pendingWork = { vcpu in box.mutex.withLock { $0 = work(vcpu) } }
        condition.broadcast()
        var served = false
        while !served {
            if finished { pendingWork = nil; break }
            condition.wait()
            served = pendingWork == nil
        }
        return box.mutex.withLock { $0 }
    }

}

/// Carries a result from a vCPU thread back to the caller of `perform`.
final class ResultBox<T: Sendable>: Sendable {
    let mutex: Mutex<T?>
    init(_ mutex: consuming Mutex<T?>) { self.mutex = mutex }
}
