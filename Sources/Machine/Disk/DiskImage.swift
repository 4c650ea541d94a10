import CDisk
import Foundation
import Synchronization

/// Why a disk image could not be opened or used. Each message names the file.
public enum DiskImageError: Error, CustomStringConvertible, Equatable {
    case openFailed(path: String, errno: Int32)
    case notAnImage(path: String)
    case badSize(path: String, size: UInt64)
    case locked(path: String, writable: Bool)
    case lockFailed(path: String, errno: Int32)
    case io(path: String, operation: String, offset: UInt64, errno: Int32)

    public var description: String {
        switch self {
        case let .openFailed(path, code):
            let hint = code == EISDIR ? " (-drive file= takes a raw image file or a block device)" : code == EACCES || code == EROFS ? " (add readonly=on to open it read-only)" : ""
            return "Could not open '\(path)': \(String(cString: strerror(code)))\(hint)"
        case let .notAnImage(path):
            return "'\(path)' is not a regular file or block device (is it a directory?)"
        case let .badSize(path, size):
            return "'\(path)' is \(size) bytes: a raw image must be a non-empty multiple of 512 bytes"
        case let .locked(path, writable):
            return writable
                ? "Failed to get \"write\" lock on '\(path)': another process (tern or QEMU) is using the image"
                : "Failed to get shared \"consistent read\" lock on '\(path)': another process is writing the image"
        case let .lockFailed(path, code):
            return "Could not lock '\(path)': \(String(cString: strerror(code)))"
        case let .io(path, operation, offset, code):
            return "\(operation) of '\(path)' at byte \(offset) failed: \(String(cString: strerror(code)))"
        }
    }
}

/// An open raw disk image: positioned reads and writes, flush, holes, the QEMU-compatible
/// write lock, and the record of which chunks were written (for block migration).
///
/// Thread-safe: reads and writes are positioned system calls; the lock state is guarded.
public final class DiskImage: Sendable {
    public let configuration: DriveConfiguration
    public let size: UInt64
    public let writes: DiskWriteTracker
    private let descriptor: Int32
    private let lock: Mutex<ImageLock>

    /// Opens the image. `active: false` opens it without taking the lock (a migration's
    /// destination, until the guest runs there); `activate()` takes it later.
    public init(_ configuration: DriveConfiguration, active: Bool) throws(DiskImageError) {
        self.configuration = configuration
        let path = configuration.path
        let fd = cdisk_open(path, configuration.readOnly ? 0 : 1, configuration.cache.direct ? 1 : 0,
                            configuration.cache.synchronous ? 1 : 0)
        guard fd >= 0 else { throw .openFailed(path: path, errno: -fd) }
        var size: UInt64 = 0
        let kind = cdisk_kind(fd, &size)
        guard kind > 0 else {
            close(fd)
            if kind < 0 { throw .openFailed(path: path, errno: -kind) }
            throw .notAnImage(path: path)
        }
        guard size > 0, size % 512 == 0 else {
            close(fd)
            throw .badSize(path: path, size: size)
        }
        self.descriptor = fd
        self.size = size
        self.writes = DiskWriteTracker(size: size)
        var imageLock = ImageLock(descriptor: fd, writable: !configuration.readOnly)
        if active {
            do { try imageLock.acquire(path: path) } catch {
                close(fd)
                throw error
            }
        }
        self.lock = Mutex(imageLock)
    }

    deinit { close(descriptor) }

    public var path: String { configuration.path }
    public var isActive: Bool { lock.withLock { $0.held } }

    /// Takes the write lock (before the guest runs on this image).
    public func activate() throws(DiskImageError) {
        try lock.withLock { (lock) throws(DiskImageError) in try lock.acquire(path: configuration.path) }
    }

    /// Releases the lock so that a migration's destination can take it; flush first.
    public func deactivate() {
        lock.withLock { $0.release() }
    }

