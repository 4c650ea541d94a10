extension Array where Element == UInt8 {
    /// Writes a little-endian integer at a byte offset; the array must already be long enough.
    mutating func setLittleEndian<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        var remaining = value.littleEndian
        Swift.withUnsafeBytes(of: &remaining) { source in
            for i in 0..<source.count { self[offset + i] = source[i] }
        }
    }

    /// Reads a little-endian integer at a byte offset, or nil when it would run past the end.
    func littleEndian<T: FixedWidthInteger>(_ type: T.Type, at offset: Int) -> T? {
        let size = MemoryLayout<T>.size
        guard offset >= 0, offset + size <= count else { return nil }
        var value: T = 0
        for i in (0..<size).reversed() { value = value << 8 | T(self[offset + i]) }
        return value
    }
}
