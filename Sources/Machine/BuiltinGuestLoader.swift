import Foundation
/// Loads tern's built-in test guest (guest/tern-guest.S) and checks its header.
///
/// Image header, at the start of the flat image (guest/README.md has the whole layout):
/// `0x00` multiboot v1 header (for QEMU's `-kernel`), `0x20` the ASCII magic `TERNGST1`,
/// `0x28` u64 guest-physical address of the 64-bit entry, `0x30` u64 image format version.
public enum BuiltinGuestLoader {
    public static let loadAddress: GuestAddress = 0x100000
    public static let magic = Array("TERNGST1".utf8)
    public static let formatVersion: UInt64 = 1
    /// The image must end before the guest's own data areas (stacks at 0x180000).
    public static let maximumImageSize = 0x80000
    /// The guest's control block (guest/README.md's memory map), which it expects to find
    /// zero: cleared on every load, because after a reset RAM holds what the guest left there
    /// (a stale "ready" or "filled" count would let its vCPUs start before the boot CPU).
    static let controlBlock: GuestAddress = 0x1C0000
    static let controlBlockSize = 0x1000

    /// Whether the file starts as a built-in guest image does (the TERNGST1 magic at 0x20):
    /// the header only, for callers that only need to know.
    public static func isImageFile(at path: String) -> Bool {
        guard let handle = FileHandle(forReadingAtPath: path) else { return false }
        defer { try? handle.close() }
        guard let head = try? handle.read(upToCount: 0x28), head.count == 0x28 else { return false }
        return Array(head[0x20..<0x28]) == magic
    }

    /// The file's bytes when it is a built-in guest image (the magic, and no larger than an
    /// image can be); nil for anything else, such as a Linux kernel.
    public static func imageFile(at path: String) -> [UInt8]? {
        guard isImageFile(at: path), let handle = FileHandle(forReadingAtPath: path) else { return nil }
        defer { try? handle.close() }
        guard let size = try? handle.seekToEnd(), size <= UInt64(maximumImageSize) else { return nil }
        try? handle.seek(toOffset: 0)
        guard let data = try? handle.readToEnd() else { return nil }
        return Array(data)
    }

    /// The 64-bit entry point named in an image header, after checking the header.
    public static func entryPoint(of image: [UInt8]) throws(MachineError) -> GuestAddress {
        guard image.count >= 0x38, image.count <= maximumImageSize else {
            throw .builtinGuest(reason: "the image is \(image.count) bytes; expected 56 to \(maximumImageSize)")
        }
        guard Array(image[0x20..<0x28]) == magic else {
            throw .builtinGuest(reason: "no TERNGST1 magic at offset 0x20")
        }
        let version = image.littleEndian(UInt64.self, at: 0x30)!
        guard version == formatVersion else {
            throw .builtinGuest(reason: "image format version \(version); this tern reads version \(formatVersion)")
        }
        let entry = image.littleEndian(UInt64.self, at: 0x28)!
        let start = loadAddress.rawValue
        guard entry >= start, entry < start + UInt64(image.count) else {
            throw .builtinGuest(reason: "entry point 0x\(String(entry, radix: 16)) lies outside the image")
        }
        return GuestAddress(entry)
    }

    /// Writes the image, a zero page with the command line and e820 map, and returns the plan:
    /// every vCPU enters at the 64-bit entry.
    public static func load(image: [UInt8]? = nil, arguments: String,
                            into memory: GuestMemory) throws(MachineError) -> BootPlan {
        let image = image ?? BuiltinGuestImage.bytes
        let entry = try entryPoint(of: image)
        guard arguments.utf8.count < BootAddresses.commandLineLimit else {
            throw .commandLineTooLong(length: arguments.utf8.count, maximum: BootAddresses.commandLineLimit - 1)
        }
        var params = BootParams()
        params.setCommandLine(at: BootAddresses.commandLine)
        params.setMemoryMap(E820Map(layout: memory.layout))
        do {
            try memory.write(image, at: loadAddress)
            try memory.write([UInt8](repeating: 0, count: controlBlockSize), at: controlBlock)
            try memory.write(Array(arguments.utf8) + [0], at: BootAddresses.commandLine)
            try memory.write(params.bytes, at: BootAddresses.bootParams)
        } catch {
            throw .memory(error)
        }
        return BootPlan(entry: entry, bootParams: BootAddresses.bootParams, startsAllCPUs: true,
                        commandLine: arguments)
    }
}

extension BuiltinGuestLoader {
    /// The built-in guest's bytes, as `tern guest-image` writes them.
    public static var image: [UInt8] { BuiltinGuestImage.bytes }
}
