import Machine
import Testing
@testable import Migration

@Suite("Migration engine pieces")
struct MigrationUnitTests {
    @Test("the status set is QEMU's 2015 one; a new case must be added here on purpose")
    func statusTripwire() {
        #expect(MigrationStatus.allCases.map(\.rawValue) == [
            "none", "setup", "cancelling", "cancelled", "active", "postcopy-active", "completed", "failed",
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
        #expect(MigrationParameters.names.map { defaults.value(of: $0) } == [1, 8, 2, 20, 10, 32 << 20, 300])
        #expect(MigrationParameters.validate("compress-level", 10)
                == "Parameter 'compress_level' expects is invalid, it should be in the range of 0 to 9")
        #expect(MigrationParameters.validate("compress-threads", 0)
                == "Parameter 'compress_threads' expects is invalid, it should be in the range of 1 to 255")
        #expect(MigrationParameters.validate("decompress-threads", 256)
                == "Parameter 'decompress_threads' expects is invalid, it should be in the range of 1 to 255")
        #expect(MigrationParameters.validate("x-cpu-throttle-initial", 100)
                == "Parameter 'x_cpu_throttle_initial' expects an integer in the range of 1 to 99")
        #expect(MigrationParameters.validate("x-cpu-throttle-increment", 0)
                == "Parameter 'x_cpu_throttle_increment' expects an integer in the range of 1 to 99")
        for name in MigrationParameters.names { #expect(MigrationParameters.validate(name, defaults.value(of: name)) == nil) }
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
        #expect(OutgoingMigration.anotherPassPays(pending: 50 << 20, previous: 512 << 20, passes: 1))
        #expect(!OutgoingMigration.anotherPassPays(pending: 300 << 20, previous: 400 << 20, passes: 2))
        #expect(!OutgoingMigration.anotherPassPays(pending: 100 << 10, previous: 10 << 20, passes: 3))
        #expect(!OutgoingMigration.anotherPassPays(pending: 1 << 20, previous: 100 << 20, passes: 30))
    }
}
