/// The migration capabilities of the 2015 reference, by their QMP names, and whether tern
/// implements each.
public enum MigrationCapability: String, Sendable, CaseIterable {
    case xbzrle
    case rdmaPinAll = "rdma-pin-all"
    case autoConverge = "auto-converge"
    case zeroBlocks = "zero-blocks"
    case compress
    case events
    /// The 2015 name; `postcopy-ram` is QEMU 2.6's. They are one capability.
    case xPostcopyRAM = "x-postcopy-ram"
    case postcopyRAM = "postcopy-ram"
    /// QEMU 2.8's switch for the destination's replies. tern opens the return path on every
    /// socket migration whether it is set or not (exec: and pipes have none); libvirt requires
    /// the capability to be listed and sets it.
    case returnPath = "return-path"
    /// QEMU 4.0's multiple channels: RAM pages go over `multifd-channels` connections of their
    /// own, each with a sending and a receiving thread (MultifdChannels.swift).
    case multifd

    /// Capabilities tern can turn on; the others are refused when set to true.
    public var isImplemented: Bool {
        switch self {
        case .events, .xbzrle, .compress, .autoConverge, .xPostcopyRAM, .postcopyRAM, .returnPath, .multifd, .zeroBlocks: true
        case .rdmaPinAll: false
        }
    }

    /// The reference's rules between capabilities, applied after a change: returns the
    /// message to print for each rule that turned a capability off (QEMU prints it and still
    /// answers `{}`).
    static func applyRules(_ capabilities: inout [MigrationCapability: Bool]) -> [String] {
        var messages: [String] = []
        if capabilities[.postcopyRAM] == true && capabilities[.compress] == true {
            capabilities[.postcopyRAM] = false
            capabilities[.xPostcopyRAM] = false
            messages.append("Postcopy is not currently compatible with compression")
        }
        return messages
    }

    /// The capabilities a change to `self` sets: both names of postcopy move together.
    var aliases: [MigrationCapability] {
        switch self {
        case .postcopyRAM, .xPostcopyRAM: [.xPostcopyRAM, .postcopyRAM]
        default: [self]
        }
    }
}

/// A parameter's value as QMP gives it.
public enum MigrationParameterValue: Equatable, Sendable {
    case integer(Int64)
    case boolean(Bool)
    case string(String)
}

