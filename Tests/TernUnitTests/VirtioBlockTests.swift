import Foundation
import Synchronization
import Testing
@testable import Machine

/// A driver's view of tern's virtio-blk device, without KVM: the transport's registers are
/// written as a guest writes them, the rings live in real guest memory and the image is a real
/// file. Each test fails if the device stops checking what it is given.
@Suite("virtio-blk over virtio-mmio")
struct VirtioBlockTests {
    static let descriptors: UInt64 = 0x10000
    static let available: UInt64 = 0x11000
    static let used: UInt64 = 0x12000
    static let header: UInt64 = 0x13000
    static let data: UInt64 = 0x14000
    static let status: UInt64 = 0x20000

    final class Fixture {
        let memory: GuestMemory
        let image: DiskImage
        let device: VirtioMMIODevice
        final class Events: Sendable {
            let interrupts = Mutex(0)
            let broken = Mutex<[String]>([])
        }
        let events = Events()
        let path: String
        var nextAvailable: UInt16 = 0

        init(imageSize: Int = 1 << 20, readOnly: Bool = false) throws {
            memory = try GuestMemory(layout: GuestMemoryLayout(ramSize: 4 << 20))
            path = FileManager.default.temporaryDirectory.appendingPathComponent("tern-vblk-\(UUID().uuidString)").path
            FileManager.default.createFile(atPath: path, contents: Data((0..<imageSize).map { UInt8(truncatingIfNeeded: $0 / 512) }))
            image = try DiskImage(DriveConfiguration(path: path, readOnly: readOnly, id: "disk0"), active: true)
            let events = self.events
            device = VirtioMMIODevice(base: 0xd000_0000, interruptLine: 5, backend: VirtioBlock(image: image) { _ in },
                                      memory: memory, raiseInterrupt: { events.interrupts.withLock { $0 += 1 } },
                                      onBrokenQueue: { message in events.broken.withLock { $0.append(message) } })
        }

        deinit { unlink(path) }

        func reg(_ offset: UInt64, _ value: UInt32) { device.write(offset: offset, size: 4, value: UInt64(value)) }
        func reg(_ offset: UInt64) -> UInt32 { UInt32(device.read(offset: offset, size: 4)) }

        /// The driver's set-up sequence (virtio 1.x 3.1.1) with `features` accepted.
        func initialise(features: UInt64 = VirtioMMIODevice.featureVersion1, queueSize: UInt32 = 8) {
            reg(0x070, 0)
            reg(0x070, 1)
            reg(0x070, 3)
            reg(0x024, 0); reg(0x020, UInt32(features & 0xffff_ffff))
            reg(0x024, 1); reg(0x020, UInt32(features >> 32))
            reg(0x070, 11)
            reg(0x030, 0)
            reg(0x038, queueSize)
            reg(0x080, UInt32(VirtioBlockTests.descriptors)); reg(0x084, 0)
            reg(0x090, UInt32(VirtioBlockTests.available)); reg(0x094, 0)
            reg(0x0a0, UInt32(VirtioBlockTests.used)); reg(0x0a4, 0)
            reg(0x044, 1)
            reg(0x070, 15)
        }

        func descriptor(_ index: UInt64, address: UInt64, length: UInt32, flags: UInt16, next: UInt16) throws {
            let entry = GuestAddress(VirtioBlockTests.descriptors + 16 * index)
            try memory.store(address, at: entry)
            try memory.store(length, at: entry + 8)
            try memory.store(flags, at: entry + 12)
            try memory.store(next, at: entry + 14)
        }

        /// Submits header, data, status as descriptors 0, 1, 2 and notifies. Returns the status.
        func request(type: UInt32, sector: UInt64, length: UInt32, dataFlags: UInt16) throws -> UInt8 {
            try memory.store(type, at: GuestAddress(VirtioBlockTests.header))
            try memory.store(sector, at: GuestAddress(VirtioBlockTests.header + 8))
            try memory.store(UInt8(0xee), at: GuestAddress(VirtioBlockTests.status))
            try descriptor(0, address: VirtioBlockTests.header, length: 16, flags: 1, next: 1)
            try descriptor(1, address: VirtioBlockTests.data, length: length, flags: 1 | dataFlags, next: 2)
            try descriptor(2, address: VirtioBlockTests.status, length: 1, flags: 2, next: 0)
            try publish(head: 0)
            return try memory.load(UInt8.self, at: GuestAddress(VirtioBlockTests.status))
        }

