import KVM
import Testing
@testable import Machine

@Suite("Machine set-up")
struct MachineSetupTests {
    static let hostLike: [CPUIDEntry] = [
        CPUIDEntry(function: 0x1, eax: 0xc06f2, ebx: 0x0002_0800, ecx: 0x0120_2000, edx: 0x0f8b_fbff),
        CPUIDEntry(function: 0xb, index: 0, flags: 1, eax: 1, ebx: 2, ecx: 0x100, edx: 7),
        CPUIDEntry(function: 0xb, index: 1, flags: 1, eax: 4, ebx: 16, ecx: 0x201, edx: 7),
        CPUIDEntry(function: 0x8000_0007, edx: 0x100),
    ]

    @Test("each vCPU reports its own APIC id and the machine's topology")
    func cpuidTopology() throws {
        let template = CPUIDTemplate(supported: Self.hostLike, cpuCount: 4, exposeInvariantTSC: false)
        let third = template.entries(forCPU: 2)
        let leaf1 = try #require(third.first { $0.function == 1 })
        #expect(leaf1.ebx >> 24 == 2)
        #expect((leaf1.ebx >> 16) & 0xff == 4)
        #expect(leaf1.ecx & (1 << 31) != 0)
        let core = try #require(third.first { $0.function == 0xb && $0.index == 1 })
        #expect(core.eax == 2 && core.ebx == 4 && core.edx == 2)
        let thread = try #require(third.first { $0.function == 0xb && $0.index == 0 })
        #expect(thread.ebx == 1 && thread.edx == 2)
    }

    @Test("the invariant TSC is hidden unless -cpu host,+invtsc")
    func invariantTSC() {
        func invtsc(_ expose: Bool) -> Bool {
            let entries = CPUIDTemplate(supported: Self.hostLike, cpuCount: 1, exposeInvariantTSC: expose).entries(forCPU: 0)
            return entries.contains { $0.function == 0x8000_0007 && $0.edx & 0x100 != 0 }
        }
        #expect(!invtsc(false))
        #expect(invtsc(true))
    }

    @Test("the built-in guest image has a valid header with its entry inside the image")
    func builtinGuestHeader() throws {
        let image = BuiltinGuestLoader.image
        let entry = try BuiltinGuestLoader.entryPoint(of: image)
        #expect(entry.rawValue > BuiltinGuestLoader.loadAddress.rawValue)
        // Multiboot v1 header for QEMU: magic, flags with the a.out kludge, checksum.
        let magic = image.littleEndian(UInt32.self, at: 0)!
        let flags = image.littleEndian(UInt32.self, at: 4)!
        let checksum = image.littleEndian(UInt32.self, at: 8)!
        #expect(magic == 0x1BAD_B002)
        #expect(flags & (1 << 16) != 0)
        #expect(magic &+ flags &+ checksum == 0)
    }

    @Test("corrupt built-in guest headers are refused")
    func builtinGuestRefusals() throws {
        let good = BuiltinGuestLoader.image
        var badMagic = good
        badMagic[0x20] = 0
        var badVersion = good
        badVersion.setLittleEndian(UInt64(99), at: 0x30)
        var badEntry = good
        badEntry.setLittleEndian(UInt64(0x10), at: 0x28)
        for image in [badMagic, badVersion, badEntry, [UInt8](repeating: 0, count: 8)] {
            #expect(throws: MachineError.self) { try BuiltinGuestLoader.entryPoint(of: image) }
        }
    }

    @Test("ELF kernels: segments are checked against the file")
    func elfChecks() throws {
        var elf = [UInt8](repeating: 0, count: 64 + 56 + 16)
        elf.replaceSubrange(0..<4, with: [0x7f, 0x45, 0x4c, 0x46])
        elf[4] = 2
        elf[5] = 1
        elf.setLittleEndian(UInt16(0x3e), at: 18)
        elf.setLittleEndian(UInt64(0x100_0000), at: 24)
        elf.setLittleEndian(UInt64(64), at: 32)
        elf.setLittleEndian(UInt16(56), at: 54)
        elf.setLittleEndian(UInt16(1), at: 56)
        elf.setLittleEndian(UInt32(1), at: 64)
        elf.setLittleEndian(UInt64(120), at: 64 + 8)
        elf.setLittleEndian(UInt64(0x100_0000), at: 64 + 24)
        elf.setLittleEndian(UInt64(16), at: 64 + 32)
        elf.setLittleEndian(UInt64(4096), at: 64 + 40)
        let kernel = try ElfKernel(bytes: elf, path: "v")
        #expect(kernel.entry == 0x100_0000)
        #expect(kernel.end == 0x100_1000)
        var outside = elf
        outside.setLittleEndian(UInt64(1 << 40), at: 64 + 32)
        outside.setLittleEndian(UInt64(1 << 40), at: 64 + 40)
        #expect(throws: KernelImageError.self) { try ElfKernel(bytes: outside, path: "v") }
        var wrongMachine = elf
        wrongMachine.setLittleEndian(UInt16(0xb7), at: 18)
        #expect(throws: KernelImageError.self) { try ElfKernel(bytes: wrongMachine, path: "v") }
    }
}