/// Migration parameters: the 2015 reference's, later QEMUs' names for the same things
/// (`cpu-throttle-*`), `max-bandwidth`, `downtime-limit`, `xbzrle-cache-size`,
/// `max-cpu-throttle`, `multifd-compression` (which picks the `compress` capability's method
/// in tern), and tern's `x-checksum`.
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
    public var maxCPUThrottle: Int64 = 99
    /// The `compress` capability's method: `none` means QEMU 2015's zlib.
    public var compressionMethod: CompressionMethod = .none
    /// Whether stream records carry a CRC32C.
    public var checksums = true
    /// tern's `x-postcopy-after-passes`: with postcopy on, switch to it by itself after this
    /// many pre-copy passes that did not converge (0: only on `migrate-start-postcopy`).
    public var postcopyAfterPasses: Int64 = 0
    /// QEMU 3.0's `max-postcopy-bandwidth`: bytes per second for the background pages after the
    /// switchover (page requests are never held back); 0, the default, means unlimited.
    public var maxPostcopyBandwidth: UInt64 = 0
    /// tern's SLO (docs/qmp.md): `x-slo-downtime`, the stop the switchover may take, in ms (it
    /// replaces `downtime-limit` when set), and `x-slo-total-time`, the budget for the whole
    /// migration, in ms; either one turns on forecast-driven escalation. 0: not set.
    public var sloDowntime: UInt64 = 0
    public var sloTotalTime: UInt64 = 0
    /// QEMU 4.0's `multifd-channels`: the connections RAM pages take with the `multifd`
    /// capability; both sides must set the same number. QEMU's default, 2.
    public var multifdChannels: Int64 = 2
    /// QEMU 2.7's `tls-creds`: the id of a `tls-creds-x509` object; every connection of a
    /// migration (main, return path, multifd) then runs over TLS. Empty: plaintext.
    public var tlsCreds = ""
    /// QEMU 2.7's `tls-hostname`: the name the destination's certificate must carry (default:
    /// the host in a tcp: URI).
    public var tlsHostname = ""
    /// QEMU 4.0's `tls-authz`: the id of an `authz-simple` object naming the one source
    /// identity a destination accepts.
    public var tlsAuthz = ""

    public init() {}

    /// The largest downtime limit accepted, in milliseconds (2000 seconds, as later QEMUs).
    public static let maximumDowntimeLimit: UInt64 = 2_000_000

    /// Names in the order `query-migrate-parameters` lists them (`xbzrle-cache-size` is the
    /// controller's, since its checks need the guest's RAM size).
    public static let names = ["compress-level", "compress-threads", "decompress-threads", "x-cpu-throttle-initial",
                               "x-cpu-throttle-increment", "cpu-throttle-initial", "cpu-throttle-increment",
                               "max-cpu-throttle", "max-bandwidth", "downtime-limit", "xbzrle-cache-size",
                               "multifd-compression", "x-checksum", "x-postcopy-after-passes", "max-postcopy-bandwidth",
                               "x-slo-downtime", "x-slo-total-time", "multifd-channels",
                               "tls-creds", "tls-hostname", "tls-authz"]

    /// The kind of value each parameter takes.
    public enum Kind: Sendable { case integer, boolean, string }
    public static func kind(of name: String) -> Kind {
        switch name {
        case "multifd-compression", "tls-creds", "tls-hostname", "tls-authz": .string
        case "x-checksum": .boolean
        default: .integer
        }
    }

    /// Checks a parameter against the reference's range, with its error text. `max-bandwidth`,
    /// `downtime-limit` and the later names are later QEMUs' parameters; their texts follow
    /// that style.
    public static func validate(_ name: String, _ value: MigrationParameterValue) -> String? {
        func range(_ allowed: ClosedRange<Int64>, _ text: String) -> String? {
            guard case let .integer(number) = value else { return "Invalid parameter type for '\(name)', expected: integer" }
            return allowed.contains(number) ? nil : text
        }
        switch name {
        case "compress-level":
            return range(0...9, "Parameter 'compress_level' expects is invalid, it should be in the range of 0 to 9")
        case "compress-threads":
            return range(1...255, "Parameter 'compress_threads' expects is invalid, it should be in the range of 1 to 255")
        case "decompress-threads":
            return range(1...255, "Parameter 'decompress_threads' expects is invalid, it should be in the range of 1 to 255")
        case "x-cpu-throttle-initial":
            return range(1...99, "Parameter 'x_cpu_throttle_initial' expects an integer in the range of 1 to 99")
        case "x-cpu-throttle-increment":
            return range(1...99, "Parameter 'x_cpu_throttle_increment' expects an integer in the range of 1 to 99")
        case "cpu-throttle-initial":
            return range(1...99, "Parameter 'cpu_throttle_initial' expects an integer in the range of 1 to 99")
        case "cpu-throttle-increment":
            return range(1...99, "Parameter 'cpu_throttle_increment' expects an integer in the range of 1 to 99")
        case "max-cpu-throttle":
            return range(1...99, "Parameter 'max_cpu_throttle' expects an integer in the range of 1 to 99")
        case "max-bandwidth":
            return range(0...Int64.max, "Parameter 'max_bandwidth' expects an integer in the range of 0 to \(Int64.max) bytes/second")
        case "downtime-limit":
            return range(0...Int64(maximumDowntimeLimit),
                         "Parameter 'downtime_limit' expects an integer in the range of 0 to \(maximumDowntimeLimit) milliseconds")
        case "xbzrle-cache-size":
            return range(Int64.min...Int64.max, "")
        case "multifd-compression":
            guard case let .string(text) = value else { return "Invalid parameter type for 'multifd-compression', expected: string" }
            return CompressionMethod(rawValue: text) == nil ? "Parameter 'multifd-compression' does not accept value '\(text)'" : nil
        case "x-checksum":
            guard case .boolean = value else { return "Invalid parameter type for 'x-checksum', expected: boolean" }
            return nil
        case "max-postcopy-bandwidth":
            return range(0...Int64.max, "Parameter 'max_postcopy_bandwidth' expects an integer in the range of 0 to \(Int64.max) bytes/second")
        case "x-slo-downtime":
            return range(0...Int64(maximumDowntimeLimit),
                         "Parameter 'x-slo-downtime' expects an integer in the range of 0 to \(maximumDowntimeLimit) milliseconds")
        case "x-slo-total-time":
            return range(0...86_400_000, "Parameter 'x-slo-total-time' expects an integer in the range of 0 to 86400000 milliseconds")
        case "x-postcopy-after-passes":
            return range(0...1000, "Parameter 'x-postcopy-after-passes' expects an integer in the range of 0 to 1000")
        case "multifd-channels":
            return range(1...255, "Parameter 'multifd-channels' expects is invalid, it should be in the range of 1 to 255")
        case "tls-creds", "tls-hostname", "tls-authz":
            guard case .string = value else { return "Invalid parameter type for '\(name)', expected: string" }
            return nil
        default:
            return "Parameter '\(name)' is unexpected"
        }
    }

    public func value(of name: String) -> MigrationParameterValue {
        switch name {
        case "compress-level": .integer(compressLevel)
        case "compress-threads": .integer(compressThreads)
        case "decompress-threads": .integer(decompressThreads)
        case "x-cpu-throttle-initial", "cpu-throttle-initial": .integer(cpuThrottleInitial)
        case "x-cpu-throttle-increment", "cpu-throttle-increment": .integer(cpuThrottleIncrement)
        case "max-cpu-throttle": .integer(maxCPUThrottle)
        case "max-bandwidth": .integer(Int64(clamping: maxBandwidth))
        case "downtime-limit": .integer(Int64(clamping: downtimeLimit))
        case "multifd-compression": .string(compressionMethod.rawValue)
        case "x-checksum": .boolean(checksums)
        case "x-postcopy-after-passes": .integer(postcopyAfterPasses)
        case "max-postcopy-bandwidth": .integer(Int64(clamping: maxPostcopyBandwidth))
        case "x-slo-downtime": .integer(Int64(clamping: sloDowntime))
        case "x-slo-total-time": .integer(Int64(clamping: sloTotalTime))
        case "multifd-channels": .integer(multifdChannels)
        case "tls-creds": .string(tlsCreds)
        case "tls-hostname": .string(tlsHostname)
        case "tls-authz": .string(tlsAuthz)
        default: .integer(0)
        }
    }

    public mutating func set(_ name: String, _ value: MigrationParameterValue) {
        switch (name, value) {
        case let ("compress-level", .integer(v)): compressLevel = v
        case let ("compress-threads", .integer(v)): compressThreads = v
        case let ("decompress-threads", .integer(v)): decompressThreads = v
        case let ("x-cpu-throttle-initial", .integer(v)), let ("cpu-throttle-initial", .integer(v)): cpuThrottleInitial = v
        case let ("x-cpu-throttle-increment", .integer(v)), let ("cpu-throttle-increment", .integer(v)): cpuThrottleIncrement = v
        case let ("max-cpu-throttle", .integer(v)): maxCPUThrottle = v
        case let ("max-bandwidth", .integer(v)): maxBandwidth = UInt64(v)
        case let ("downtime-limit", .integer(v)): downtimeLimit = UInt64(v)
        case let ("multifd-compression", .string(v)): compressionMethod = CompressionMethod(rawValue: v) ?? .none
        case let ("x-checksum", .boolean(v)): checksums = v
        case let ("x-postcopy-after-passes", .integer(v)): postcopyAfterPasses = v
        case let ("multifd-channels", .integer(v)): multifdChannels = v
        case let ("max-postcopy-bandwidth", .integer(v)): maxPostcopyBandwidth = UInt64(v)
        case let ("x-slo-downtime", .integer(v)): sloDowntime = UInt64(v)
        case let ("x-slo-total-time", .integer(v)): sloTotalTime = UInt64(v)
        case let ("tls-creds", .string(v)): tlsCreds = v
        case let ("tls-hostname", .string(v)): tlsHostname = v
        case let ("tls-authz", .string(v)): tlsAuthz = v
        default: break
        }
    }
}

