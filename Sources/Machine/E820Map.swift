/// The BIOS e820 memory map tern hands to a guest: what is RAM and what is reserved.
public struct E820Map: Equatable, Sendable {
    public enum Kind: UInt32, Sendable {
        case ram = 1
        case reserved = 2
    }

    public struct Entry: Equatable, Sendable {
        public var address: UInt64
        public var size: UInt64
        public var kind: Kind
    }

    public let entries: [Entry]

    /// Where the MP table lives: the last KiB of base memory, which the map reserves.
    public static let multiprocessorTableBase: UInt64 = 0x9fc00
    /// The top of conventional memory (640 KiB).
    public static let baseMemoryEnd: UInt64 = 0xa0000
    /// The BIOS ROM area Linux scans for an MP floating pointer.
    public static let biosAreaBase: UInt64 = 0xf0000
    public static let highMemoryStart: UInt64 = 0x100000

    public init(layout: GuestMemoryLayout) {
        var entries: [Entry] = [
            Entry(address: 0, size: Self.multiprocessorTableBase, kind: .ram),
            Entry(address: Self.multiprocessorTableBase, size: Self.baseMemoryEnd - Self.multiprocessorTableBase, kind: .reserved),
            Entry(address: Self.biosAreaBase, size: Self.highMemoryStart - Self.biosAreaBase, kind: .reserved),
        ]
        if layout.lowMemorySize > Self.highMemoryStart {
            entries.append(Entry(address: Self.highMemoryStart, size: layout.lowMemorySize - Self.highMemoryStart, kind: .ram))
        }
        for region in layout.regions.dropFirst() {
            entries.append(Entry(address: region.guestAddress.rawValue, size: region.size, kind: .ram))
        }
        self.entries = entries
    }
}
