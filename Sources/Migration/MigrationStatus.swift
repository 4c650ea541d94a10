/// The states of a migration, with QEMU's names (`MigrationStatus` in its QMP schema).
public enum MigrationStatus: String, Sendable, CaseIterable {
    case none
    case setup
    case cancelling
    case cancelled
    case active
    /// Reserved: tern does not do postcopy yet.
    case postcopyActive = "postcopy-active"
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
        case (.postcopyActive, .completed), (.postcopyActive, .failed), (.postcopyActive, .cancelling):
            return true
        case (.cancelling, .cancelled), (.cancelling, .failed), (.cancelling, .completed):
            return true
        default:
            return false
        }
    }

    /// Setup, active or postcopy: a migration is under way.
    public var isInProgress: Bool { self == .setup || self == .active || self == .postcopyActive || self == .cancelling }
}
