#if canImport(Glibc)
import Glibc
#endif

/// Owns one open file descriptor and closes it when the owner goes away.
///
/// KVM hands out three kinds of descriptors (the system, a VM, a vCPU); each wrapper holds one
/// of these so that a descriptor is never closed twice or leaked on an error path.
public final class OwnedFileDescriptor: @unchecked Sendable {
    // Sendable: the descriptor number never changes after init; the kernel serialises use.
    public let rawValue: Int32

    public init(taking rawValue: Int32) {
        self.rawValue = rawValue
    }

    deinit {
        close(rawValue)
    }
}
