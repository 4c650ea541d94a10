import Synchronization

/// What a virtio device type adds to the transport: its identity, features, configuration
/// space and the handling of its one queue.
protocol VirtioDeviceBackend: AnyObject, Sendable {
    var deviceID: UInt32 { get }
    var offeredFeatures: UInt64 { get }
    /// Reads `size` bytes (1, 2, 4 or 8) of the device-specific configuration space.
    func readConfiguration(offset: Int, size: Int) -> UInt64
    /// Serves every chain the driver made available; returns how many it used.
    func serve(_ queue: inout SplitVirtqueue, memory: GuestMemory) throws(VirtqueueError) -> Int
}

/// The virtio-mmio transport, version 2 (virtio 1.x section 4.2.2): the register window a
/// driver finds through `virtio_mmio.device=4K@BASE:IRQ` on the kernel command line, with one
/// queue. Requests are served on the vCPU thread that writes QueueNotify: the write already
/// costs an exit, and a host write to the page cache is cheaper than waking a thread; so no
/// request is ever in flight while the vCPUs are stopped, and migration needs no queue of them.
final class VirtioMMIODevice: Sendable {
    static let windowSize: UInt64 = 0x1000
    static let magic: UInt32 = 0x7472_6976 // "virt"
    static let vendorID: UInt32 = 0x5445_524E // "TERN"
    static let featureVersion1: UInt64 = 1 << 32

    enum Status {
        static let acknowledge: UInt32 = 1
        static let driver: UInt32 = 2
        static let driverOK: UInt32 = 4
        static let featuresOK: UInt32 = 8
        static let needsReset: UInt32 = 0x40
        static let failed: UInt32 = 0x80
    }

    /// The registers a driver sets; everything saved for migration.
    struct Registers: Equatable {
        var status: UInt32 = 0
        var deviceFeatureSelect: UInt32 = 0
        var driverFeatures: UInt64 = 0
        var driverFeatureSelect: UInt32 = 0
        var queueSelect: UInt32 = 0
        var queue = SplitVirtqueue()
        var interruptStatus: UInt32 = 0
        var configGeneration: UInt32 = 0
    }

    let base: UInt64
    let interruptLine: UInt32
    let backend: VirtioDeviceBackend
    private let memory: GuestMemory
    private let raiseInterrupt: @Sendable () -> Void
    private let registers = Mutex(Registers())
    /// Why the device last set DEVICE_NEEDS_RESET, for the log.
    let onBrokenQueue: @Sendable (String) -> Void

    init(base: UInt64, interruptLine: UInt32, backend: VirtioDeviceBackend, memory: GuestMemory,
         raiseInterrupt: @escaping @Sendable () -> Void, onBrokenQueue: @escaping @Sendable (String) -> Void) {
        self.base = base
        self.interruptLine = interruptLine
        self.backend = backend
        self.memory = memory
        self.raiseInterrupt = raiseInterrupt
        self.onBrokenQueue = onBrokenQueue
    }

    /// Linux's command-line token that announces this device.
    var kernelArgument: String {
        "virtio_mmio.device=4K@0x\(String(base, radix: 16)):\(interruptLine)"
    }

    func read(offset: UInt64, size: Int) -> UInt64 {
        if offset >= 0x100 { return backend.readConfiguration(offset: Int(offset - 0x100), size: size) }
        guard size == 4 else { return 0 }
        return registers.withLock { r -> UInt64 in
            switch offset {
            case 0x000: return UInt64(Self.magic)
            case 0x004: return 2
            case 0x008: return UInt64(backend.deviceID)
            case 0x00c: return UInt64(Self.vendorID)
            case 0x010:
                let features = backend.offeredFeatures | Self.featureVersion1
                return r.deviceFeatureSelect == 0 ? features & 0xffff_ffff
                    : r.deviceFeatureSelect == 1 ? features >> 32 : 0
            case 0x034: return r.queueSelect == 0 ? UInt64(SplitVirtqueue.maximumSize) : 0
            case 0x044: return r.queueSelect == 0 && r.queue.ready ? 1 : 0
            case 0x060: return UInt64(r.interruptStatus)
            case 0x070: return UInt64(r.status)
            case 0x0fc: return UInt64(r.configGeneration)
            default: return 0
            }
        }
    }

