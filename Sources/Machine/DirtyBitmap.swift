/// One bit per 4 KiB page of guest RAM, indexed by the page's offset in the RAM mapping.
public struct DirtyBitmap: Sendable {
    public static let pageSize: UInt64 = 4096
    public private(set) var words: [UInt64]
    public let pageCount: Int

    /// An empty bitmap, or with `allSet` every page marked (the first pass sends everything).
    public init(pageCount: Int, allSet: Bool = false) {
        self.pageCount = pageCount
        var words = [UInt64](repeating: allSet ? ~0 : 0, count: (pageCount + 63) / 64)
        if allSet, pageCount % 64 != 0 { words[words.count - 1] = (1 << UInt64(pageCount % 64)) - 1 }
        self.words = words
    }

    public mutating func set(_ page: Int) {
        words[page / 64] |= 1 << UInt64(page % 64)
    }

    public mutating func clear(_ page: Int) {
        words[page / 64] &= ~(1 << UInt64(page % 64))
    }

    public func isSet(_ page: Int) -> Bool {
        words[page / 64] & (1 << UInt64(page % 64)) != 0
    }

    /// How many pages are marked.
    public var count: Int { words.reduce(0) { $0 + $1.nonzeroBitCount } }

    /// Lets KVM fill words in place (KVM_GET_DIRTY_LOG writes whole words).
    mutating func withWords<T>(_ body: (UnsafeMutablePointer<UInt64>) -> T) -> T {
        words.withUnsafeMutableBufferPointer { body($0.baseAddress!) }
    }

    /// The next marked page at or after `page`, or nil.
    public func nextSet(from page: Int) -> Int? {
        var index = page / 64
        guard index < words.count else { return nil }
        var word = words[index] & (~0 << UInt64(page % 64))
        while true {
            if word != 0 {
                let found = index * 64 + word.trailingZeroBitCount
                return found < pageCount ? found : nil
            }
            index += 1
            guard index < words.count else { return nil }
            word = words[index]
        }
    }

    /// The marked pages as runs of consecutive pages, in order.
    public var runs: [Range<Int>] {
        var runs: [Range<Int>] = []
        var page = 0
        while let start = nextSet(from: page) {
            let end = nextClear(from: start)
            runs.append(start..<end)
            page = end
        }
        return runs
    }

    /// The first page at or after `page` that is not marked (the end of a run).
    public func nextClear(from page: Int) -> Int {
        var current = page
        while current < pageCount {
            let index = current / 64
            let word = ~words[index] & (~0 << UInt64(current % 64))
            if word != 0 { return min(index * 64 + word.trailingZeroBitCount, pageCount) }
            current = (index + 1) * 64
        }
        return pageCount
    }
}
