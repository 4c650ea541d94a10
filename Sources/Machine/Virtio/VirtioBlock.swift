/// A virtio-blk device (virtio 1.x section 5.2) over a raw image: read, write, flush and
/// get-id requests, one queue.
final class VirtioBlock: VirtioDeviceBackend {
    static let sectorSize: UInt64 = 512

    private enum Feature {
        static let segmentMaximum: UInt64 = 1 << 2
        static let readOnly: UInt64 = 1 << 5
        static let blockSize: UInt64 = 1 << 6
        static let flush: UInt64 = 1 << 9
    }
    private enum RequestType {
        static let read: UInt32 = 0
        static let write: UInt32 = 1
        static let flush: UInt32 = 4
        static let getID: UInt32 = 8
    }
    private enum RequestStatus {
        static let ok: UInt8 = 0
        static let ioError: UInt8 = 1
        static let unsupported: UInt8 = 2
    }

    let image: DiskImage
    /// Reports an I/O error of the image (for the log); the guest sees VIRTIO_BLK_S_IOERR.
    private let onError: @Sendable (String) -> Void

    init(image: DiskImage, onError: @escaping @Sendable (String) -> Void) {
        self.image = image
        self.onError = onError
    }

    var deviceID: UInt32 { 2 }

    var offeredFeatures: UInt64 {
        Feature.segmentMaximum | Feature.blockSize | Feature.flush | (image.configuration.readOnly ? Feature.readOnly : 0)
    }

    func readConfiguration(offset: Int, size: Int) -> UInt64 {
        // capacity (u64, sectors) at 0, size_max at 8, seg_max at 12, geometry at 16, blk_size at 20.
        var space = [UInt8](repeating: 0, count: 24)
        func put<T: FixedWidthInteger>(_ value: T, at position: Int) {
            withUnsafeBytes(of: value.littleEndian) { for (i, byte) in $0.enumerated() { space[position + i] = byte } }
        }
        put(image.size / Self.sectorSize, at: 0)
        put(UInt32(SplitVirtqueue.maximumSize - 2), at: 12)
        put(UInt32(Self.sectorSize), at: 20)
        guard offset >= 0, offset + size <= space.count else { return 0 }
        var value: UInt64 = 0
        for i in (0..<size).reversed() { value = value << 8 | UInt64(space[offset + i]) }
        return value
    }

    func serve(_ queue: inout SplitVirtqueue, memory: GuestMemory) throws(VirtqueueError) -> Int {
        var served = 0
        while let head = try queue.popAvailable(memory) {
            let buffers = try queue.chain(from: head, memory)
            let written = try handle(buffers, memory: memory)
            try queue.pushUsed(head: head, written: written, memory)
            served += 1
        }
        return served
    }

    /// One request: header, data buffers, status byte. Returns the bytes written into the chain.
    private func handle(_ buffers: [VirtqueueBuffer], memory: GuestMemory) throws(VirtqueueError) -> UInt32 {
        guard buffers.count >= 2, let header = buffers.first, !header.deviceWrites, header.length >= 16,
              let statusBuffer = buffers.last, statusBuffer.deviceWrites, statusBuffer.length >= 1 else {
            throw VirtqueueError(description: "a virtio-blk request without a 16-byte header and a status byte")
        }
        let type: UInt32
        let sector: UInt64
        do {
            type = try memory.load(UInt32.self, at: header.address)
            sector = try memory.load(UInt64.self, at: header.address + 8)
        } catch {
            throw VirtqueueError(description: "a request header outside guest RAM")
        }
        let data = buffers.dropFirst().dropLast()
        let (status, written) = perform(type: type, sector: sector, data: Array(data), memory: memory)
        do { try memory.store(status, at: statusBuffer.address) } catch {
            throw VirtqueueError(description: "a status byte outside guest RAM")
        }
        return written + 1
    }

    private func perform(type: UInt32, sector: UInt64, data: [VirtqueueBuffer], memory: GuestMemory) -> (UInt8, UInt32) {
        switch type {
        case RequestType.read, RequestType.write:
            let reading = type == RequestType.read
            // Data buffers go the right way, whole sectors, inside the disk.
            guard data.allSatisfy({ $0.deviceWrites == reading }) else { return (RequestStatus.ioError, 0) }
            let total = data.reduce(UInt64(0)) { $0 + UInt64($1.length) }
            let (start, overflow) = sector.multipliedReportingOverflow(by: Self.sectorSize)
            guard !overflow, total % Self.sectorSize == 0, start <= image.size, total <= image.size - start else {
                return (RequestStatus.ioError, 0)
            }
            if !reading && image.configuration.readOnly { return (RequestStatus.ioError, 0) }
            var offset = start
            do {
                for buffer in data {
                    // Checked when the chain was walked; `forWriting` makes a read that lands in
                    // guest RAM count as dirty for a migration in progress.
                    let pointer = try memory.pointer(at: buffer.address, length: UInt64(buffer.length), forWriting: reading)
                    if reading {
                        try image.read(offset: offset, into: pointer, count: Int(buffer.length))
                    } else {
                        try image.write(offset: offset, from: pointer, count: Int(buffer.length))
                    }
                    offset += UInt64(buffer.length)
                }
            } catch let error as DiskImageError {
                onError(error.description)
                return (RequestStatus.ioError, 0)
            } catch {
                return (RequestStatus.ioError, 0)
            }
            return (RequestStatus.ok, reading ? UInt32(total) : 0)
        case RequestType.flush:
            do { try image.flush() } catch {
                onError(error.description)
                return (RequestStatus.ioError, 0)
            }
            return (RequestStatus.ok, 0)
        case RequestType.getID:
            // Up to 20 bytes of serial number, NUL-padded when shorter.
            guard let buffer = data.first, buffer.deviceWrites else { return (RequestStatus.ioError, 0) }
            let serial = Array(image.configuration.id.utf8.prefix(20))
            let count = min(Int(buffer.length), 20)
            var bytes = [UInt8](repeating: 0, count: count)
            for i in 0..<min(count, serial.count) { bytes[i] = serial[i] }
            do { try memory.write(bytes, at: buffer.address) } catch { return (RequestStatus.ioError, 0) }
            return (RequestStatus.ok, UInt32(count))
        default:
            return (RequestStatus.unsupported, 0)
        }
    }
}