    func write(offset: UInt64, size: Int, value: UInt64) {
        guard size == 4, offset < 0x100 else { return } // the block configuration is read-only
        let value32 = UInt32(truncatingIfNeeded: value)
        var notify = false
        registers.withLock { r in
            switch offset {
            case 0x014: r.deviceFeatureSelect = value32
            case 0x020:
                guard r.status & Status.featuresOK == 0 else { return }
                if r.driverFeatureSelect == 0 {
                    r.driverFeatures = r.driverFeatures & ~0xffff_ffff | UInt64(value32)
                } else if r.driverFeatureSelect == 1 {
                    r.driverFeatures = r.driverFeatures & 0xffff_ffff | UInt64(value32) << 32
                }
            case 0x024: r.driverFeatureSelect = value32
            case 0x030: r.queueSelect = value32
            case 0x038:
                if r.queueSelect == 0, !r.queue.ready, (1...UInt32(SplitVirtqueue.maximumSize)).contains(value32) {
                    r.queue.size = UInt16(value32)
                }
            case 0x044:
                guard r.queueSelect == 0 else { return }
                r.queue.ready = value32 == 1
            case 0x050: notify = value32 == 0
            case 0x064: r.interruptStatus &= ~value32
            case 0x070: setStatus(value32, &r)
            case 0x080, 0x084, 0x090, 0x094, 0x0a0, 0x0a4:
                guard r.queueSelect == 0, !r.queue.ready else { return }
                let high = offset & 4 != 0
                func merge(_ old: UInt64) -> UInt64 {
                    high ? old & 0xffff_ffff | UInt64(value32) << 32 : old & ~0xffff_ffff | UInt64(value32)
                }
                switch offset & ~4 {
                case 0x080: r.queue.descriptorTable = merge(r.queue.descriptorTable)
                case 0x090: r.queue.availableRing = merge(r.queue.availableRing)
                default: r.queue.usedRing = merge(r.queue.usedRing)
                }
            default: break
            }
        }
        if notify { serveQueue() }
    }

    private func setStatus(_ value: UInt32, _ r: inout Registers) {
        if value == 0 {
            r = Registers() // reset: the driver starts over
            return
        }
        var accepted = value
        if value & Status.featuresOK != 0 && r.status & Status.featuresOK == 0 {
            // FEATURES_OK holds only if the driver took a subset of what was offered, and the
            // modern interface (a version-2 transport requires VIRTIO_F_VERSION_1).
            let offered = backend.offeredFeatures | Self.featureVersion1
            if r.driverFeatures & ~offered != 0 || r.driverFeatures & Self.featureVersion1 == 0 {
                accepted &= ~Status.featuresOK
            }
        }
        r.status = accepted | (r.status & Status.needsReset)
    }

    private func serveQueue() {
        var used = 0
        var notify = false
        var broken: String?
        registers.withLock { r in
            guard r.status & Status.driverOK != 0, r.status & Status.needsReset == 0, r.queue.ready else { return }
            do throws(VirtqueueError) {
                used = try backend.serve(&r.queue, memory: memory)
            } catch {
                broken = error.description
                r.status |= Status.needsReset
                r.interruptStatus |= 2 // a configuration change tells the driver to look at the status
                notify = true
                return
            }
            if used > 0 && !r.queue.interruptsSuppressed(memory) {
                r.interruptStatus |= 1
                notify = true
            }
        }
        if let broken { onBrokenQueue(broken) }
        if notify { raiseInterrupt() }
    }

    // MARK: saved state

    /// Appends the registers to a saved-state payload.
    func encodeState(into writer: inout StateWriter) {
        let r = registers.withLock { $0 }
        writer.append(r.status)
        writer.append(r.deviceFeatureSelect)
        writer.append(r.driverFeatures)
        writer.append(r.driverFeatureSelect)
        writer.append(r.queueSelect)
        writer.append(r.interruptStatus)
        writer.append(r.configGeneration)
        writer.append(r.queue.size)
        writer.append(UInt8(r.queue.ready ? 1 : 0))
        writer.append(r.queue.descriptorTable)
        writer.append(r.queue.availableRing)
        writer.append(r.queue.usedRing)
        writer.append(r.queue.nextAvailable)
        writer.append(r.queue.nextUsed)
    }

    /// Decodes saved registers, checking what the device relies on; applies nothing.
    static func decodeState(from reader: inout StateReader) throws(StateLoadError) -> Registers {
        var r = Registers()
        r.status = try reader.read(UInt32.self)
        r.deviceFeatureSelect = try reader.read(UInt32.self)
        r.driverFeatures = try reader.read(UInt64.self)
        r.driverFeatureSelect = try reader.read(UInt32.self)
        r.queueSelect = try reader.read(UInt32.self)
        r.interruptStatus = try reader.read(UInt32.self)
        r.configGeneration = try reader.read(UInt32.self)
        r.queue.size = try reader.read(UInt16.self)
        let ready = try reader.read(UInt8.self)
        r.queue.descriptorTable = try reader.read(UInt64.self)
        r.queue.availableRing = try reader.read(UInt64.self)
        r.queue.usedRing = try reader.read(UInt64.self)
        r.queue.nextAvailable = try reader.read(UInt16.self)
        r.queue.nextUsed = try reader.read(UInt16.self)
        guard (1...SplitVirtqueue.maximumSize).contains(r.queue.size), ready <= 1 else {
            throw StateLoadError("section '\(reader.section)': queue size \(r.queue.size) or ready flag \(ready) is invalid")
        }
        r.queue.ready = ready == 1
        return r
    }

    /// The machine was reset: back to the state before any driver touched the device.
    func reset() {
        registers.withLock { $0 = Registers() }
    }

    func apply(_ saved: Registers) {
        registers.withLock { $0 = saved }
    }
}
