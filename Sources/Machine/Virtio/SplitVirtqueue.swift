/// One buffer of a descriptor chain, checked to lie in guest RAM.
struct VirtqueueBuffer {
    var address: GuestAddress
    var length: UInt32
    /// Device-writable (VIRTQ_DESC_F_WRITE): the device fills it; otherwise it reads it.
    var deviceWrites: Bool
}

/// Why a queue can no longer be used: the driver broke the ring's rules. The device then sets
/// DEVICE_NEEDS_RESET, as the virtio specification asks, rather than guess.
struct VirtqueueError: Error, CustomStringConvertible {
    let description: String
}

/// A split virtqueue (virtio 1.x, section 2.7) as the device sees it: the driver's descriptor
/// table and available ring, and the used ring the device fills, all in guest memory.
///
/// Every index the driver wrote is checked against the queue size before use, every address
/// against guest RAM, and a chain may hold at most `size` descriptors (so a loop ends).
struct SplitVirtqueue: Equatable {
    static let maximumSize: UInt16 = 256
    private static let descriptorNext: UInt16 = 1
    private static let descriptorWrite: UInt16 = 2
    private static let descriptorIndirect: UInt16 = 4

    var size: UInt16 = maximumSize
    var ready = false
    var descriptorTable: UInt64 = 0
    var availableRing: UInt64 = 0
    var usedRing: UInt64 = 0
    /// The next available-ring slot the device will take.
    var nextAvailable: UInt16 = 0
    /// The used ring's index, as the device last published it.
    var nextUsed: UInt16 = 0

    /// The head of the next chain the driver made available, if any.
    mutating func popAvailable(_ memory: GuestMemory) throws(VirtqueueError) -> UInt16? {
        let published = try load(UInt16.self, availableRing + 2, memory)
        guard published != nextAvailable else { return nil }
        // More outstanding chains than the ring holds: the driver's index is garbage.
        guard published &- nextAvailable <= size else {
            throw VirtqueueError(description: "the available index jumped from \(nextAvailable) to \(published) (queue size \(size))")
        }
        let slot = UInt64(nextAvailable % size)
        let head = try load(UInt16.self, availableRing + 4 + 2 * slot, memory)
        guard head < size else { throw VirtqueueError(description: "descriptor index \(head) is outside the table of \(size)") }
        nextAvailable &+= 1
        return head
    }

    /// The buffers of the chain that starts at `head`.
    func chain(from head: UInt16, _ memory: GuestMemory) throws(VirtqueueError) -> [VirtqueueBuffer] {
        var buffers: [VirtqueueBuffer] = []
        var index = head
        while true {
            guard buffers.count < Int(size) else { throw VirtqueueError(description: "a descriptor chain loops") }
            let entry = descriptorTable + 16 * UInt64(index)
            let address = try load(UInt64.self, entry, memory)
            let length = try load(UInt32.self, entry + 8, memory)
            let flags = try load(UInt16.self, entry + 12, memory)
            let next = try load(UInt16.self, entry + 14, memory)
            guard flags & Self.descriptorIndirect == 0 else {
                throw VirtqueueError(description: "an indirect descriptor, a feature tern does not offer")
            }
            guard (try? memory.pointer(at: GuestAddress(address), length: UInt64(length))) != nil else {
                throw VirtqueueError(description: "a buffer of \(length) bytes at 0x\(String(address, radix: 16)) lies outside guest RAM")
            }
            buffers.append(VirtqueueBuffer(address: GuestAddress(address), length: length,
                                           deviceWrites: flags & Self.descriptorWrite != 0))
            guard flags & Self.descriptorNext != 0 else { return buffers }
            guard next < size else { throw VirtqueueError(description: "descriptor index \(next) is outside the table of \(size)") }
            index = next
        }
    }

    /// Whether the driver asked for no used-buffer notifications (VIRTQ_AVAIL_F_NO_INTERRUPT):
    /// a driver that polls the used ring saves the interrupt and its acknowledgement.
    func interruptsSuppressed(_ memory: GuestMemory) -> Bool {
        ((try? memory.load(UInt16.self, at: GuestAddress(availableRing))) ?? 0) & 1 != 0
    }

    /// Returns a chain to the driver with the number of bytes the device wrote into it.
    mutating func pushUsed(head: UInt16, written: UInt32, _ memory: GuestMemory) throws(VirtqueueError) {
        let slot = UInt64(nextUsed % size)
        try store(UInt32(head), usedRing + 4 + 8 * slot, memory)
        try store(written, usedRing + 8 + 8 * slot, memory)
        nextUsed &+= 1
        // x86 keeps stores in order: the element is visible before the index that publishes it.
        try store(nextUsed, usedRing + 2, memory)
    }

    private func load<T: FixedWidthInteger>(_ type: T.Type, _ address: UInt64, _ memory: GuestMemory) throws(VirtqueueError) -> T {
        do { return try memory.load(type, at: GuestAddress(address)) } catch {
            throw VirtqueueError(description: "the queue's rings at 0x\(String(address, radix: 16)) lie outside guest RAM")
        }
    }

    private func store<T: FixedWidthInteger>(_ value: T, _ address: UInt64, _ memory: GuestMemory) throws(VirtqueueError) {
        do { try memory.store(value, at: GuestAddress(address)) } catch {
            throw VirtqueueError(description: "the used ring at 0x\(String(address, radix: 16)) lies outside guest RAM")
        }
    }
}
