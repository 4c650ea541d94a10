/// An uncompressed x86-64 Linux kernel (`vmlinux`) as an ELF64 executable: the loadable
/// segments with their physical addresses, and the physical entry point (`startup_64`).
///
/// tern boots a bzImage by decompressing its payload to this form on the host (see
/// `KernelPayload`), which spares the guest its own decompressor — on this host's paravirtual
/// KVM that decompressor alone runs for minutes, since each of its stores at CPL 0 traps.
public struct ElfKernel: Sendable {
    public struct Segment: Sendable, Equatable {
        public var physicalAddress: UInt64
        public var fileOffset: Int
        public var fileSize: Int
        public var memorySize: UInt64
    }

    public let bytes: [UInt8]
    public let entry: UInt64
    public let segments: [Segment]

    static let loadableSegment: UInt32 = 1

    public static func isElf(_ bytes: [UInt8]) -> Bool {
        bytes.count >= 4 && bytes[0] == 0x7f && bytes[1] == 0x45 && bytes[2] == 0x4c && bytes[3] == 0x46
    }

    /// Parses and checks every field it uses against the file's size.
    public init(bytes: [UInt8], path: String) throws(KernelImageError) {
        func refuse(_ reason: String) -> KernelImageError { .notBzImage(path: path, reason: "ELF kernel: \(reason)") }
        guard Self.isElf(bytes), bytes.count >= 64 else { throw refuse("no ELF header") }
        guard bytes[4] == 2, bytes[5] == 1 else { throw refuse("not a little-endian 64-bit ELF file") }
        guard bytes.littleEndian(UInt16.self, at: 18) == 0x3e else { throw refuse("not an x86-64 executable") }
        let entry = bytes.littleEndian(UInt64.self, at: 24)!
        let tableOffset = bytes.littleEndian(UInt64.self, at: 32)!
        let entrySize = Int(bytes.littleEndian(UInt16.self, at: 54)!)
        let count = Int(bytes.littleEndian(UInt16.self, at: 56)!)
        guard entrySize >= 56, tableOffset < UInt64(bytes.count),
              Int(tableOffset) + count * entrySize <= bytes.count else {
            throw refuse("the program header table lies outside the file")
        }
        var segments: [Segment] = []
        for index in 0..<count {
            let base = Int(tableOffset) + index * entrySize
            guard bytes.littleEndian(UInt32.self, at: base) == Self.loadableSegment else { continue }
            let offset = bytes.littleEndian(UInt64.self, at: base + 8)!
            let physical = bytes.littleEndian(UInt64.self, at: base + 24)!
            let fileSize = bytes.littleEndian(UInt64.self, at: base + 32)!
            let memorySize = bytes.littleEndian(UInt64.self, at: base + 40)!
            guard offset <= UInt64(bytes.count), fileSize <= UInt64(bytes.count) - offset, fileSize <= memorySize else {
                throw refuse("segment \(index) lies outside the file")
            }
            guard !physical.addingReportingOverflow(memorySize).overflow else {
                throw refuse("segment \(index)'s addresses wrap around (0x\(String(physical, radix: 16)) + 0x\(String(memorySize, radix: 16)))")
            }
            segments.append(Segment(physicalAddress: physical, fileOffset: Int(offset), fileSize: Int(fileSize),
                                    memorySize: memorySize))
        }
        guard !segments.isEmpty else { throw refuse("no loadable segment") }
        self.bytes = bytes
        self.entry = entry
        self.segments = segments
    }

    /// The highest physical address any segment occupies (`init` refused segments that wrap).
    public var end: UInt64 {
        segments.map { $0.physicalAddress + $0.memorySize }.max() ?? 0
    }

    /// Copies every segment to its physical address and zeroes the rest of it (bss): after a
    /// reset, guest memory still holds what the guest left there.
    public func load(into memory: GuestMemory) throws(GuestMemoryError) {
        for segment in segments {
            let destination = try memory.pointer(at: GuestAddress(segment.physicalAddress), length: segment.memorySize,
                                                 forWriting: true)
            bytes.withUnsafeBytes { source in
                destination.copyMemory(from: source.baseAddress! + segment.fileOffset, byteCount: segment.fileSize)
            }
            (destination + segment.fileSize).initializeMemory(as: UInt8.self, repeating: 0,
                                                              count: Int(segment.memorySize) - segment.fileSize)
        }
    }
}
