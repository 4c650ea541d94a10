import CGuestMemory
#if canImport(Glibc)
import Glibc
#endif

/// Errors from reaching into guest memory.
public enum GuestMemoryError: Error, CustomStringConvertible, Equatable {
    case outOfRange(address: GuestAddress, length: UInt64)
    case mapFailed(size: UInt64, errno: Int32)
    case userfault(operation: String, errno: Int32)
    case preallocationFailed(size: UInt64, errno: Int32)

    public var description: String {
        switch self {
        case let .outOfRange(address, length):
            return "guest memory access of \(length) bytes at \(address) is outside guest RAM"
        case let .mapFailed(size, code):
            return "cannot reserve \(size >> 20) MiB of guest RAM: \(String(cString: strerror(code)))"
        case let .preallocationFailed(size, code):
            return "cannot preallocate \(size >> 20) MiB of guest RAM (-mem-prealloc): \(String(cString: strerror(code)))"
        case let .userfault(operation, code):
            let reason = code == ENOTSUP ? "this kernel cannot handle missing-page faults on shared memory"
                : String(cString: strerror(code))
            return "userfaultfd (\(operation)) failed: \(reason)"
        }
    }
}

/// All guest RAM: one memfd mapped shared, so that a large `-m` costs nothing until the guest
/// touches it, split into regions by a `GuestMemoryLayout`.
///
/// A memfd (rather than an anonymous mapping) lets migration and digests find the pages the
/// guest never touched with `lseek(SEEK_DATA/SEEK_HOLE)` and skip them without reading them,
/// which would otherwise allocate them.
///
/// Every access by guest-physical address is bounds-checked against the layout; this is the
/// one place that turns a guest address into a host pointer.
public final class GuestMemory: @unchecked Sendable {
    // Sendable: the mapping is fixed for the object's life; the bytes are shared with the guest
    // by design and synchronised by the guest or by pausing it.
    public let layout: GuestMemoryLayout
    /// The start of the host mapping.
    public let hostBase: UnsafeMutableRawPointer
    /// The memfd behind the mapping.
    public let descriptor: Int32

    /// Pages tern itself wrote while dirty tracking was on; merged into the next dirty sync.
    let hostWrites = HostWriteLog()

    /// Pages `place` or `preallocate` made present, so that placing over them again is a plain
    /// copy through the mapping instead of a `pwrite` (a system call per run, and a page-cache
    /// walk per page). Only the migration loader places pages; `discard` clears the bits.
    private var placedPages: DirtyBitmap

    public init(layout: GuestMemoryLayout) throws(GuestMemoryError) {
        self.layout = layout
        let fd = cguest_memfd_create("tern-guest-ram")
        guard fd >= 0 else { throw .mapFailed(size: layout.ramSize, errno: -fd) }
        guard ftruncate(fd, off_t(layout.ramSize)) == 0,
              let base = mmap(nil, Int(layout.ramSize), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0),
              base != MAP_FAILED else {
            let code = errno
            close(fd)
            throw .mapFailed(size: layout.ramSize, errno: code)
        }
        self.descriptor = fd
        self.hostBase = base
        self.placedPages = DirtyBitmap(pageCount: Int((layout.ramSize + DirtyBitmap.pageSize - 1) / DirtyBitmap.pageSize))
    }

    deinit {
        munmap(hostBase, Int(layout.ramSize))
        close(descriptor)
    }

    /// The byte ranges of `offset..<offset+length` (offsets in the RAM mapping) that hold data;
    /// everything else has never been written and reads as zero.
    public func dataExtents(offset: UInt64, length: UInt64) -> [(offset: UInt64, length: UInt64)] {
        var extents: [(offset: UInt64, length: UInt64)] = []
        let end = min(offset + length, layout.ramSize)
        var position = offset
        while position < end {
            let data = cguest_seek_data(descriptor, Int64(position))
            if data < 0 { break } // ENXIO: only a hole remains
            let start = UInt64(data)
            if start >= end { break }
            let hole = cguest_seek_hole(descriptor, Int64(start))
            let stop = hole < 0 ? end : min(UInt64(hole), end)
            extents.append((offset: start, length: stop - start))
            position = stop
        }
        return extents
    }

    /// Whether every page of the range (checked to lie in RAM) was made present by `place` or
    /// `preallocate` and not discarded since.
    public func isPlaced(offset: UInt64, length: UInt64) -> Bool {
        guard length > 0, pointer(atOffset: offset, length: length) != nil else { return false }
        let pages = Self.pages(offset: offset, length: length)
        return placedPages.nextClear(from: pages.lowerBound) >= pages.upperBound
    }

    /// The pages a byte range (already checked to lie in RAM) touches, whole or in part.
    private static func pages(offset: UInt64, length: UInt64) -> Range<Int> {
        let pageSize = DirtyBitmap.pageSize
        return Int(offset / pageSize)..<Int((offset + length + pageSize - 1) / pageSize)
    }

