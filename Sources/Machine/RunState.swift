/// The machine's run state, named as QEMU's `query-status` names it.
public enum RunState: String, Sendable, CaseIterable {
    /// Started with `-S`: set up, never run yet.
    case prelaunch
    case running
    case paused
    /// The guest shut down or reset (tern ends rather than rebooting).
    case shutdown
    /// KVM could not continue the guest (an exit tern or KVM cannot handle).
    case internalError = "internal-error"

    /// Whether vCPUs execute guest code in this state.
    public var isRunning: Bool { self == .running }
}

/// Why a machine stopped for good.
public enum MachineEnding: Equatable, Sendable {
    /// The guest asked for a reset (keyboard controller, triple fault): tern exits, status 0.
    case guestReset(reason: String)
    /// The guest powered off.
    case guestShutdown(reason: String)
    /// The user asked tern to quit (Ctrl-A x on the console, or a signal).
    case userQuit(reason: String)
    /// The guest hit something the VMM cannot handle.
    case internalError(message: String)

    /// tern's exit status for this ending.
    public var exitStatus: Int32 {
        switch self {
        case .guestReset, .guestShutdown, .userQuit: 0
        case .internalError: 1
        }
    }
}
