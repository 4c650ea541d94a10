#if canImport(Glibc)
import Glibc
#endif

/// Errors from reaching into guest memory.
public enum GuestMemoryError: Error, CustomStringConvertible, Equatable {
    case outOfRange(address: GuestAddress, length: UInt64)
    case mapFailed(size: UInt64, errno: Int32)

    public var description: String {
        switch self {
        case let .outOfRange(address, length):
            return "guest memory access of \(length) bytes at \(address) is outside guest RAM"
        case let .mapFailed(size, code):
            return "cannot reserve \(size >> 20) MiB of guest RAM: \(String(cString: strerror(code)))"
        }
    }
}

/// All guest RAM: one anonymous shared mapping, reserved lazily so that a large `-m` costs
/// nothing until the guest touches it, and split into regions by a `GuestMemoryLayout`.
///
/// Every access by guest-physical address is bounds-checked against the layout; this is the
/// one place that turns a guest address into a host pointer.
public final class GuestMemory: @unchecked Sendable {
    // Sendable: the mapping is fixed for the object's life; the bytes are shared with the guest
    // by design and synchronised by the guest or by pausing it.
    public let layout: GuestMemoryLayout
    /// The start of the host mapping.
    public let hostBase: UnsafeMutableRawPointer

    public init(layout: GuestMemoryLayout) throws(GuestMemoryError) {
        self.layout = layout
        let flags = MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE
        guard let base = mmap(nil, Int(layout.ramSize), PROT_READ | PROT_WRITE, flags, -1, 0), base != MAP_FAILED else {
            throw .mapFailed(size: layout.ramSize, errno: errno)
        }
        self.hostBase = base
    }

    deinit {
        munmap(hostBase, Int(layout.ramSize))
    }

    public var size: UInt64 { layout.ramSize }

    /// A host pointer to `length` bytes of guest memory at `address`, checked to lie in RAM.
    public func pointer(at address: GuestAddress, length: UInt64) throws(GuestMemoryError) -> UnsafeMutableRawPointer {
        guard let offset = layout.hostOffset(of: address, length: length) else {
            throw .outOfRange(address: address, length: length)
        }
        return hostBase + Int(offset)
    }

    /// Copies bytes into guest memory.
    public func write(_ bytes: [UInt8], at address: GuestAddress) throws(GuestMemoryError) {
        let destination = try pointer(at: address, length: UInt64(bytes.count))
        bytes.withUnsafeBytes { destination.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
    }

    /// Copies bytes out of guest memory.
    public func read(at address: GuestAddress, count: Int) throws(GuestMemoryError) -> [UInt8] {
        let source = try pointer(at: address, length: UInt64(count))
        return Array(UnsafeRawBufferPointer(start: source, count: count))
    }

    /// Stores a little-endian integer.
    public func store<T: FixedWidthInteger>(_ value: T, at address: GuestAddress) throws(GuestMemoryError) {
        let destination = try pointer(at: address, length: UInt64(MemoryLayout<T>.size))
        destination.storeBytes(of: value.littleEndian, as: T.self)
    }

    /// Loads a little-endian integer.
    public func load<T: FixedWidthInteger>(_ type: T.Type, at address: GuestAddress) throws(GuestMemoryError) -> T {
        let source = try pointer(at: address, length: UInt64(MemoryLayout<T>.size))
        return T(littleEndian: source.loadUnaligned(as: T.self))
    }
}
