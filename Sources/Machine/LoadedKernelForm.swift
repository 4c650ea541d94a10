/// The form in which tern puts a Linux kernel into guest memory, chosen from the file given
/// with `-kernel`:
/// - an ELF `vmlinux`: its segments at their physical addresses, entered at its ELF entry;
/// - a bzImage whose payload tern can decompress (xz, as Debian's kernels are): the payload's
///   `vmlinux` the same way, with the bzImage's own setup header in boot_params;
/// - any other bzImage: its protected-mode code at the preferred address, entered at
///   `startup_64` (load address + 0x200), and the kernel decompresses itself.
enum LoadedKernelForm {
    case elf(ElfKernel, header: ArraySlice<UInt8>, commandLineSize: UInt32, initrdAddressMax: UInt32)
    case selfDecompressing(BzImage, loadAddress: UInt64)

    init(bytes: [UInt8], path: String) throws(KernelImageError) {
        if ElfKernel.isElf(bytes) {
            let elf = try ElfKernel(bytes: bytes, path: path)
            self = .elf(elf, header: ArraySlice(Self.syntheticSetupHeader), commandLineSize: 2047,
                        initrdAddressMax: 0x7fff_ffff)
            return
        }
        let image = try BzImage(bytes: bytes, path: path)
        if let payload = try KernelPayload.decompressedVmlinux(of: image, path: path) {
            let elf = try ElfKernel(bytes: payload, path: path)
            self = .elf(elf, header: image.setupHeader, commandLineSize: image.commandLineSize,
                        initrdAddressMax: image.initrdAddressMax)
            return
        }
        self = .selfDecompressing(image, loadAddress: max(image.preferredAddress, 0x100000))
    }

    /// A setup header for an ELF kernel that came without one: the fields Linux checks.
    static let syntheticSetupHeader: [UInt8] = {
        var header = [UInt8](repeating: 0, count: 0x26c - 0x1f1)
        func at(_ offset: Int) -> Int { offset - 0x1f1 }
        header.setLittleEndian(UInt16(0xAA55), at: at(0x1fe))
        header.setLittleEndian(UInt32(0x5372_6448), at: at(0x202))
        header.setLittleEndian(UInt16(0x020f), at: at(0x206))
        header[at(0x211)] = 0x01 // LOADED_HIGH
        header.setLittleEndian(UInt32(0x100_0000), at: at(0x230))
        header.setLittleEndian(UInt32(2047), at: at(0x238))
        return header
    }()

    var entry: GuestAddress {
        switch self {
        case let .elf(elf, _, _, _): GuestAddress(elf.entry)
        case let .selfDecompressing(_, loadAddress): GuestAddress(loadAddress + 0x200)
        }
    }

    var end: UInt64 {
        switch self {
        case let .elf(elf, _, _, _): elf.end
        case let .selfDecompressing(image, loadAddress):
            loadAddress + max(UInt64(image.protectedModeKernel.count), UInt64(image.initSize))
        }
    }

    var setupHeader: ArraySlice<UInt8> {
        switch self {
        case let .elf(_, header, _, _): header
        case let .selfDecompressing(image, _): image.setupHeader
        }
    }

    var commandLineSize: UInt32 {
        switch self {
        case let .elf(_, _, size, _): size
        case let .selfDecompressing(image, _): image.commandLineSize
        }
    }

    var initrdAddressMax: UInt32 {
        switch self {
        case let .elf(_, _, _, maximum): maximum
        case let .selfDecompressing(image, _): image.initrdAddressMax
        }
    }

    func load(into memory: GuestMemory) throws(GuestMemoryError) {
        switch self {
        case let .elf(elf, _, _, _):
            try elf.load(into: memory)
        case let .selfDecompressing(image, loadAddress):
            try memory.write(Array(image.protectedModeKernel), at: GuestAddress(loadAddress))
        }
    }
}