/// Everything an outgoing migration uses, fixed when `migrate` starts it.
struct MigrationPlan {
    var capabilities: [String]
    var checksums: Bool
    var xbzrleCacheSize: UInt64?
    var compression: (method: CompressionMethod, level: Int, threads: Int)?
    var autoConverge: AutoConverge.Settings?
    /// Postcopy may be started (the capability is on).
    var postcopy: Bool
    var postcopyAfterPasses: Int
    /// With the `multifd` capability: where the channels connect and how many.
    var multifd: (uri: MigrationURI, channels: Int)?
    /// With `tls-creds`: the TLS every connection (main, multifd, a postcopy resume) uses.
    var tls: TLSClientSettings?
    /// `migrate`'s blk/inc: how the disks travel (nothing when the machine has none).
    var blockMode: BlockMigrationMode = .shared
    var zeroBlocks: Bool

    init(capabilities: [MigrationCapability: Bool], parameters: MigrationParameters, xbzrleCacheSize: UInt64) {
        self.capabilities = MigrationCapability.allCases.filter { capabilities[$0] == true }.map(\.rawValue)
        checksums = parameters.checksums
        postcopy = capabilities[.postcopyRAM] == true
        zeroBlocks = capabilities[.zeroBlocks] == true
        postcopyAfterPasses = Int(parameters.postcopyAfterPasses)
        self.xbzrleCacheSize = capabilities[.xbzrle] == true ? xbzrleCacheSize : nil
        if capabilities[.compress] == true {
            compression = (parameters.compressionMethod == .zstd ? .zstd : .zlib, Int(parameters.compressLevel),
                           Int(parameters.compressThreads))
        }
        if capabilities[.autoConverge] == true {
            autoConverge = AutoConverge.Settings(initial: Int(parameters.cpuThrottleInitial),
                                                 increment: Int(parameters.cpuThrottleIncrement),
                                                 maximum: Int(parameters.maxCPUThrottle))
        }
    }

    func ramSettings(_ controller: MigrationController) -> RAMEncodingSettings {
        RAMEncodingSettings(xbzrleCacheSize: xbzrleCacheSize, compression: compression,
                            cacheSizeNow: { [controller] in controller.xbzrleCacheSize })
    }
}