    /// Reads `count` bytes at `offset` into `buffer`. Short reads past the end are errors.
    public func read(offset: UInt64, into buffer: UnsafeMutableRawPointer, count: Int) throws(DiskImageError) {
        try transfer(offset: offset, buffer: buffer, count: count, write: false)
    }

    /// Writes `count` bytes at `offset`, and records the chunks as written.
    public func write(offset: UInt64, from buffer: UnsafeRawPointer, count: Int) throws(DiskImageError) {
        try transfer(offset: offset, buffer: UnsafeMutableRawPointer(mutating: buffer), count: count, write: true)
        writes.markWritten(offset: offset, length: UInt64(count))
    }

    /// Makes `length` bytes at `offset` read as zeros: a hole where the file system can punch
    /// one, written zeros otherwise. Recorded as written, like `write`.
    public func zero(offset: UInt64, length: UInt64) throws(DiskImageError) {
        defer { writes.markWritten(offset: offset, length: length) }
        if cdisk_punch_hole(descriptor, offset, length) == 0 { return }
        let step = 64 << 10
        let zeros = UnsafeMutableRawPointer.allocate(byteCount: step, alignment: 4096)
        defer { zeros.deallocate() }
        zeros.initializeMemory(as: UInt8.self, repeating: 0, count: step)
        var done: UInt64 = 0
        while done < length {
            let count = Int(min(UInt64(step), length - done))
            try transfer(offset: offset + done, buffer: zeros, count: count, write: true)
            done += UInt64(count)
        }
    }

    /// fdatasync, unless the cache mode ignores flushes.
    public func flush() throws(DiskImageError) {
        guard !configuration.cache.ignoresFlush else { return }
        let result = cdisk_flush(descriptor)
        if result < 0 { throw .io(path: path, operation: "flush", offset: 0, errno: -result) }
    }

    /// The next range at or after `offset` that holds data (a file system's allocated extents);
    /// nil when only holes follow. Ranges the file system cannot classify count as data.
    public func nextDataRange(from offset: UInt64) -> Range<UInt64>? {
        guard offset < size else { return nil }
        let start = cdisk_next_data(descriptor, offset, size)
        if start < 0 { return offset..<size }
        guard UInt64(start) < size else { return nil }
        let end = cdisk_next_hole(descriptor, UInt64(start), size)
        return UInt64(start)..<(end < 0 ? size : min(UInt64(end), size))
    }

    private func transfer(offset: UInt64, buffer: UnsafeMutableRawPointer, count: Int, write: Bool) throws(DiskImageError) {
        let operation = write ? "write" : "read"
        let (end, overflow) = offset.addingReportingOverflow(UInt64(count))
        guard !overflow, end <= size else { throw .io(path: path, operation: operation, offset: offset, errno: EINVAL) }
        // O_DIRECT needs sector-aligned buffers; a guest's buffer need not be, so bounce it.
        let aligned = !configuration.cache.direct || (Int(bitPattern: buffer) % 512 == 0 && count % 512 == 0 && offset % 512 == 0)
        var target = buffer
        var bounce: UnsafeMutableRawPointer?
        if !aligned {
            let space = UnsafeMutableRawPointer.allocate(byteCount: max(count, 1), alignment: 4096)
            if write { space.copyMemory(from: buffer, byteCount: count) }
            bounce = space
            target = space
        }
        defer { bounce?.deallocate() }
        var done = 0
        while done < count {
            let result = write
                ? pwrite(descriptor, target + done, count - done, off_t(offset) + off_t(done))
                : pread(descriptor, target + done, count - done, off_t(offset) + off_t(done))
            if result > 0 {
                done += result
            } else if result < 0 && errno == EINTR {
                continue
            } else {
                throw .io(path: path, operation: operation, offset: offset + UInt64(done), errno: result == 0 ? EIO : errno)
            }
        }
        if let bounce, !write { buffer.copyMemory(from: bounce, byteCount: count) }
    }
}
