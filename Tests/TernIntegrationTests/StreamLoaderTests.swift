import Foundation
import Machine
import Testing
@testable import Migration

/// Hostile and broken version 1 streams against the real loader and a real machine: each must
/// fail with a reason and leave guest memory untouched. (Version 2 has its own suite in the
/// unit tests, which need no KVM.)
@Suite("Migration stream loader, version 1", .serialized, .enabled(if: kvmAvailable, kvmMissingReason), .timeLimit(.minutes(1)))
struct StreamLoaderTests {
    static let ram: UInt64 = 64 << 20

    func header() -> [UInt8] {
        var bytes = MigrationStreamFormat.magic
        bytes += le(UInt32(1)) // these are version 1 streams: an older tern's saved VMs must stay loadable
        return bytes
    }

    func le<T: FixedWidthInteger>(_ value: T) -> [UInt8] { withUnsafeBytes(of: value.littleEndian) { Array($0) } }

    func layout(_ size: UInt64 = ram) -> [UInt8] { [0x01] + le(size) + le(UInt32(4096)) }

    /// Loads `stream` into a fresh paused machine; returns the error text, or nil on success.
    func load(_ stream: [UInt8]) throws -> (error: String?, memoryUntouched: Bool) {
        var configuration = MachineConfiguration()
        configuration.memorySize = Self.ram
        configuration.serial = .none
        configuration.waitsForIncomingMigration = true
        let machine = try Machine(configuration: configuration)
        machine.start()
        defer { machine.end(.hostQuit(cause: .signal, reason: "test over")); _ = machine.waitUntilEnded() }
        signal(SIGPIPE, SIG_IGN) // the loader may stop reading before the writer is done
        let before = Array(UnsafeRawBufferPointer(start: machine.memory.hostBase, count: Int(Self.ram)))
        var pipe: [Int32] = [0, 0]
        #expect(Foundation.pipe(&pipe) == 0)
        let writeEnd = pipe[1]
        let writer = Thread {
            var offset = 0
            while offset < stream.count {
                let n = stream.withUnsafeBytes { write(writeEnd, $0.baseAddress! + offset, $0.count - offset) }
                if n <= 0 { break }
                offset += n
            }
            close(writeEnd)
        }
        writer.start()
        let incoming = IncomingMigration(machine: machine, descriptor: pipe[0])
        var message: String?
        do {
            _ = try incoming.load { _ in }
        } catch {
            message = error.message
        }
        close(pipe[0])
        let after = Array(UnsafeRawBufferPointer(start: machine.memory.hostBase, count: Int(Self.ram)))
        return (message, before == after)
    }

    @Test("bad magic, bad version, empty stream")
    func headers() throws {
        #expect(try load(Array("NOTTERN!".utf8) + le(UInt32(1))).error?.contains("bad magic") == true)
        #expect(try load(MigrationStreamFormat.magic + le(UInt32(99))).error?.contains("version 99") == true)
        #expect(try load([]).error?.contains("ended early") == true)
    }

    @Test("RAM size must match, and the layout must come first")
    func layoutChecks() throws {
        #expect(try load(header() + layout(128 << 20)).error?.contains("same -m") == true)
        #expect(try load(header() + [0x03] + le(UInt64(0)) + le(UInt32(1))).error?.contains("RAM layout") == true)
    }

    @Test("page records outside RAM, misaligned or oversized are refused before any write")
    func pageBounds() throws {
        let cases: [[UInt8]] = [
            [0x02] + le(Self.ram) + le(UInt32(1)) + [UInt8](repeating: 0xAA, count: 4096), // just past the end
            [0x02] + le(Self.ram - 4096) + le(UInt32(2)) + [UInt8](repeating: 0xAA, count: 8192), // straddles the end
            [0x02] + le(UInt64.max - 4095) + le(UInt32(2)), // offset + length overflows
            [0x02] + le(UInt64(4097)) + le(UInt32(1)), // misaligned
            [0x02] + le(UInt64(0)) + le(UInt32(0)), // empty
            [0x02] + le(UInt64(0)) + le(UInt32.max), // absurd count
            [0x03] + le(Self.ram) + le(UInt32(1)), // zero run past the end
        ]
        for record in cases {
            let result = try load(header() + layout() + record)
            #expect(result.error != nil)
            #expect(result.memoryUntouched, "a refused record wrote guest memory: \(result.error ?? "")")
        }
    }

    @Test("unknown records, oversized device sections, truncation and a wrong page count fail with a reason")
    func malformedRecords() throws {
        #expect(try load(header() + layout() + [0x55]).error?.contains("unknown record type 0x55") == true)
        #expect(try load(header() + layout() + [0x05] + le(UInt16(200))).error?.contains("name of 200 bytes") == true)
        let bigDevice: [UInt8] = [0x05] + le(UInt16(3)) + Array("cpu".utf8) + le(UInt32(1)) + le(UInt32(1 << 30))
        #expect(try load(header() + layout() + bigDevice).error?.contains("claims") == true)
        let truncated = header() + layout() + [0x02] + le(UInt64(0)) + le(UInt32(4)) + [UInt8](repeating: 1, count: 5000)
        #expect(try load(truncated).error?.contains("ended early") == true)
        #expect(try load(header() + layout() + [0x7e] + le(UInt64(5))).error?.contains("5 pages") == true)
        #expect(try load(header() + layout() + [0x7e] + le(UInt64(0))).error?.contains("no device state") == true)
    }

    @Test("a device state with a wrong or missing section is refused by name")
    func deviceSections() throws {
        let bogus: [UInt8] = [0x05] + le(UInt16(5)) + Array("bogus".utf8) + le(UInt32(1)) + le(UInt32(0))
        #expect(try load(header() + layout() + bogus + [0x7e] + le(UInt64(0))).error?.contains("unknown section 'bogus'") == true)
        let runstate: [UInt8] = [0x05] + le(UInt16(8)) + Array("runstate".utf8) + le(UInt32(1)) + le(UInt32(1)) + [1]
        #expect(try load(header() + layout() + runstate + [0x7e] + le(UInt64(0))).error?.contains("is missing") == true)
    }
}
