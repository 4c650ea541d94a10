import Foundation

/// The source's cache of pages as last sent, for XBZRLE: QEMU's page cache, direct-mapped
/// (slot = page number modulo the slot count), each slot holding one page and the page number
/// it holds. Its contents always equal what the destination holds for that page, because every
/// page sent while XBZRLE is on is sent from its slot (or, when sent as zero, forgotten).
///
/// The slots live in an anonymous mapping, so a large cache costs memory only as it fills.
final class XBZRLECache {
    static let pageSize = Int(MigrationStreamFormat.pageSize)
    let slotCount: Int
    private var tags: [Int]
    private let storage: UnsafeMutableRawPointer
    private let mappedBytes: Int

    /// Returns nil if the mapping fails (the size was checked against guest RAM already).
    init?(bytes: UInt64) {
        let slots = max(Int(bytes / UInt64(Self.pageSize)), 1)
        let length = slots * Self.pageSize
        let mapped = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard let mapped, mapped != MAP_FAILED else { return nil }
        slotCount = slots
        storage = mapped
        mappedBytes = length
        tags = [Int](repeating: -1, count: slots)
    }

    deinit { munmap(storage, mappedBytes) }

    var sizeInBytes: UInt64 { UInt64(slotCount * Self.pageSize) }

    private func slot(for page: Int) -> Int { page % slotCount }

    /// The cached copy of `page`, if the cache holds it.
    func lookup(_ page: Int) -> UnsafeMutableRawPointer? {
        let index = slot(for: page)
        return tags[index] == page ? storage + index * Self.pageSize : nil
    }

    /// The slot for `page`, now tagged with it (its old contents belong to whatever was there).
    func claim(_ page: Int) -> UnsafeMutableRawPointer {
        let index = slot(for: page)
        tags[index] = page
        return storage + index * Self.pageSize
    }

    /// Forgets `page` (it was sent some other way).
    func invalidate(_ page: Int) {
        let index = slot(for: page)
        if tags[index] == page { tags[index] = -1 }
    }

    /// The size `migrate-set-cache-size` stores for `value`: rounded down to a power of two,
    /// as QEMU's cache_init does.
    static func roundedSize(_ value: UInt64) -> UInt64 {
        guard value > 0 else { return 0 }
        return 1 << (63 - UInt64(value.leadingZeroBitCount))
    }
}
