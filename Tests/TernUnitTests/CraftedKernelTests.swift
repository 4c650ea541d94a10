import Testing
@testable import Machine

/// A minimal ELF64 x86-64 executable with the given program headers (type 1 = PT_LOAD).
func syntheticElf(segments: [(physical: UInt64, offset: UInt64, fileSize: UInt64, memorySize: UInt64)],
                  tableOffset: UInt64 = 64, entrySize: UInt16 = 56, fileSize: Int = 8192) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: fileSize)
    bytes[0] = 0x7f; bytes[1] = 0x45; bytes[2] = 0x4c; bytes[3] = 0x46
    bytes[4] = 2; bytes[5] = 1
    bytes.setLittleEndian(UInt16(0x3e), at: 18)
    bytes.setLittleEndian(UInt64(0x100_0000), at: 24)
    bytes.setLittleEndian(tableOffset, at: 32)
    bytes.setLittleEndian(entrySize, at: 54)
    bytes.setLittleEndian(UInt16(segments.count), at: 56)
    for (index, segment) in segments.enumerated() {
        let base = Int(tableOffset) + index * Int(entrySize)
        guard base + 48 <= bytes.count else { break }
        bytes.setLittleEndian(UInt32(1), at: base)
        bytes.setLittleEndian(segment.offset, at: base + 8)
        bytes.setLittleEndian(segment.physical, at: base + 24)
        bytes.setLittleEndian(segment.fileSize, at: base + 32)
        bytes.setLittleEndian(segment.memorySize, at: base + 40)
    }
    return bytes
}

/// Kernel files built to break the loaders' arithmetic: each is refused with a reason, never
/// a trap (an overflow in Swift ends the process, which for tern means a lost guest).
@Suite("Crafted kernel files")
struct CraftedKernelTests {
    func refusal(_ bytes: [UInt8]) -> String? {
        do {
            let form = try LoadedKernelForm(bytes: bytes, path: "crafted")
            _ = (form.end, form.entry)
            return nil
        } catch {
            return error.description
        }
    }

    @Test("a well-formed ELF loads")
    func wellFormed() throws {
        let elf = try ElfKernel(bytes: syntheticElf(segments: [(0x100_0000, 4096, 4096, 8192)]), path: "k")
        #expect(elf.end == 0x100_2000)
    }

    @Test("an ELF segment whose addresses wrap around is refused (ElfKernel.end trapped on it)")
    func wrappingSegment() {
        let bytes = syntheticElf(segments: [(0xffff_ffff_ffff_f000, 4096, 4096, 0x2000)])
        #expect(refusal(bytes)?.contains("wrap around") == true)
    }

    @Test("ELF program headers and segments outside the file are refused")
    func outsideTheFile() {
        #expect(refusal(syntheticElf(segments: [(0x100_0000, 4096, 4096, 4096)], tableOffset: 1 << 40))?
            .contains("program header table") == true)
        #expect(refusal(syntheticElf(segments: Array(repeating: (0x100_0000, 0, 16, 16), count: 200)))?
            .contains("program header table") == true)
        #expect(refusal(syntheticElf(segments: [(0x100_0000, .max - 8, 4096, 4096)]))?.contains("outside the file") == true)
        #expect(refusal(syntheticElf(segments: [(0x100_0000, 4096, .max, .max)]))?.contains("outside the file") == true)
        #expect(refusal(syntheticElf(segments: [(0x100_0000, 4096, 4096, 16)]))?.contains("outside the file") == true)
        #expect(refusal(syntheticElf(segments: [(0x100_0000, 0, 0, 0)], entrySize: 8))?.contains("program header") == true)
    }

    @Test("a bzImage whose pref_address is beyond any physical address is refused (its end overflowed)")
    func preferredAddressOverflow() {
        var bytes = syntheticBzImage()
        bytes.setLittleEndian(UInt64.max - 0x100, at: 0x258)
        #expect(refusal(bytes)?.contains("pref_address") == true)
    }

    @Test("a bzImage payload field pointing outside the file is not followed")
    func payloadOutside() {
        for (offset, length) in [(UInt32.max, UInt32(64)), (0, UInt32.max), (4000, 200), (0, 3)] {
            var bytes = syntheticBzImage()
            bytes.setLittleEndian(offset, at: 0x248)
            bytes.setLittleEndian(length, at: 0x24c)
            // Not an xz payload tern can follow: the kernel is loaded to decompress itself.
            #expect(refusal(bytes) == nil)
        }
    }

    @Test("2,000 randomly corrupted ELF and bzImage headers never trap")
    func randomCorruption() {
        var generator = SystemRandomNumberGenerator()
        let seed = UInt64.random(in: 1...UInt64.max, using: &generator)
        var random = SplitMix64(seed: seed)
        let elf = syntheticElf(segments: [(0x100_0000, 4096, 4096, 8192), (0x200_0000, 0, 64, 64)])
        let bz = syntheticBzImage()
        var refused = 0
        for trial in 0..<2000 {
            var bytes = trial % 2 == 0 ? elf : bz
            let limit = trial % 2 == 0 ? 64 + 2 * 56 : 0x270
            for _ in 0..<(1 + Int(random.next() % 8)) {
                let at = Int(random.next() % UInt64(limit))
                bytes[at] = UInt8(truncatingIfNeeded: random.next())
            }
            if refusal(bytes) != nil { refused += 1 }
        }
        print("crafted headers: seed \(seed), \(refused) of 2000 refused, the rest loadable")
        #expect(refused > 0)
    }
}

/// A small, seedable generator, so a failing corruption can be replayed from its seed.
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9e37_79b9_7f4a_7c15
        var z = state
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        return z ^ (z >> 31)
    }
}
