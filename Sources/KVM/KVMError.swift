#if canImport(Glibc)
import Glibc
#endif

/// A failed KVM operation: which request or system call failed and the errno it returned.
///
/// The description reads as a sentence a user can act on, e.g.
/// `KVM_CREATE_VM failed: Cannot allocate memory (errno 12)`.
public struct KVMError: Error, CustomStringConvertible, Equatable, Sendable {
    /// The name of the ioctl or system call, e.g. `KVM_SET_USER_MEMORY_REGION`.
    public let operation: String
    /// The errno value the kernel returned.
    public let errno: Int32
    /// Extra context, e.g. the path that could not be opened.
    public let detail: String?

    public init(_ operation: String, errno: Int32, detail: String? = nil) {
        self.operation = operation
        self.errno = errno
        self.detail = detail
    }

    public var description: String {
        let reason = String(cString: strerror(errno))
        if let detail {
            return "\(operation) failed: \(detail): \(reason) (errno \(errno))"
        }
        return "\(operation) failed: \(reason) (errno \(errno))"
    }
}

/// Calls a system call that returns -1 and sets errno on failure, retrying on EINTR.
@inline(__always)
func retryingOnInterrupt(_ operation: @autoclosure () -> String, _ body: () -> Int32) throws(KVMError) -> Int32 {
    while true {
        let result = body()
        if result >= 0 { return result }
        let code = Glibc.errno
        if code == EINTR { continue }
        throw KVMError(operation(), errno: code)
    }
}
