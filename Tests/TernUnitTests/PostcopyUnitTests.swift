import Foundation
import Machine
import Synchronization
import Testing
@testable import Migration

@Suite("Postcopy pieces")
struct PostcopyUnitTests {
    @Test("postcopy's transitions: switch, pause, recover, resume; no cancel once the guest has moved")
    func transitions() {
        let legal: [(MigrationStatus, MigrationStatus)] = [
            (.active, .postcopyActive), (.postcopyActive, .completed), (.postcopyActive, .postcopyPaused),
            (.postcopyPaused, .postcopyRecover), (.postcopyRecover, .postcopyActive), (.postcopyRecover, .postcopyPaused),
        ]
        for (from, to) in legal { #expect(from.canMove(to: to), "\(from) -> \(to) should be legal") }
        let illegal: [(MigrationStatus, MigrationStatus)] = [
            (.postcopyActive, .cancelling), (.postcopyActive, .active), (.postcopyPaused, .postcopyActive),
            (.setup, .postcopyActive), (.postcopyPaused, .completed),
        ]
        for (from, to) in illegal { #expect(!from.canMove(to: to), "\(from) -> \(to) should be refused") }
        #expect(MigrationStatus.postcopyPaused.isInProgress && MigrationStatus.postcopyRecover.isPostcopy)
    }

    @Test("return-path messages round-trip through their framing")
    func roundTrip() throws {
        let messages: [ReturnPathMessage] = [
            .requestPages(offset: 0x12_3000, length: 4096),
            .lacking([.init(offset: 0, pages: 3), .init(offset: 1 << 30, pages: 1)]),
            .lacking([]),
            .resumeReady(4),
        ]
        for message in messages {
            let bytes = message.encoded()
            let type = UInt16(bytes[0]) | UInt16(bytes[1]) << 8
            let length = Int(UInt16(bytes[2]) | UInt16(bytes[3]) << 8)
            let body = Array(bytes[4..<4 + length])
            let crc = bytes[(4 + length)...].enumerated().reduce(UInt32(0)) { $0 | UInt32($1.element) << (8 * $1.offset) }
            #expect(try ReturnPathMessage.decode(type: type, body: body, checksum: crc) == message)
        }
    }

    @Test("return-path messages with a wrong length or type are refused by name")
    func refusals() {
        func refusal(_ type: UInt16, _ body: [UInt8]) -> String {
            var framed: [UInt8] = [UInt8(type & 0xff), UInt8(type >> 8), UInt8(body.count & 0xff), UInt8(body.count >> 8)] + body
            let crc = framed.withUnsafeBytes { cpageCRC($0) }
            framed.removeAll()
            do {
                _ = try ReturnPathMessage.decode(type: type, body: body, checksum: crc)
                return "accepted"
            } catch {
                return error.message
            }
        }
        #expect(refusal(4, [UInt8](repeating: 0, count: 11)).contains("incorrect length 11"))
        #expect(refusal(5, [2, 0, 0, 0] + [UInt8](repeating: 0, count: 12)).contains("LACKING"))
        #expect(refusal(6, [1, 2, 3]).contains("RESUME_READY"))
        #expect(refusal(99, []).contains("unknown return-path message type 99"))
        #expect(throws: MigrationStreamError.self) {
            try ReturnPathMessage.decode(type: 4, body: [UInt8](repeating: 0, count: 12), checksum: 0)
        }
    }

    @Test("DISCARD bodies: runs decoded, misaligned or truncated ones refused")
    func discard() throws {
        func body(_ runs: [(UInt64, UInt64)], count: UInt32? = nil) -> [UInt8] {
            var bytes: [UInt8] = []
            withUnsafeBytes(of: (count ?? UInt32(runs.count)).littleEndian) { bytes += $0 }
            for (offset, length) in runs {
                withUnsafeBytes(of: offset.littleEndian) { bytes += $0 }
                withUnsafeBytes(of: length.littleEndian) { bytes += $0 }
            }
            return bytes
        }
        func decode(_ bytes: [UInt8]) throws -> [ReturnPathMessage.PageRun] {
            try bytes.withUnsafeBytes { try IncomingMigration.decodeDiscard(ByteCursor($0)) }
        }
        let runs = try decode(body([(0, 8192), (1 << 20, 4096)]))
        #expect(runs == [.init(offset: 0, pages: 2), .init(offset: 1 << 20, pages: 1)])
        #expect(throws: MigrationStreamError.self) { try decode(body([(100, 4096)])) }
        #expect(throws: MigrationStreamError.self) { try decode(body([(0, 0)])) }
        #expect(throws: MigrationStreamError.self) { try decode(body([(0, 4096)], count: 1000)) }
    }

    @Test("userfaultfd on the memfd: a thread touching a dropped page waits until it is installed")
    func userfault() throws {
        let memory = try GuestMemory(layout: GuestMemoryLayout(ramSize: 16 << 20))
        memory.hostBase.storeBytes(of: UInt64(7), as: UInt64.self)
        let region: UserfaultRegion
        do {
            region = try UserfaultRegion(memory: memory)
        } catch {
            print("SKIPPED: userfaultfd is not available here: \(error)")
            return
        }
        #expect(memory.discard(offset: 0, length: 4096))
        let seen = Mutex<UInt64?>(nil)
        let toucher = Thread { [memory] in
            let value = memory.hostBase.load(as: UInt64.self) // faults, waits for the install
            seen.withLock { $0 = value }
        }
        toucher.start()
        var faults: [UInt64] = []
        let deadline = Date().addingTimeInterval(5)
        while faults.isEmpty && Date() < deadline {
            if try region.wait(wakeDescriptor: -1, timeoutMilliseconds: 100) == .faults { faults = try region.pendingFaults() }
        }
        #expect(faults == [0])
        #expect(seen.withLock { $0 } == nil, "the toucher must wait for the page")
        var page = [UInt8](repeating: 0, count: 4096)
        page[0] = 42
        #expect(try page.withUnsafeBytes { try region.copy(offset: 0, from: $0.baseAddress!, length: 4096) } == .installed)
        #expect(try page.withUnsafeBytes { try region.copy(offset: 0, from: $0.baseAddress!, length: 4096) } == .alreadyPresent)
        while seen.withLock({ $0 }) == nil && Date() < deadline { usleep(1000) }
        #expect(seen.withLock { $0 } == 42)
        #expect(throws: GuestMemoryError.self) { try region.zero(offset: 16 << 20, length: 4096) }
        #expect(throws: GuestMemoryError.self) { try region.zero(offset: 100, length: 4096) }
        region.unregister()
    }
}

private func cpageCRC(_ bytes: UnsafeRawBufferPointer) -> UInt32 {
    var crc: UInt32 = 0xffff_ffff
    for byte in bytes {
        crc ^= UInt32(byte)
        for _ in 0..<8 { crc = crc & 1 != 0 ? (crc >> 1) ^ 0x82F6_3B78 : crc >> 1 }
    }
    return ~crc
}
