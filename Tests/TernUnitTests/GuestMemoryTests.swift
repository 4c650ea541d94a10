import Testing
@testable import Machine

/// Guest RAM's own operations, on a memfd and no KVM.
@Suite("Guest memory")
struct GuestMemoryTests {
    @Test("place writes through the memfd: the bytes show in the mapping, and out-of-range writes are refused")
    func placeWritesThroughTheDescriptor() throws {
        let memory = try GuestMemory(layout: GuestMemoryLayout(ramSize: 32 << 20))
        let page = [UInt8]((0..<8192).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) })
        let placed = page.withUnsafeBytes { memory.place(atOffset: 4 << 20, from: $0.baseAddress!, count: $0.count) }
        #expect(placed)
        #expect(Array(UnsafeRawBufferPointer(start: memory.hostBase + (4 << 20), count: 8192)) == page)
        // A present page is overwritten in place.
        let again = [UInt8](repeating: 0xA5, count: 4096)
        _ = again.withUnsafeBytes { memory.place(atOffset: 4 << 20, from: $0.baseAddress!, count: $0.count) }
        #expect(memory.hostBase.load(fromByteOffset: (4 << 20) + 4095, as: UInt8.self) == 0xA5)
        #expect(memory.hostBase.load(fromByteOffset: (4 << 20) + 4096, as: UInt8.self) == page[4096])
        // Past the end, or wrapping around: refused, nothing written.
        let refused = page.withUnsafeBytes { raw in
            [memory.place(atOffset: (32 << 20) - 4096, from: raw.baseAddress!, count: 8192),
             memory.place(atOffset: UInt64.max - 100, from: raw.baseAddress!, count: 4096)]
        }
        #expect(refused == [false, false])
        #expect(memory.dataExtents(offset: (28 << 20), length: 4 << 20).isEmpty)
    }

    @Test("preallocate makes all of RAM present (SEEK_DATA finds no hole) and leaves it zero")
    func preallocateMakesRAMPresent() throws {
        let memory = try GuestMemory(layout: GuestMemoryLayout(ramSize: 32 << 20))
        #expect(memory.dataExtents(offset: 0, length: memory.size).isEmpty)
        try memory.preallocate()
        let extents = memory.dataExtents(offset: 0, length: memory.size)
        #expect(extents.count == 1 && extents.first?.offset == 0 && extents.first?.length == memory.size, "\(extents)")
        let bytes = UnsafeRawBufferPointer(start: memory.hostBase, count: Int(memory.size))
        #expect(!bytes.contains { $0 != 0 })
    }
}
