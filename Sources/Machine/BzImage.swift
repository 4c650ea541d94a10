/// Errors in loading a Linux kernel image.
public enum KernelImageError: Error, CustomStringConvertible, Equatable {
    case unreadable(path: String, reason: String)
    case notBzImage(path: String, reason: String)
    case tooOld(path: String, version: UInt16)
    case not64Bit(path: String)
    case doesNotFit(path: String, reason: String)

    public var description: String {
        switch self {
        case let .unreadable(path, reason):
            return "cannot read kernel '\(path)': \(reason)"
        case let .notBzImage(path, reason):
            return "'\(path)' is not a Linux bzImage: \(reason)"
        case let .tooOld(path, version):
            return "'\(path)' uses boot protocol \(version >> 8).\(String(format2: version & 0xff)); tern needs 2.12 or later"
        case let .not64Bit(path):
            return "'\(path)' has no 64-bit entry point (XLF_KERNEL_64 is not set)"
        case let .doesNotFit(path, reason):
            return "'\(path)' does not fit in guest memory: \(reason)"
        }
    }
}

extension String {
    init(format2 value: UInt16) {
        self = value < 10 ? "0\(value)" : "\(value)"
    }
}

/// A parsed Linux x86 bzImage: the real-mode setup header (Documentation/arch/x86/boot.rst)
/// and where the protected-mode kernel starts in the file.
public struct BzImage: Sendable {
    /// Offsets into the file of the setup header fields tern reads.
    enum Offset {
        static let setupSectors = 0x1f1
        static let bootFlag = 0x1fe
        static let jump = 0x200
        static let headerMagic = 0x202
        static let protocolVersion = 0x206
        static let loadFlags = 0x211
        static let initrdAddressMax = 0x22c
        static let kernelAlignment = 0x230
        static let relocatable = 0x234
        static let extendedLoadFlags = 0x236
        static let commandLineSize = 0x238
        static let preferredAddress = 0x258
        static let initSize = 0x260
    }

    /// The whole file.
    public let bytes: [UInt8]
    public let protocolVersion: UInt16
    /// Number of 512-byte setup sectors after the boot sector.
    public let setupSectors: Int
    /// The highest address the initrd may end at (inclusive), from `initrd_addr_max`.
    public let initrdAddressMax: UInt32
    /// The longest command line the kernel accepts, excluding the terminating zero.
    public let commandLineSize: UInt32
    public let preferredAddress: UInt64
    public let kernelAlignment: UInt32
    public let initSize: UInt32
    public let isRelocatable: Bool

    /// Parses and checks the setup header. `path` is only used in error messages.
    public init(bytes: [UInt8], path: String) throws(KernelImageError) {
        guard bytes.count >= 0x264 else {
            throw .notBzImage(path: path, reason: "the file is \(bytes.count) bytes, too short for a setup header")
        }
        guard bytes.littleEndian(UInt16.self, at: Offset.bootFlag) == 0xAA55 else {
            throw .notBzImage(path: path, reason: "no 0xAA55 boot signature at offset 0x1fe")
        }
        guard bytes.littleEndian(UInt32.self, at: Offset.headerMagic) == 0x5372_6448 else { // "HdrS"
            throw .notBzImage(path: path, reason: "no \"HdrS\" setup header magic at offset 0x202")
        }
        let version = bytes.littleEndian(UInt16.self, at: Offset.protocolVersion)!
        guard version >= 0x020c else { throw .tooOld(path: path, version: version) }
        guard bytes[Offset.loadFlags] & 0x01 != 0 else {
            throw .notBzImage(path: path, reason: "the kernel does not load high (zImage is not supported)")
        }
        let extended = bytes.littleEndian(UInt16.self, at: Offset.extendedLoadFlags)!
        guard extended & 0x1 != 0 else { throw .not64Bit(path: path) }
        let sectors = bytes[Offset.setupSectors] == 0 ? 4 : Int(bytes[Offset.setupSectors])
        guard (sectors + 1) * 512 < bytes.count else {
            throw .notBzImage(path: path, reason: "the setup code (\(sectors) sectors) is longer than the file")
        }
        self.bytes = bytes
        self.protocolVersion = version
        self.setupSectors = sectors
        self.initrdAddressMax = bytes.littleEndian(UInt32.self, at: Offset.initrdAddressMax)!
        self.commandLineSize = bytes.littleEndian(UInt32.self, at: Offset.commandLineSize)!
        self.preferredAddress = bytes.littleEndian(UInt64.self, at: Offset.preferredAddress)!
        // x86-64 physical addresses have at most 52 bits; the load address and everything
        // computed from it stay far from overflow below that.
        guard preferredAddress < 1 << 52 else {
            throw .notBzImage(path: path, reason: "pref_address 0x\(String(preferredAddress, radix: 16)) is beyond any physical address")
        }
        self.kernelAlignment = bytes.littleEndian(UInt32.self, at: Offset.kernelAlignment)!
        self.initSize = bytes.littleEndian(UInt32.self, at: Offset.initSize)!
        self.isRelocatable = bytes[Offset.relocatable] != 0
    }

    /// The setup header as it is copied into boot_params: from 0x1f1 to the end given by the
    /// jump instruction's offset byte at 0x201.
    public var setupHeader: ArraySlice<UInt8> {
        let end = min(0x202 + Int(bytes[0x201]), bytes.count)
        return bytes[Offset.setupSectors..<end]
    }

    /// The protected-mode kernel: everything after the setup sectors.
    public var protectedModeKernel: ArraySlice<UInt8> {
        bytes[((setupSectors + 1) * 512)...]
    }
}
