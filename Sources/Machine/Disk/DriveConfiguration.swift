/// How the host caches a disk image's data: QEMU's `cache=` modes, as three switches.
public enum DriveCacheMode: String, Equatable, Sendable, CaseIterable {
    /// Page cache, flushes honoured (QEMU's default).
    case writeback
    /// Page cache, every write reaches the disk before it completes (O_DSYNC).
    case writethrough
    /// Bypasses the page cache (O_DIRECT); flushes honoured.
    case none
    /// O_DIRECT and O_DSYNC.
    case directsync
    /// Page cache, flushes ignored: fast and unsafe if the host crashes.
    case unsafe

    var direct: Bool { self == .none || self == .directsync }
    var synchronous: Bool { self == .writethrough || self == .directsync }
    var ignoresFlush: Bool { self == .unsafe }
}

/// One `-drive file=PATH,format=raw,if=virtio`: a raw image the guest sees as a virtio-blk disk.
public struct DriveConfiguration: Equatable, Sendable {
    public var path: String
    public var readOnly: Bool
    public var cache: DriveCacheMode
    /// QEMU's `id=` (the name query-block reports), `drive-virtio-disk0` style when absent.
    public var id: String

    public init(path: String, readOnly: Bool = false, cache: DriveCacheMode = .writeback, id: String) {
        self.path = path
        self.readOnly = readOnly
        self.cache = cache
        self.id = id
    }
}
