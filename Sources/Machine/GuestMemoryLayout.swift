/// Where guest RAM sits in the guest-physical address space.
///
/// RAM up to 3 GiB is mapped from address 0; the rest starts at 4 GiB, leaving the usual hole
/// below 4 GiB for the IOAPIC, LAPIC, and the firmware area. Each contiguous piece is one
/// KVM memory slot and one range of the host mapping.
public struct GuestMemoryLayout: Equatable, Sendable {
    /// One contiguous run of RAM: a KVM memory slot.
    public struct Region: Equatable, Sendable {
        public var slot: UInt32
        public var guestAddress: GuestAddress
        public var size: UInt64
        /// Offset of this region in the single host mapping of all guest RAM.
        public var hostOffset: UInt64

        public var end: UInt64 { guestAddress.rawValue + size }
        public func contains(_ address: UInt64) -> Bool { address >= guestAddress.rawValue && address < end }
    }

    /// The first byte of the hole below 4 GiB.
    public static let lowMemoryLimit: UInt64 = 3 << 30
    /// Where RAM above `lowMemoryLimit` resumes.
    public static let highMemoryBase: UInt64 = 4 << 30

    public let ramSize: UInt64
    public let regions: [Region]

    public init(ramSize: UInt64) {
        self.ramSize = ramSize
        let low = min(ramSize, Self.lowMemoryLimit)
        var regions = [Region(slot: 0, guestAddress: 0, size: low, hostOffset: 0)]
        if ramSize > low {
            regions.append(Region(slot: 1, guestAddress: GuestAddress(Self.highMemoryBase),
                                  size: ramSize - low, hostOffset: low))
        }
        self.regions = regions
    }

    /// RAM below the hole.
    public var lowMemorySize: UInt64 { regions[0].size }

    /// The host-mapping offset of `length` bytes at `address`, or nil when any byte of the range
    /// is outside RAM or the range crosses from one region into another.
    public func hostOffset(of address: GuestAddress, length: UInt64) -> UInt64? {
        for region in regions where region.contains(address.rawValue) {
            let (end, overflow) = address.rawValue.addingReportingOverflow(length)
            guard !overflow, end <= region.end else { return nil }
            return region.hostOffset + (address.rawValue - region.guestAddress.rawValue)
        }
        return nil
    }
}
