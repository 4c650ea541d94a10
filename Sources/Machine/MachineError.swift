import KVM

/// Why a machine could not be built or started. Each message says what to do about it.
public enum MachineError: Error, CustomStringConvertible {
    case kvmUnavailable(path: String, reason: String)
    case kvmAPIVersion(Int32)
    case missingCapability(KVMCapability)
    case kvm(KVMError)
    case memory(GuestMemoryError)
    case kernel(KernelImageError)
    case initrd(path: String, reason: String)
    case commandLineTooLong(length: Int, maximum: Int)
    case builtinGuest(reason: String)
    case serial(path: String, reason: String)
    case invalidConfiguration(String)
    case invariantTSCUnavailable
    /// A `-drive` image could not be opened or locked.
    case disk(DiskImageError)
    /// A request the machine's present state does not allow (a reset during a switchover).
    case refused(String)

    public var description: String {
        switch self {
        case let .kvmUnavailable(path, reason):
            return "KVM is not available: \(path): \(reason)"
        case let .kvmAPIVersion(version):
            return "KVM API version \(version) is not supported (tern needs \(KVMSystem.expectedAPIVersion))"
        case let .missingCapability(capability):
            return "this host's KVM lacks \(capability.name), which tern needs"
        case let .kvm(error):
            return error.description
        case let .memory(error):
            return error.description
        case let .kernel(error):
            return error.description
        case let .initrd(path, reason):
            return "cannot load initrd '\(path)': \(reason)"
        case let .commandLineTooLong(length, maximum):
            return "the kernel command line is \(length) bytes; this kernel accepts at most \(maximum)"
        case let .builtinGuest(reason):
            return "the built-in guest image is unusable: \(reason)"
        case let .serial(path, reason):
            return "cannot open serial output '\(path)': \(reason)"
        case let .invalidConfiguration(message):
            return message
        case let .refused(reason):
            return reason
        case let .disk(error):
            return error.description
        case .invariantTSCUnavailable:
            return "-cpu host,+invtsc: this host's KVM does not offer the invariant TSC"
        }
    }
}
