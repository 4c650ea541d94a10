import Foundation

/// Runs the requests that change a machine's life (stop, cont, reset, the migration's stop,
/// save, load and resume) one at a time, in the order they arrived.
///
/// Each request takes a ticket and runs on its own thread when its number comes up, so two
/// requests never overlap (a reset never meets a state save halfway) and every caller gets
/// its own answer. A request that makes another request from within its turn runs it at once
/// (the turn is reentrant on its thread) instead of waiting for itself.
///
/// `end` (a guest reset, a quit) is deliberately not a queued request: it only records the
/// ending, so a vCPU thread or a signal can end the machine while a request waits for vCPUs.
final class LifecycleQueue: @unchecked Sendable {
    // Sendable: every field is guarded by `condition`.
    private let condition = NSCondition()
    private var nextTicket: UInt64 = 0
    private var serving: UInt64 = 0
    private var owner: pthread_t?
    private var depth = 0

    /// Runs `body` in its turn and returns what it returns (or throws what it throws).
    func run<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
        enter()
        defer { leave() }
        return try body()
    }

    /// Waits for this thread's turn (at once if the thread already holds the queue). Every
    /// `enter` needs one `leave` on the same thread.
    private func enter() {
        let me = pthread_self()
        condition.lock()
        defer { condition.unlock() }
        if let owner, pthread_equal(owner, me) != 0 {
            depth += 1
            return
        }
        let ticket = nextTicket
        nextTicket += 1
        while serving != ticket || owner != nil { condition.wait() }
        owner = me
        depth = 1
    }

    /// Ends this thread's turn once its outermost `enter` is matched.
    private func leave() {
        condition.lock()
        defer { condition.unlock() }
        guard let owner, pthread_equal(owner, pthread_self()) != 0 else {
            preconditionFailure("LifecycleQueue.leave() from a thread that does not hold it")
        }
        depth -= 1
        guard depth == 0 else { return }
        self.owner = nil
        serving += 1
        condition.broadcast()
    }

    /// Whether the calling thread holds the queue (for preconditions).
    var isHeldByCurrentThread: Bool {
        condition.lock()
        defer { condition.unlock() }
        guard let owner else { return false }
        return pthread_equal(owner, pthread_self()) != 0
    }
}
