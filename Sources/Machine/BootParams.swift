/// The Linux "zero page" (`struct boot_params`, Documentation/arch/x86/zero-page.rst): the
/// 4 KiB block a 64-bit boot loader fills in and passes to the kernel in RSI.
///
/// The built-in guest reads the same page for its command line and e820 map, so both kinds of
/// guest are started the same way.
public struct BootParams: Sendable {
    /// Offsets within boot_params.
    enum Offset {
        static let extendedRamdiskImage = 0x0c0
        static let extendedRamdiskSize = 0x0c4
        static let extendedCommandLinePointer = 0x0c8
        static let e820EntryCount = 0x1e8
        static let setupHeader = 0x1f1
        static let videoMode = 0x1fa
        static let typeOfLoader = 0x210
        static let loadFlags = 0x211
        static let ramdiskImage = 0x218
        static let ramdiskSize = 0x21c
        static let commandLinePointer = 0x228
        static let e820Table = 0x2d0
    }

    /// The most e820 entries boot_params holds.
    public static let maximumE820Entries = 128
    public static let size = 4096

    public private(set) var bytes = [UInt8](repeating: 0, count: BootParams.size)

    public init() {}

    /// Copies the kernel's setup header into place, as the boot protocol requires.
    public mutating func copySetupHeader(_ header: ArraySlice<UInt8>) {
        for (i, byte) in header.enumerated() where Offset.setupHeader + i < BootParams.size {
            bytes[Offset.setupHeader + i] = byte
        }
        bytes.setLittleEndian(UInt16(0xffff), at: Offset.videoMode) // "normal" text mode
        bytes[Offset.typeOfLoader] = 0xff // an undefined boot loader
    }

    public mutating func setCommandLine(at address: GuestAddress) {
        bytes.setLittleEndian(UInt32(truncatingIfNeeded: address.rawValue), at: Offset.commandLinePointer)
        bytes.setLittleEndian(UInt32(truncatingIfNeeded: address.rawValue >> 32), at: Offset.extendedCommandLinePointer)
    }

    public mutating func setRamdisk(at address: GuestAddress, size: UInt64) {
        bytes.setLittleEndian(UInt32(truncatingIfNeeded: address.rawValue), at: Offset.ramdiskImage)
        bytes.setLittleEndian(UInt32(truncatingIfNeeded: size), at: Offset.ramdiskSize)
        bytes.setLittleEndian(UInt32(truncatingIfNeeded: address.rawValue >> 32), at: Offset.extendedRamdiskImage)
        bytes.setLittleEndian(UInt32(truncatingIfNeeded: size >> 32), at: Offset.extendedRamdiskSize)
    }

    public mutating func setMemoryMap(_ map: E820Map) {
        let entries = map.entries.prefix(Self.maximumE820Entries)
        bytes[Offset.e820EntryCount] = UInt8(entries.count)
        for (i, entry) in entries.enumerated() {
            let base = Offset.e820Table + i * 20
            bytes.setLittleEndian(entry.address, at: base)
            bytes.setLittleEndian(entry.size, at: base + 8)
            bytes.setLittleEndian(entry.kind.rawValue, at: base + 16)
        }
    }
}
