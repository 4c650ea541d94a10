import Machine
import Testing
@testable import Migration

@Suite("Migration engine pieces")
struct MigrationUnitTests {
    @Test("the status set is QEMU's 2015 one; a new case must be added here on purpose")
    func statusTripwire() {
        #expect(MigrationStatus.allCases.map(\.rawValue) == [
            "none", "setup", "cancelling", "cancelled", "active", "postcopy-active", "postcopy-paused", "postcopy-recover", "completed", "failed",
        ])
    }

    @Test("legal transitions: the normal path, cancel and failure; nothing skips setup")
    func transitions() {
        let legal: [(MigrationStatus, MigrationStatus)] = [
            (.none, .setup), (.setup, .active), (.active, .completed), (.active, .cancelling),
            (.cancelling, .cancelled), (.setup, .failed), (.active, .failed), (.completed, .setup),
            (.failed, .setup), (.cancelled, .setup),
        ]
        for (from, to) in legal { #expect(from.canMove(to: to), "\(from) -> \(to) should be legal") }
        let illegal: [(MigrationStatus, MigrationStatus)] = [
            (.none, .active), (.none, .completed), (.completed, .active), (.cancelled, .active),
            (.failed, .completed), (.active, .setup), (.cancelling, .active), (.none, .none),
        ]
        for (from, to) in illegal { #expect(!from.canMove(to: to), "\(from) -> \(to) should be refused") }
    }

    @Test("parameters: the reference's defaults, ranges and texts")
    func parameters() {
        let defaults = MigrationParameters()
        #expect(defaults.maxBandwidth == 32 << 20)
        #expect(defaults.downtimeLimit == 300)
        #expect(MigrationParameters.names.filter { $0 != "xbzrle-cache-size" }.map { defaults.value(of: $0) } == [
            .integer(1), .integer(8), .integer(2), .integer(20), .integer(10), .integer(20), .integer(10), .integer(99),
            .integer(32 << 20), .integer(300), .string("none"), .boolean(true), .integer(0), .integer(0), .integer(0), .integer(0),
            .integer(2), .string(""), .string(""), .string(""),
        ])
        #expect(MigrationParameters.validate("tls-creds", .integer(1)) == "Invalid parameter type for 'tls-creds', expected: string")
        #expect(MigrationParameters.validate("multifd-channels", .integer(256))
                == "Parameter 'multifd-channels' expects is invalid, it should be in the range of 1 to 255")
        var channels = MigrationParameters()
        channels.set("multifd-channels", .integer(4))
        #expect(channels.multifdChannels == 4 && channels.value(of: "multifd-channels") == .integer(4))
        #expect(MigrationParameters.validate("max-cpu-throttle", .integer(0))
                == "Parameter 'max_cpu_throttle' expects an integer in the range of 1 to 99")
        #expect(MigrationParameters.validate("multifd-compression", .string("lz4"))
                == "Parameter 'multifd-compression' does not accept value 'lz4'")
        #expect(MigrationParameters.validate("multifd-compression", .string("zstd")) == nil)
        #expect(MigrationParameters.validate("compress-level", .integer(10))
                == "Parameter 'compress_level' expects is invalid, it should be in the range of 0 to 9")
        #expect(MigrationParameters.validate("compress-threads", .integer(0))
                == "Parameter 'compress_threads' expects is invalid, it should be in the range of 1 to 255")
        #expect(MigrationParameters.validate("decompress-threads", .integer(256))
                == "Parameter 'decompress_threads' expects is invalid, it should be in the range of 1 to 255")
        #expect(MigrationParameters.validate("x-cpu-throttle-initial", .integer(100))
                == "Parameter 'x_cpu_throttle_initial' expects an integer in the range of 1 to 99")
        #expect(MigrationParameters.validate("x-cpu-throttle-increment", .integer(0))
                == "Parameter 'x_cpu_throttle_increment' expects an integer in the range of 1 to 99")
        for name in MigrationParameters.names { #expect(MigrationParameters.validate(name, defaults.value(of: name)) == nil) }
        var aliased = MigrationParameters()
        aliased.set("cpu-throttle-initial", .integer(35))
        #expect(aliased.value(of: "x-cpu-throttle-initial") == .integer(35))
    }

    @Test("URIs: the four transports, and QEMU's text for anything else")
    func uris() throws {
        #expect(try MigrationURI(parsing: "tcp:127.0.0.1:4444") == .tcp(host: "127.0.0.1", port: "4444"))
        #expect(try MigrationURI(parsing: "tcp:[::1]:4444") == .tcp(host: "::1", port: "4444"))
        #expect(try MigrationURI(parsing: "unix:/tmp/m.sock") == .unix(path: "/tmp/m.sock"))
        #expect(try MigrationURI(parsing: "exec:cat > /tmp/x") == .exec(command: "cat > /tmp/x"))
        #expect(try MigrationURI(parsing: "fd:mig") == .descriptor(name: "mig"))
        #expect {
            try MigrationURI(parsing: "rdma:host:1")
        } throws: { error in
            (error as? MigrationStreamError)?.message == "unknown migration protocol: rdma:host:1"
        }
    }

    @Test("rate limiting: a tenth of the bandwidth per 100 ms window; 0 means unlimited")
    func rateLimiter() {
        var limiter = RateLimiter(bandwidth: 32 << 20, now: 1000, position: 0)
        #expect(limiter.limitPerWindow == (32 << 20) / 10)
        #expect(!limiter.isExhausted(position: (32 << 20) / 10))
        #expect(limiter.isExhausted(position: (32 << 20) / 10 + 1))
        #expect(limiter.closeWindowIfElapsed(now: 1050, position: 100) == nil)
        let window = limiter.closeWindowIfElapsed(now: 1100, position: 5_000_000)
        #expect(window?.bytes == 5_000_000 && window?.milliseconds == 100)
        #expect(!limiter.isExhausted(position: 5_000_000))
        #expect(RateLimiter.limit(for: 9) == 0)
        #expect(!RateLimiter(bandwidth: 0, now: 0, position: 0).isExhausted(position: .max))
    }

    @Test("dirty bitmaps: runs, counts and the all-set first pass")
    func dirtyBitmap() {
        var bitmap = DirtyBitmap(pageCount: 200)
        for page in [3, 4, 5, 64, 130, 199] { bitmap.set(page) }
        #expect(bitmap.count == 6)
        #expect(bitmap.nextSet(from: 0) == 3)
        #expect(bitmap.nextClear(from: 3) == 6)
        #expect(bitmap.nextSet(from: 6) == 64)
        #expect(bitmap.nextSet(from: 131) == 199)
        #expect(bitmap.nextSet(from: 200) == nil)
        bitmap.clear(199)
        #expect(bitmap.nextSet(from: 131) == nil)
        let full = DirtyBitmap(pageCount: 130, allSet: true)
        #expect(full.count == 130)
        #expect(full.nextClear(from: 0) == 130)
    }

    @Test("another pass is worth it only while passes halve a dirty set above 256 KiB")
    func convergence() {
        #expect(ConvergencePolicy.anotherPassPays(pending: 50 << 20, previous: 512 << 20, passes: 1))
        #expect(!ConvergencePolicy.anotherPassPays(pending: 300 << 20, previous: 400 << 20, passes: 2))
        #expect(!ConvergencePolicy.anotherPassPays(pending: 100 << 10, previous: 10 << 20, passes: 3))
        #expect(!ConvergencePolicy.anotherPassPays(pending: 1 << 20, previous: 100 << 20, passes: 30))
    }

    @Test("the downtime test: switch over only when what is left fits bandwidth × limit")
    func downtimeTest() {
        var policy = ConvergencePolicy()
        policy.bandwidthMeasured(bytesPerMillisecond: 100_000, downtimeLimitNanoseconds: 300_000_000) // 30 MB fits
        let decisions = [(40_000_000, 1), (10_000_000, 2), (9_000_000, 3), (0, 4)].map { policy.shouldSwitchOver(pending: $0.0, passes: $0.1) }
        // Too much left; then still halving (one more pass pays); then converged; nothing left.
        #expect(decisions == [false, false, true, true])
    }

    @Test("auto-converge: two fast periods throttle straight to what the rates need; it ends with the migration")
    func autoConverge() {
        var applied: [Int] = []
        let converge = AutoConverge(settings: .init(initial: 20, increment: 10, maximum: 99)) { applied.append($0) }
        let page = MigrationStreamFormat.pageSize
        // The guest dirties 4x what the link carries, full pages.
        func report(_ second: UInt64) -> PassReport {
            PassReport(now: second * 1000, dirtiedBytes: 4 * 25_000 * page, transferredBytes: second * 25_000 * page,
                       pagesSent: second * 25_000, passes: Int(second))
        }
        converge.passEnded(report(0))
        converge.passEnded(report(1))
        #expect(applied.isEmpty, "one fast period is not enough")
        converge.passEnded(report(2))
        #expect(applied.count == 1 && applied[0] >= 80, "wanted about 1 - 1/12 of the guest's time: \(applied)")
        converge.passEnded(report(3))
        converge.passEnded(report(4))
        #expect(applied.count == 2 && applied[1] == min(applied[0] + 10, 99))
        converge.migrationEnded()
        #expect(applied.last == 0 && converge.throttle == 0)
        // Cheap pages (XBZRLE deltas of 200 bytes) are not "too fast" at the same page rate.
        let verdict = AutoConverge.assess(pagesDirtied: 100_000, sent: 25_000 * 200, pagesSent: 25_000, currentThrottle: 0)
        #expect(verdict.tooFast)
        let cheap = AutoConverge.assess(pagesDirtied: 10_000, sent: 25_000 * 200, pagesSent: 25_000, currentThrottle: 0)
        #expect(!cheap.tooFast)
    }

    @Test("capability rules: postcopy with compression is turned off with the reference's text")
    func capabilityRules() {
        var capabilities: [MigrationCapability: Bool] = [.postcopyRAM: true, .compress: true]
        #expect(MigrationCapability.applyRules(&capabilities) == ["Postcopy is not currently compatible with compression"])
        #expect(capabilities[.postcopyRAM] == false && capabilities[.compress] == true)
        var fine: [MigrationCapability: Bool] = [.xbzrle: true, .compress: true, .autoConverge: true]
        #expect(MigrationCapability.applyRules(&fine).isEmpty)
    }

    @Test("the XBZRLE cache size is rounded down to a power of two")
    func cacheRounding() {
        #expect(XBZRLECache.roundedSize(64 << 20) == 64 << 20)
        #expect(XBZRLECache.roundedSize((64 << 20) + 1) == 64 << 20)
        #expect(XBZRLECache.roundedSize(5000) == 4096)
    }
}
