/// The states of a migration, with QEMU's names (`MigrationStatus` in its QMP schema).
public enum MigrationStatus: String, Sendable, CaseIterable {
    case none
    case setup
    case cancelling
    case cancelled
    case active
    /// The guest runs on the destination; the source streams the pages it still lacks.
    case postcopyActive = "postcopy-active"
    /// The connection broke during postcopy: both sides keep what they hold and wait.
    case postcopyPaused = "postcopy-paused"
    /// A new connection is being set up to resume a paused postcopy.
    case postcopyRecover = "postcopy-recover"
    case completed
    case failed

    /// Every legal transition, in one place. Anything else is a bug and is refused.
    public func canMove(to next: MigrationStatus) -> Bool {
        switch (self, next) {
        case (.none, .setup), (.completed, .setup), (.failed, .setup), (.cancelled, .setup):
            return true // a new migration may start once the previous one has ended
        case (.setup, .active), (.setup, .failed), (.setup, .cancelling), (.setup, .cancelled):
            return true
        case (.active, .completed), (.active, .failed), (.active, .cancelling), (.active, .postcopyActive):
            return true
        case (.postcopyActive, .completed), (.postcopyActive, .failed), (.postcopyActive, .postcopyPaused):
            return true
        case (.postcopyPaused, .postcopyRecover), (.postcopyPaused, .failed):
            return true
        case (.postcopyRecover, .postcopyActive), (.postcopyRecover, .postcopyPaused), (.postcopyRecover, .failed):
            return true
        case (.cancelling, .cancelled), (.cancelling, .failed), (.cancelling, .completed):
            return true
        default:
            return false
        }
    }

    /// Setup, active or postcopy: a migration is under way.
    public var isInProgress: Bool {
        switch self {
        case .setup, .active, .postcopyActive, .postcopyPaused, .postcopyRecover, .cancelling: true
        default: false
        }
    }

    /// After the switchover: the guest runs (or waits) on the destination.
    public var isPostcopy: Bool { self == .postcopyActive || self == .postcopyPaused || self == .postcopyRecover }
}
