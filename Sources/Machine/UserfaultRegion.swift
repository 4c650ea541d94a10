import CGuestMemory
#if canImport(Glibc)
import Glibc
#endif

/// Guest RAM registered with userfaultfd in missing-page mode: a thread (a vCPU inside KVM,
/// or tern itself) that touches a page the memfd does not hold waits until someone installs it.
/// Postcopy's destination uses this to fetch pages from the source on demand.
///
/// Installs are atomic (`UFFDIO_COPY`, `UFFDIO_ZEROPAGE`): a page becomes visible whole and its
/// waiters wake, so no vCPU ever reads a half-written page. Offsets are byte offsets into the
/// RAM mapping and are checked against it before any ioctl.
public final class UserfaultRegion: @unchecked Sendable {
    // Sendable: the descriptor and range are fixed; the kernel serialises the ioctls.
    public let memory: GuestMemory
    private let descriptor: Int32
    private var registered = true

    /// The outcome of an install.
    public enum Install: Equatable, Sendable {
        case installed
        /// The page was already there (installed earlier, or never missing): nothing changed.
        case alreadyPresent
    }

    /// Why this kernel cannot fault guest RAM in on demand, or nil if it can (a destination
    /// checks before it accepts a stream that may switch to postcopy).
    public static var unavailableReason: String? {
        let fd = cguest_uffd_open()
        guard fd >= 0 else { return GuestMemoryError.userfault(operation: "userfaultfd", errno: -fd).description }
        close(fd)
        return nil
    }

    /// Opens userfaultfd and registers all of guest RAM.
    public init(memory: GuestMemory) throws(GuestMemoryError) {
        self.memory = memory
        let fd = cguest_uffd_open()
        guard fd >= 0 else { throw .userfault(operation: "userfaultfd", errno: -fd) }
        let result = cguest_uffd_register(fd, memory.hostBase, memory.size)
        guard result == 0 else {
            close(fd)
            throw .userfault(operation: "UFFDIO_REGISTER", errno: -result)
        }
        descriptor = fd
    }

    deinit {
        unregister()
        close(descriptor)
    }

    private func checked(_ offset: UInt64, _ length: UInt64) throws(GuestMemoryError) -> UnsafeMutableRawPointer {
        let pageSize: UInt64 = 4096
        guard offset % pageSize == 0, length % pageSize == 0, length > 0,
              let pointer = memory.pointer(atOffset: offset, length: length) else {
            throw .outOfRange(address: GuestAddress(offset), length: length)
        }
        return pointer
    }

    /// Copies `length` bytes from `source` into the missing pages at `offset`.
    public func copy(offset: UInt64, from source: UnsafeRawPointer, length: UInt64) throws(GuestMemoryError) -> Install {
        let pointer = try checked(offset, length)
        let result = cguest_uffd_copy(descriptor, pointer, source, length)
        return try outcome(result, "UFFDIO_COPY", pointer, length)
    }

    /// Installs zero pages at `offset`.
    public func zero(offset: UInt64, length: UInt64) throws(GuestMemoryError) -> Install {
        let pointer = try checked(offset, length)
        let result = cguest_uffd_zeropage(descriptor, pointer, length)
        return try outcome(result, "UFFDIO_ZEROPAGE", pointer, length)
    }

    private func outcome(_ result: Int32, _ operation: String, _ pointer: UnsafeMutableRawPointer,
                         _ length: UInt64) throws(GuestMemoryError) -> Install {
        if result == 0 { return .installed }
        if result == -EEXIST {
            // Someone installed it first; a waiter that faulted in between must still wake.
            _ = cguest_uffd_wake(descriptor, pointer, length)
            return .alreadyPresent
        }
        throw .userfault(operation: operation, errno: -result)
    }

    /// Waits up to `timeoutMilliseconds` for faults or for `wakeDescriptor` to become readable.
    public enum Wait: Equatable, Sendable { case faults, woken, timedOut }

    public func wait(wakeDescriptor: Int32, timeoutMilliseconds: Int32) throws(GuestMemoryError) -> Wait {
        let result = cguest_uffd_poll(descriptor, wakeDescriptor, timeoutMilliseconds)
        switch result {
        case 1: return .faults
        case 2: return .woken
        case 0: return .timedOut
        default: throw .userfault(operation: "poll", errno: -result)
        }
    }

    /// The RAM offsets (page-aligned) of pending faults; empty when none is pending.
    public func pendingFaults() throws(GuestMemoryError) -> [UInt64] {
        var addresses = [UInt64](repeating: 0, count: 64)
        let count = addresses.withUnsafeMutableBufferPointer { cguest_uffd_read_faults(descriptor, $0.baseAddress!, 64) }
        guard count >= 0 else { throw .userfault(operation: "read", errno: -count) }
        let base = UInt64(UInt(bitPattern: memory.hostBase))
        return addresses.prefix(Int(count)).compactMap { address in
            guard address >= base, address - base < memory.size else { return nil }
            return (address - base) & ~4095
        }
    }

    /// Ends missing-page handling: every page is there, so nothing can fault any more.
    public func unregister() {
        guard registered else { return }
        registered = false
        _ = cguest_uffd_unregister(descriptor, memory.hostBase, memory.size)
    }
}
