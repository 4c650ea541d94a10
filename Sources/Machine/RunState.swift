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
    /// A destination waiting for, or loading, an incoming migration.
    case inmigrate
    /// The source stopped its vCPUs to send the last pages and the device state.
    case finishMigrate = "finish-migrate"
    /// The source after a completed migration: stopped, its guest now runs elsewhere.
    case postmigrate

    /// Whether vCPUs execute guest code in this state.
    public var isRunning: Bool { self == .running }

    /// States from which `cont` may start the vCPUs.
    public var canResume: Bool { self == .paused || self == .prelaunch || self == .postmigrate }
}

/// Why a machine stopped for good.
public enum MachineEnding: Equatable, Sendable {
    /// The guest asked for a reset (keyboard controller, triple fault): tern exits, status 0.
    case guestReset(reason: String)
    /// The guest powered off.
    case guestShutdown(reason: String)
    /// The host side asked tern to quit: QMP `quit`, a signal, or Ctrl-A x on the console.
    case hostQuit(cause: HostQuitCause, reason: String)
    /// The guest hit something the VMM cannot handle.
    case internalError(message: String)

    /// tern's exit status for this ending.
    public var exitStatus: Int32 {
        switch self {
        case .guestReset, .guestShutdown, .hostQuit: 0
        case .internalError: 1
        }
    }
}

/// Who on the host side ended the machine, with QEMU's `ShutdownCause` names.
public enum HostQuitCause: String, Sendable {
    case qmpQuit = "host-qmp-quit"
    case signal = "host-signal"
    case console = "host-ui"
}

extension MachineEnding {
    /// QEMU's SHUTDOWN event data for this ending: whether the guest caused it, and the cause.
    public var shutdownCause: (guest: Bool, reason: String) {
        switch self {
        case .guestReset: (true, "guest-reset")
        case .guestShutdown: (true, "guest-shutdown")
        case let .hostQuit(cause, _): (false, cause.rawValue)
        case .internalError: (true, "guest-panic")
        }
    }
}

/// Something that happened to the machine, for observers such as the QMP event stream.
public enum MachineEvent: Equatable, Sendable {
    case runStateChanged(RunState)
    /// The machine was reset and boots again; `byGuest` is false for a host request.
    case reset(byGuest: Bool)
    case ended(MachineEnding)
}
