/// A device reached through x86 port I/O.
///
/// Handlers run on the vCPU thread that exited; a device shared by several vCPUs or fed by
/// another thread protects its own state.
public protocol PortIODevice: AnyObject, Sendable {
    /// Reads `size` bytes (1, 2 or 4) at `offset` from the device's first port.
    func read(offset: UInt16, size: Int) -> UInt32
    /// Writes the low `size` bytes of `value` at `offset` from the device's first port.
    func write(offset: UInt16, size: Int, value: UInt32)
}

/// Maps port ranges to devices. Built once before the vCPUs start and never changed, so it is
/// read from every vCPU thread without a lock.
public struct PortIOBus: Sendable {
    struct Mapping: Sendable {
        let base: UInt16
        let count: UInt16
        let device: any PortIODevice
    }

    private var mappings: [Mapping] = []

    public init() {}

    /// Maps `count` ports from `base` to `device`; refuses an overlap with an earlier mapping.
    public mutating func map(base: UInt16, count: UInt16, to device: any PortIODevice) {
        precondition(!mappings.contains { base < $0.base &+ $0.count && $0.base < base &+ count },
                     "port range 0x\(String(base, radix: 16)) overlaps an existing device")
        mappings.append(Mapping(base: base, count: count, device: device))
    }

    func lookup(_ port: UInt16) -> (any PortIODevice, UInt16)? {
        for mapping in mappings where port >= mapping.base && port - mapping.base < mapping.count {
            return (mapping.device, port - mapping.base)
        }
        return nil
    }

    /// Reads a port. An unmapped port reads as all ones, as on a PC bus with nothing there.
    public func read(port: UInt16, size: Int) -> UInt32 {
        guard let (device, offset) = lookup(port) else {
            return size >= 4 ? 0xffff_ffff : (UInt32(1) << (size * 8)) - 1
        }
        return device.read(offset: offset, size: size)
    }

    /// Writes a port. Writes to an unmapped port are ignored (port 0x80 POST codes, PCI probes).
    public func write(port: UInt16, size: Int, value: UInt32) {
        guard let (device, offset) = lookup(port) else { return }
        device.write(offset: offset, size: size, value: value)
    }
}
