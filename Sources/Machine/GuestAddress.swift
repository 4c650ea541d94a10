/// A guest-physical address. Kept distinct from host pointers and plain sizes so the two
/// address spaces cannot be mixed up across module boundaries.
public struct GuestAddress: RawRepresentable, Hashable, Comparable, Sendable, ExpressibleByIntegerLiteral,
    CustomStringConvertible {
    public var rawValue: UInt64

    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public init(_ rawValue: UInt64) { self.rawValue = rawValue }
    public init(integerLiteral value: UInt64) { self.rawValue = value }

    public static func < (lhs: GuestAddress, rhs: GuestAddress) -> Bool { lhs.rawValue < rhs.rawValue }
    public static func + (lhs: GuestAddress, rhs: UInt64) -> GuestAddress { GuestAddress(lhs.rawValue + rhs) }

    public var description: String { "0x" + String(rawValue, radix: 16) }
}
