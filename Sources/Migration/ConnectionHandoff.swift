import Foundation
import Synchronization

/// Hands a new connection from a QMP command (`migrate` with `resume`, `migrate-recover`) to
/// the migration thread that waits for it in `postcopy-paused`.
final class ConnectionHandoff: @unchecked Sendable {
    // Sendable: `offered` is read and written under `condition`.
    private let condition = NSCondition()
    private var offered: MigrationConnection?

    func offer(_ connection: MigrationConnection) {
        condition.lock()
        offered = connection
        condition.broadcast()
        condition.unlock()
    }

    /// Blocks until a connection is offered.
    func wait() -> MigrationConnection {
        condition.lock()
        defer { condition.unlock() }
        while true {
            if let connection = offered {
                offered = nil
                return connection
            }
            _ = condition.wait(until: Date().addingTimeInterval(1))
        }
    }
}
