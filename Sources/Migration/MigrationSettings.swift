/// The migration capabilities of the 2015 reference, by their QMP names, and whether tern
/// implements each.
public enum MigrationCapability: String, Sendable, CaseIterable {
    case xbzrle
    case rdmaPinAll = "rdma-pin-all"
    case autoConverge = "auto-converge"
    case zeroBlocks = "zero-blocks"
    case compress
    case events
    case postcopyRAM = "x-postcopy-ram"

    /// Capabilities tern can turn on; the others are refused when set to true.
    public var isImplemented: Bool { self == .events }
}

/// Migration parameters: the 2015 reference's, plus `max-bandwidth` and `downtime-limit`
/// (which `migrate_set_speed` and `migrate_set_downtime` also set).
public struct MigrationParameters: Equatable, Sendable {
    /// Bytes per second; QEMU's default MAX_THROTTLE is 32 MiB/s.
    public var maxBandwidth: UInt64 = 32 << 20
    /// Nanoseconds the guest may be stopped for the final copy (QEMU keeps nanoseconds);
    /// default 300 ms.
    public var downtimeLimitNanoseconds: UInt64 = 300_000_000

    /// The limit in milliseconds, as `downtime-limit` reports it.
    public var downtimeLimit: UInt64 {
        get { downtimeLimitNanoseconds / 1_000_000 }
        set { downtimeLimitNanoseconds = newValue.multipliedReportingOverflow(by: 1_000_000).overflow ? .max : newValue * 1_000_000 }
    }
    public var compressLevel: Int64 = 1
    public var compressThreads: Int64 = 8
    public var decompressThreads: Int64 = 2
    public var cpuThrottleInitial: Int64 = 20
    public var cpuThrottleIncrement: Int64 = 10

    public init() {}

    /// The largest downtime limit accepted, in milliseconds (2000 seconds, as later QEMUs).
    public static let maximumDowntimeLimit: UInt64 = 2_000_000

    /// Checks a parameter against the reference's range, with its error text. `max-bandwidth`
    /// and `downtime-limit` are later QEMUs' parameters (2.8); their texts follow that style.
    public static func validate(_ name: String, _ value: Int64) -> String? {
        switch name {
        case "compress-level":
            return (0...9).contains(value) ? nil : "Parameter 'compress_level' expects is invalid, it should be in the range of 0 to 9"
        case "compress-threads":
            return (1...255).contains(value) ? nil : "Parameter 'compress_threads' expects is invalid, it should be in the range of 1 to 255"
        case "decompress-threads":
            return (1...255).contains(value) ? nil : "Parameter 'decompress_threads' expects is invalid, it should be in the range of 1 to 255"
        case "x-cpu-throttle-initial":
            return (1...99).contains(value) ? nil : "Parameter 'x_cpu_throttle_initial' expects an integer in the range of 1 to 99"
        case "x-cpu-throttle-increment":
            return (1...99).contains(value) ? nil : "Parameter 'x_cpu_throttle_increment' expects an integer in the range of 1 to 99"
        case "max-bandwidth":
            return value >= 0 ? nil : "Parameter 'max_bandwidth' expects an integer in the range of 0 to \(Int64.max) bytes/second"
        case "downtime-limit":
            return (0...Int64(maximumDowntimeLimit)).contains(value) ? nil
                : "Parameter 'downtime_limit' expects an integer in the range of 0 to \(maximumDowntimeLimit) milliseconds"
        default:
            return "Parameter '\(name)' is unexpected"
        }
    }

    /// Names in the order `query-migrate-parameters` lists them.
    public static let names = ["compress-level", "compress-threads", "decompress-threads", "x-cpu-throttle-initial",
                               "x-cpu-throttle-increment", "max-bandwidth", "downtime-limit"]

    public func value(of name: String) -> Int64 {
        switch name {
        case "compress-level": compressLevel
        case "compress-threads": compressThreads
        case "decompress-threads": decompressThreads
        case "x-cpu-throttle-initial": cpuThrottleInitial
        case "x-cpu-throttle-increment": cpuThrottleIncrement
        case "max-bandwidth": Int64(clamping: maxBandwidth)
        case "downtime-limit": Int64(clamping: downtimeLimit)
        default: 0
        }
    }

    public mutating func set(_ name: String, _ value: Int64) {
        switch name {
        case "compress-level": compressLevel = value
        case "compress-threads": compressThreads = value
        case "decompress-threads": decompressThreads = value
        case "x-cpu-throttle-initial": cpuThrottleInitial = value
        case "x-cpu-throttle-increment": cpuThrottleIncrement = value
        case "max-bandwidth": maxBandwidth = UInt64(value)
        case "downtime-limit": downtimeLimit = UInt64(value)
        default: break
        }
    }
}