        func publish(head: UInt16) throws {
            try memory.store(head, at: GuestAddress(VirtioBlockTests.available + 4 + 2 * UInt64(nextAvailable % 8)))
            nextAvailable &+= 1
            try memory.store(nextAvailable, at: GuestAddress(VirtioBlockTests.available + 2))
            reg(0x050, 0)
        }

        var usedIndex: UInt16 { (try? memory.load(UInt16.self, at: GuestAddress(VirtioBlockTests.used + 2))) ?? 0 }
    }

    @Test("identity, features and the capacity in configuration space")
    func identity() throws {
        let f = try Fixture(imageSize: 3 << 20)
        #expect(f.reg(0x000) == 0x7472_6976)
        #expect(f.reg(0x004) == 2)
        #expect(f.reg(0x008) == 2)
        f.reg(0x014, 1)
        #expect(f.reg(0x010) & 1 == 1, "VIRTIO_F_VERSION_1 is offered")
        #expect(f.device.read(offset: 0x100, size: 8) == UInt64(3 << 20) / 512)
    }

    @Test("a write then a read go through the image, with interrupts and used lengths")
    func writeAndRead() throws {
        let f = try Fixture()
        f.initialise()
        let payload = (0..<4096).map { UInt8(truncatingIfNeeded: $0 * 7 + 3) }
        try f.memory.write(payload, at: GuestAddress(VirtioBlockTests.data))
        #expect(try f.request(type: 1, sector: 16, length: 4096, dataFlags: 0) == 0)
        #expect(f.usedIndex == 1)
        try f.memory.write([UInt8](repeating: 0, count: 4096), at: GuestAddress(VirtioBlockTests.data))
        #expect(try f.request(type: 0, sector: 16, length: 4096, dataFlags: 2) == 0)
        #expect(try f.memory.read(at: GuestAddress(VirtioBlockTests.data), count: 4096) == payload)
        #expect(try f.memory.load(UInt32.self, at: GuestAddress(VirtioBlockTests.used + 8 + 8)) == 4097, "data plus status")
        #expect(f.events.interrupts.withLock { $0 } == 2)
        #expect(f.reg(0x060) == 1)
        f.reg(0x064, 1)
        #expect(f.reg(0x060) == 0)
        // The write landed in the file at sector 16 and was recorded for block migration.
        let file = try Data(contentsOf: URL(fileURLWithPath: f.path))
        #expect(Array(file[8192..<12288]) == payload)
        f.image.writes.setTracking(true)
        #expect(try f.request(type: 1, sector: 200, length: 512, dataFlags: 0) == 0)
        #expect(f.image.writes.takeDirty() == [1], "sector 200 is in the second 64 KiB chunk")
    }

    @Test("a driver that sets VIRTQ_AVAIL_F_NO_INTERRUPT polls: no interrupt, no status bit")
    func noInterrupt() throws {
        let f = try Fixture()
        f.initialise()
        try f.memory.store(UInt16(1), at: GuestAddress(VirtioBlockTests.available))
        #expect(try f.request(type: 0, sector: 0, length: 512, dataFlags: 2) == 0)
        #expect(f.usedIndex == 1)
        #expect(f.events.interrupts.withLock { $0 } == 0)
        #expect(f.reg(0x060) == 0)
    }

    @Test("requests past the end, of partial sectors, or writes to a read-only disk get IOERR")
    func refusedRequests() throws {
        let f = try Fixture()
        f.initialise()
        #expect(try f.request(type: 0, sector: 2047, length: 1024, dataFlags: 2) == 1, "runs past the 1 MiB disk")
        #expect(try f.request(type: 0, sector: UInt64.max / 256, length: 512, dataFlags: 2) == 1, "sector overflows")
        #expect(try f.request(type: 0, sector: 0, length: 100, dataFlags: 2) == 1, "not whole sectors")
        #expect(try f.request(type: 0, sector: 0, length: 512, dataFlags: 0) == 1, "read into a device-readable buffer")
        #expect(try f.request(type: 99, sector: 0, length: 512, dataFlags: 2) == 2, "unknown type: UNSUPP")
        let readOnly = try Fixture(readOnly: true)
        readOnly.initialise()
        #expect(try readOnly.request(type: 1, sector: 0, length: 512, dataFlags: 0) == 1)
        #expect(f.events.broken.withLock { $0 }.isEmpty, "bad requests fail alone; the queue stays usable")
    }

