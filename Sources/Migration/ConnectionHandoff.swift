import Foundation
import Synchronization

/// Hands a new connection from a QMP command (`migrate` with `resume`, `migrate-recover`) to
/// the migration thread that waits for it in `postcopy-paused`.
final class ConnectionHandoff: @unchecked Sendable {
    // Sendable: `offered` is read and written under `condition`.
    private let condition = NSCondition()
    private var offered: MigrationConnection?
    private var abandoned = false

    func offer(_ connection: MigrationConnection) {
        condition.lock()
        offered = connection
        condition.broadcast()
        condition.unlock()
    }

    /// Wakes the waiter with nothing: the migration is given up.
    func abandon() {
        condition.lock()
        abandoned = true
        condition.broadcast()
        condition.unlock()
    }

    /// Blocks until a connection is offered (nil if abandoned).
    func wait() -> MigrationConnection? {
        condition.lock()
        defer { condition.unlock() }
        while offered == nil && !abandoned { _ = condition.wait(until: Date().addingTimeInterval(1)) }
        defer { offered = nil }
        return offered
    }
}
