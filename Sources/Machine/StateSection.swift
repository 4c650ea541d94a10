/// One named, versioned piece of saved machine state (a vCPU, the IOAPIC, the UART...).
/// The migration stream carries these opaque to itself; only the machine reads payloads.
public struct StateSection: Equatable, Sendable {
    public var name: String
    public var version: UInt32
    public var payload: [UInt8]

    public init(name: String, version: UInt32, payload: [UInt8]) {
        self.name = name
        self.version = version
        self.payload = payload
    }
}

/// Why saved state could not be loaded. Every length and version is checked before use.
public struct StateLoadError: Error, CustomStringConvertible, Equatable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// Builds a section payload: little-endian integers and raw kernel structures.
struct StateWriter {
    private(set) var bytes: [UInt8] = []

    mutating func append<T: FixedWidthInteger>(_ value: T) {
        withUnsafeBytes(of: value.littleEndian) { bytes.append(contentsOf: $0) }
    }

    mutating func append(bytes more: [UInt8]) {
        append(UInt32(more.count))
        bytes.append(contentsOf: more)
    }

    /// A kernel ABI structure, copied as its bytes (x86-64 layouts are fixed by the kernel ABI).
    mutating func appendRaw<T>(_ value: T) {
        var copy = value
        append(UInt32(MemoryLayout<T>.size))
        withUnsafeBytes(of: &copy) { bytes.append(contentsOf: $0) }
    }
}

/// Reads a section payload, refusing anything that runs past its end or has the wrong size.
struct StateReader {
    private let bytes: [UInt8]
    private var position = 0
    let section: String

    init(_ section: StateSection) {
        self.bytes = section.payload
        self.section = section.name
    }

    /// A reader for a section that must be at `version`, the only one this tern loads.
    init(_ section: StateSection, version: UInt32) throws(StateLoadError) {
        guard section.version == version else {
            throw StateLoadError("section '\(section.name)' has version \(section.version); this tern loads version \(version)")
        }
        self.init(section)
    }

    var isAtEnd: Bool { position == bytes.count }

    mutating func read<T: FixedWidthInteger>(_ type: T.Type) throws(StateLoadError) -> T {
        let size = MemoryLayout<T>.size
        guard position + size <= bytes.count else { throw StateLoadError("section '\(section)' is truncated") }
        var value: T = 0
        for i in (0..<size).reversed() { value = value << 8 | T(bytes[position + i]) }
        position += size
        return value
    }

    mutating func readBytes(maximum: Int) throws(StateLoadError) -> [UInt8] {
        let count = Int(try read(UInt32.self))
        guard count <= maximum, position + count <= bytes.count else {
            throw StateLoadError("section '\(section)' has a field of \(count) bytes, beyond its bounds")
        }
        defer { position += count }
        return Array(bytes[position..<(position + count)])
    }

    /// A kernel structure saved with `appendRaw`; its size must match this host's exactly.
    mutating func readRaw<T>(_ type: T.Type, initial: T) throws(StateLoadError) -> T {
        let stored = try readBytes(maximum: 1 << 20)
        guard stored.count == MemoryLayout<T>.size else {
            throw StateLoadError("section '\(section)': \(T.self) is \(stored.count) bytes, expected \(MemoryLayout<T>.size)")
        }
        var value = initial
        withUnsafeMutableBytes(of: &value) { $0.copyBytes(from: stored) }
        return value
    }

    func finish() throws(StateLoadError) {
        guard isAtEnd else { throw StateLoadError("section '\(section)' has \(bytes.count - position) unexpected trailing bytes") }
    }
}