    @Test("a broken ring sets DEVICE_NEEDS_RESET instead of touching memory outside RAM")
    func brokenRing() throws {
        let f = try Fixture()
        f.initialise()
        try f.descriptor(0, address: 0x13000, length: 16, flags: 1, next: 1)
        try f.descriptor(1, address: 0xffff_0000, length: 4096, flags: 3, next: 2) // outside the 4 MiB of RAM
        try f.descriptor(2, address: 0x20000, length: 1, flags: 2, next: 0)
        try f.publish(head: 0)
        #expect(f.reg(0x070) & 0x40 != 0)
        #expect(f.usedIndex == 0)
        let looping = try Fixture()
        looping.initialise()
        try looping.descriptor(0, address: 0x13000, length: 16, flags: 1, next: 1)
        try looping.descriptor(1, address: 0x14000, length: 512, flags: 1, next: 0) // 1 -> 0 -> 1 ...
        try looping.publish(head: 0)
        #expect(looping.reg(0x070) & 0x40 != 0)
        #expect(looping.events.broken.withLock { $0 }.first?.contains("loops") == true)
        let badHead = try Fixture()
        badHead.initialise()
        try badHead.publish(head: 9) // queue size 8
        #expect(badHead.reg(0x070) & 0x40 != 0)
    }

    @Test("FEATURES_OK is refused without VERSION_1 or with a feature not offered")
    func featureNegotiation() throws {
        let f = try Fixture()
        f.initialise(features: 0)
        #expect(f.reg(0x070) & 8 == 0)
        let g = try Fixture()
        g.initialise(features: VirtioMMIODevice.featureVersion1 | 1 << 28) // indirect descriptors: not offered
        #expect(g.reg(0x070) & 8 == 0)
    }

    @Test("saved registers load into a fresh device and the queue carries on")
    func stateRoundTrip() throws {
        let f = try Fixture()
        f.initialise()
        try f.memory.write([UInt8](repeating: 0xab, count: 512), at: GuestAddress(VirtioBlockTests.data))
        #expect(try f.request(type: 1, sector: 1, length: 512, dataFlags: 0) == 0)
        var writer = StateWriter()
        f.device.encodeState(into: &writer)
        let saved = StateSection(name: "virtio-blk/0", version: 1, payload: writer.bytes)
        func decode(_ section: StateSection) throws -> VirtioMMIODevice.Registers {
            var reader = StateReader(section)
            let registers = try VirtioMMIODevice.decodeState(from: &reader)
            try reader.finish()
            return registers
        }
        let registers = try decode(saved)
        #expect(registers.queue.nextAvailable == 1 && registers.queue.nextUsed == 1 && registers.status == 15)
        var truncated = saved
        truncated.payload.removeLast()
        #expect(throws: StateLoadError.self) { try decode(truncated) }
        var badSize = saved
        badSize.payload[32] = 0; badSize.payload[33] = 0 // queue size 0
        #expect(throws: StateLoadError.self) { try decode(badSize) }
    }

    @Test("the image lock refuses a second writer and a reader beside a writer, not two readers")
    func imageLocks() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("tern-lock-\(UUID().uuidString)").path
        FileManager.default.createFile(atPath: path, contents: Data(count: 4096))
        defer { unlink(path) }
        let writer = try DiskImage(DriveConfiguration(path: path, id: "a"), active: true)
        #expect(throws: DiskImageError.locked(path: path, writable: true)) {
            _ = try DiskImage(DriveConfiguration(path: path, id: "b"), active: true)
        }
        #expect(throws: DiskImageError.locked(path: path, writable: false)) {
            _ = try DiskImage(DriveConfiguration(path: path, readOnly: true, id: "c"), active: true)
        }
        let inactive = try DiskImage(DriveConfiguration(path: path, id: "d"), active: false)
        #expect(throws: DiskImageError.self) { try inactive.activate() }
        writer.deactivate()
        try inactive.activate()
        #expect(inactive.isActive)
        inactive.deactivate()
        let reader1 = try DiskImage(DriveConfiguration(path: path, readOnly: true, id: "e"), active: true)
        let reader2 = try DiskImage(DriveConfiguration(path: path, readOnly: true, id: "f"), active: true)
        #expect(reader1.isActive && reader2.isActive)
    }
}