    /// Allocates all of RAM now (`-mem-prealloc`), so that neither the guest nor an incoming
    /// migration pays for fresh memory later: on this host a first touch costs 3-15 µs per
    /// page (docs/performance.md), which made it most of a destination's time.
    public func preallocate() throws(GuestMemoryError) {
        let result = cguest_populate(hostBase, Int(layout.ramSize), 4096)
        guard result == 0 else { throw .preallocationFailed(size: layout.ramSize, errno: -result) }
        placedPages = DirtyBitmap(pageCount: placedPages.pageCount, allSet: true)
    }

    /// Makes a range read as zero again, freeing its memory (FALLOC_FL_PUNCH_HOLE): how a
    /// destination applies a run of zero pages without allocating them.
    public func discard(offset: UInt64, length: UInt64) -> Bool {
        guard offset + length <= layout.ramSize else { return false }
        for page in Self.pages(offset: offset, length: length) { placedPages.clear(page) }
        return cguest_punch_hole(descriptor, Int64(offset), Int64(length)) == 0
    }

    public var size: UInt64 { layout.ramSize }

    /// A host pointer to `length` bytes of guest memory at `address`, checked to lie in RAM.
    /// Pass `forWriting: true` when tern will store through it, so that a migration in
    /// progress sends those pages again (KVM's dirty log sees only the guest's own writes).
    public func pointer(at address: GuestAddress, length: UInt64, forWriting: Bool = false) throws(GuestMemoryError) -> UnsafeMutableRawPointer {
        guard let offset = layout.hostOffset(of: address, length: length) else {
            throw .outOfRange(address: address, length: length)
        }
        if forWriting { hostWrites.record(offset: offset, length: length) }
        return hostBase + Int(offset)
    }

    /// A host pointer to `length` bytes at an offset in the RAM mapping (migration addresses
    /// RAM by offset, as QEMU's ram_addr), checked against the RAM size.
    public func pointer(atOffset offset: UInt64, length: UInt64) -> UnsafeMutableRawPointer? {
        let (end, overflow) = offset.addingReportingOverflow(length)
        guard !overflow, end <= layout.ramSize else { return nil }
        return hostBase + Int(offset)
    }

    /// Copies `count` bytes from `source` into RAM at `offset` (an offset in the RAM mapping,
    /// as `pointer(atOffset:length:)` takes; false if the range is not in RAM).
    ///
    /// It writes to the memfd with `pwrite` rather than storing through the mapping: a page not
    /// yet present that a write fills whole is allocated without being zeroed first, whereas a
    /// store through the mapping faults it in zeroed, page by page. On a destination receiving
    /// RAM that zeroing was two thirds of its CPU time, and `pwrite` is 2-7x faster than the
    /// faulting copy on this host (docs/performance.md). A failed write falls back to the copy.
    /// Not for RAM under userfaultfd (postcopy installs pages with UFFDIO_COPY instead).
    @discardableResult
    public func place(atOffset offset: UInt64, from source: UnsafeRawPointer, count: Int) -> Bool {
        guard count >= 0, let destination = pointer(atOffset: offset, length: UInt64(count)) else { return false }
        if isPlaced(offset: offset, length: UInt64(count)) {
            destination.copyMemory(from: source, byteCount: count)
            return true
        }
        let pageSize = Int(DirtyBitmap.pageSize)
        if offset % UInt64(pageSize) == 0 && count % pageSize == 0 {
            for page in Self.pages(offset: offset, length: UInt64(count)) { placedPages.set(page) }
        }
        var done = 0
        while done < count {
            let written = pwrite(descriptor, source + done, count - done, off_t(offset) + off_t(done))
            if written > 0 {
                done += written
            } else if written < 0 && errno == EINTR {
                continue
            } else {
                (destination + done).copyMemory(from: source + done, byteCount: count - done)
                break
            }
        }
        return true
    }

    /// Copies bytes into guest memory.
    public func write(_ bytes: [UInt8], at address: GuestAddress) throws(GuestMemoryError) {
        let destination = try pointer(at: address, length: UInt64(bytes.count), forWriting: true)
        bytes.withUnsafeBytes { destination.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
    }

    /// Copies bytes out of guest memory.
    public func read(at address: GuestAddress, count: Int) throws(GuestMemoryError) -> [UInt8] {
        let source = try pointer(at: address, length: UInt64(count))
        return Array(UnsafeRawBufferPointer(start: source, count: count))
    }

    /// Stores a little-endian integer.
    public func store<T: FixedWidthInteger>(_ value: T, at address: GuestAddress) throws(GuestMemoryError) {
        let destination = try pointer(at: address, length: UInt64(MemoryLayout<T>.size), forWriting: true)
        destination.storeBytes(of: value.littleEndian, as: T.self)
    }

    /// Loads a little-endian integer.
    public func load<T: FixedWidthInteger>(_ type: T.Type, at address: GuestAddress) throws(GuestMemoryError) -> T {
        let source = try pointer(at: address, length: UInt64(MemoryLayout<T>.size))
        return T(littleEndian: source.loadUnaligned(as: T.self))
    }
}
