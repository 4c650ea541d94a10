/// What `query-migrate` reports, kept up to date by the migration thread.
public struct MigrationStatistics: Equatable, Sendable {
    public var status: MigrationStatus = .none
    /// Wall-clock milliseconds when the migration started (for total-time while active).
    public var startMilliseconds: UInt64 = 0
    public var totalTime: UInt64?
    public var setupTime: UInt64?
    public var downtime: UInt64?
    public var expectedDowntime: UInt64?
    public var transferred: UInt64 = 0
    public var remaining: UInt64 = 0
    public var total: UInt64 = 0
    /// Zero pages, sent as a flag.
    public var duplicate: UInt64 = 0
    public var skipped: UInt64 = 0
    /// Pages sent with their contents.
    public var normal: UInt64 = 0
    /// Bytes sent on the multifd channels (QEMU's `ram.multifd-bytes`); nil without multifd.
    public var multifdBytes: UInt64?
    /// Block migration's progress (`blk` or `inc`), as query-migrate's `disk`.
    public var disk: DiskMigrationStatistics?
    public var dirtyPagesRate: UInt64 = 0
    public var mbps: Double = 0
    public var dirtySyncCount: UInt64 = 0
    public var errorDescription: String?
    /// XBZRLE counters, while the capability is in use.
    public var xbzrle: XBZRLEStatistics?
    /// Compression counters, while the capability is in use.
    public var compression: CompressionStatistics?
    /// The vCPU throttle auto-converge holds now, in percent (0 when none).
    public var cpuThrottlePercentage = 0
    /// The highest throttle this migration applied.
    public var cpuThrottleMaximum = 0
    /// Page requests from the destination served during postcopy.
    public var postcopyRequests: UInt64 = 0
    /// Whether the migration switched to postcopy.
    public var enteredPostcopy = false
    /// Stream bytes sent after the switchover (QEMU 7's `postcopy-bytes`).
    public var postcopyBytes: UInt64 = 0
    /// Where pre-copy is heading (tern's `x-forecast`).
    public var forecast: MigrationForecast?
    /// The steps SLO escalation took (tern's `x-escalations`).
    public var escalations: [Escalation] = []

    public init() {}

    public var normalBytes: UInt64 { normal * MigrationStreamFormat.pageSize }
}

/// `query-migrate`'s `xbzrle-cache`, with QEMU's meanings.
public struct XBZRLEStatistics: Equatable, Sendable {
    public var cacheSize: UInt64
    /// Bytes of XBZRLE deltas sent.
    public var bytes: UInt64
    /// Pages sent as deltas.
    public var pages: UInt64
    public var cacheMiss: UInt64
    /// Misses per lookup over the last pass.
    public var cacheMissRate: Double
    /// Pages whose delta would not pay and went whole.
    public var overflow: UInt64
}

/// `query-migrate`'s `compression`, with QEMU's meanings.
public struct CompressionStatistics: Equatable, Sendable {
    public var pages: UInt64
    public var busy: UInt64
    public var busyRate: Double
    /// Bytes of compressed data sent.
    public var compressedSize: UInt64
    /// Uncompressed bytes per compressed byte.
    public var compressionRate: Double
}

/// Statistics of the incoming side, for the destination's `query-migrate`.
public struct IncomingStatistics: Equatable, Sendable {
    public var status: MigrationStatus = .none
    public var pagesLoaded: UInt64 = 0
    public var zeroPagesLoaded: UInt64 = 0
    public var bytesRead: UInt64 = 0
    /// Milliseconds from the source's vCPU stop to this side's vCPU start (same clock on one
    /// host; across hosts, as good as their clock synchronisation).
    public var guestDowntime: UInt64?
    public var errorDescription: String?
    /// Postcopy's faults and their fault-to-install latency, once the guest runs here.
    public var postcopyFaults: PostcopyFaultStatistics?

    public init() {}
}

/// Wall-clock time, in milliseconds and nanoseconds since the epoch.
public enum WallClock {
    /// Milliseconds since the epoch.
    public static var now: UInt64 { milliseconds() }

    static func nanoseconds() -> UInt64 {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        return UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
    }

    static func milliseconds() -> UInt64 { nanoseconds() / 1_000_000 }

    /// Monotonic milliseconds, for intervals.
    static func monotonicMilliseconds() -> UInt64 { monotonicNanoseconds() / 1_000_000 }

    /// Monotonic nanoseconds, for short intervals.
    static func monotonicNanoseconds() -> UInt64 {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        return UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
    }
}

#if canImport(Glibc)
import Glibc
#endif

/// query-migrate's `disk`: bytes of disk sent, still to send, and the total to send.
/// tern adds `streamBytes`: what the block records took on the stream (holes and, with
/// zero-blocks, zero chunks count in `transferred` but cost a few bytes each).
public struct DiskMigrationStatistics: Equatable, Sendable {
    public var transferred: UInt64
    public var remaining: UInt64
    public var total: UInt64
    public var streamBytes: UInt64
}
