import Foundation
import Testing
@testable import Machine

/// A minimal synthetic bzImage: boot sector, setup header, one page of "kernel".
func syntheticBzImage(version: UInt16 = 0x020f, extendedLoadFlags: UInt16 = 0x1, setupSectors: UInt8 = 4) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: (Int(setupSectors) + 1) * 512 + 4096)
    bytes[0x1f1] = setupSectors
    bytes.setLittleEndian(UInt16(0xAA55), at: 0x1fe)
    bytes[0x200] = 0xeb
    bytes[0x201] = 0x6a // setup header ends at 0x26c
    bytes.setLittleEndian(UInt32(0x5372_6448), at: 0x202)
    bytes.setLittleEndian(version, at: 0x206)
    bytes[0x211] = 0x01 // LOADED_HIGH
    bytes.setLittleEndian(UInt32(0x7fff_ffff), at: 0x22c)
    bytes.setLittleEndian(UInt32(0x20_0000), at: 0x230)
    bytes[0x234] = 1
    bytes.setLittleEndian(extendedLoadFlags, at: 0x236)
    bytes.setLittleEndian(UInt32(2047), at: 0x238)
    bytes.setLittleEndian(UInt64(0x100_0000), at: 0x258)
    bytes.setLittleEndian(UInt32(0x80_0000), at: 0x260)
    return bytes
}

@Suite("Linux boot protocol")
struct BootProtocolTests {
    @Test("setup header fields are read from their offsets")
    func parsesHeader() throws {
        let image = try BzImage(bytes: syntheticBzImage(), path: "k")
        #expect(image.protocolVersion == 0x020f)
        #expect(image.setupSectors == 4)
        #expect(image.initrdAddressMax == 0x7fff_ffff)
        #expect(image.commandLineSize == 2047)
        #expect(image.preferredAddress == 0x100_0000)
        #expect(image.initSize == 0x80_0000)
        #expect(image.isRelocatable)
        #expect(image.setupHeader.startIndex == 0x1f1 && image.setupHeader.endIndex == 0x26c)
        #expect(image.protectedModeKernel.startIndex == 5 * 512)
    }

    @Test("zero setup_sects means four")
    func zeroSetupSectors() throws {
        var bytes = syntheticBzImage()
        bytes[0x1f1] = 0
        #expect(try BzImage(bytes: bytes, path: "k").setupSectors == 4)
    }

    @Test("files that are not bzImages are refused, naming the file")
    func refusals() {
        var noMagic = syntheticBzImage()
        noMagic[0x202] = 0
        var noSignature = syntheticBzImage()
        noSignature[0x1fe] = 0
        let cases: [([UInt8], String)] = [
            ([UInt8](repeating: 0x7f, count: 100), "too short"),
            (noMagic, "HdrS"),
            (noSignature, "0xAA55"),
            (syntheticBzImage(version: 0x0206), "2.06"),
            (syntheticBzImage(extendedLoadFlags: 0), "XLF_KERNEL_64"),
        ]
        for (bytes, fragment) in cases {
            #expect {
                try BzImage(bytes: bytes, path: "/tmp/not-a-kernel")
            } throws: { error in
                let text = "\(error)"
                return text.contains("/tmp/not-a-kernel") && text.contains(fragment)
            }
        }
    }

    @Test("a real Debian kernel parses", .enabled(if: debianKernel != nil, "no /boot/vmlinuz-* installed"))
    func debianKernelParses() throws {
        let path = try #require(debianKernel)
        let bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path)))
        let image = try BzImage(bytes: bytes, path: path)
        #expect(image.protocolVersion >= 0x020c)
        #expect(image.commandLineSize >= 255)
    }

    @Test("boot_params carries the header, command line, initrd and e820 map at their offsets")
    func bootParamsLayout() throws {
        let image = try BzImage(bytes: syntheticBzImage(), path: "k")
        var params = BootParams()
        params.copySetupHeader(image.setupHeader)
        params.setCommandLine(at: 0x20000)
        params.setRamdisk(at: 0x1234_5000, size: 0x1000)
        params.setMemoryMap(E820Map(layout: GuestMemoryLayout(ramSize: 512 << 20)))
        let bytes = params.bytes
        #expect(bytes.count == 4096)
        #expect(bytes.littleEndian(UInt32.self, at: 0x202) == 0x5372_6448) // header copied
        #expect(bytes[0x210] == 0xff) // type_of_loader
        #expect(bytes.littleEndian(UInt16.self, at: 0x1fa) == 0xffff)
        #expect(bytes.littleEndian(UInt32.self, at: 0x228) == 0x20000)
        #expect(bytes.littleEndian(UInt32.self, at: 0x218) == 0x1234_5000)
        #expect(bytes.littleEndian(UInt32.self, at: 0x21c) == 0x1000)
        #expect(bytes[0x1e8] == 4)
        // Fourth entry: RAM from 1 MiB to the top.
        #expect(bytes.littleEndian(UInt64.self, at: 0x2d0 + 3 * 20) == 0x100000)
        #expect(bytes.littleEndian(UInt64.self, at: 0x2d0 + 3 * 20 + 8) == (512 << 20) - 0x100000)
        #expect(bytes.littleEndian(UInt32.self, at: 0x2d0 + 3 * 20 + 16) == 1)
    }

    @Test("e820: low RAM, the reserved MP-table and BIOS areas, and RAM above 4 GiB past 3 GiB")
    func e820Layout() {
        let small = E820Map(layout: GuestMemoryLayout(ramSize: 512 << 20))
        #expect(small.entries == [
            .init(address: 0, size: 0x9fc00, kind: .ram),
            .init(address: 0x9fc00, size: 0x400, kind: .reserved),
            .init(address: 0xf0000, size: 0x10000, kind: .reserved),
            .init(address: 0x100000, size: (512 << 20) - 0x100000, kind: .ram),
        ])
        let large = E820Map(layout: GuestMemoryLayout(ramSize: 5 << 30))
        #expect(large.entries.last == .init(address: 4 << 30, size: 2 << 30, kind: .ram))
        #expect(large.entries[3] == .init(address: 0x100000, size: (3 << 30) - 0x100000, kind: .ram))
    }

    @Test("guest addresses map to host offsets only inside one region")
    func memoryLayout() {
        let layout = GuestMemoryLayout(ramSize: 5 << 30)
        #expect(layout.regions.count == 2)
        #expect(layout.hostOffset(of: 0x1000, length: 16) == 0x1000)
        #expect(layout.hostOffset(of: GuestAddress(4 << 30), length: 16) == 3 << 30)
        #expect(layout.hostOffset(of: GuestAddress(3 << 30), length: 1) == nil) // the hole
        #expect(layout.hostOffset(of: GuestAddress((3 << 30) - 8), length: 16) == nil) // runs into the hole
        #expect(layout.hostOffset(of: GuestAddress((6 << 30) - 8), length: 16) == nil) // past the end
        #expect(layout.hostOffset(of: GuestAddress(UInt64.max - 4), length: 16) == nil) // overflow
    }

    @Test("the user's -append follows tern's defaults")
    func commandLineMerging() {
        let merged = KernelCommandLine.merge(userArguments: "  console=tty0   quiet ")
        #expect(merged.hasPrefix("console=ttyS0 "))
        #expect(merged.hasSuffix(" console=tty0 quiet"))
        #expect(!merged.contains("  "))
        #expect(KernelCommandLine.merge(userArguments: nil) == KernelCommandLine.defaults.joined(separator: " "))
    }

    @Test("the MP table has valid checksums and one processor entry per vCPU")
    func multiprocessorTable() {
        let table = MultiprocessorTable(cpuCount: 3, base: 0x9fc00)
        let bytes = table.bytes
        #expect(Array(bytes[0..<4]) == Array("_MP_".utf8))
        #expect(bytes[0..<16].reduce(UInt8(0), &+) == 0)
        #expect(bytes.littleEndian(UInt32.self, at: 4) == 0x9fc10)
        let configuration = Array(bytes[16...])
        #expect(Array(configuration[0..<4]) == Array("PCMP".utf8))
        let length = Int(configuration.littleEndian(UInt16.self, at: 4)!)
        #expect(length == configuration.count)
        #expect(configuration.reduce(UInt8(0), &+) == 0)
        #expect(bytes.count <= 0x400, "the MP table must fit the reserved KiB")
        var offset = 44
        var processors: [UInt8] = []
        while offset < configuration.count {
            let type = configuration[offset]
            if type == 0 { processors.append(configuration[offset + 1]) }
            offset += type == 0 ? 20 : 8
        }
        #expect(offset == configuration.count)
        #expect(processors == [0, 1, 2])
    }

    @Test("64 vCPUs still fit below the BIOS area")
    func largestMultiprocessorTable() {
        // Past the reserved KiB it runs into 0xa0000-0xf0000, which the e820 map does not offer as RAM.
        #expect(MultiprocessorTable(cpuCount: MachineConfiguration.maximumCPUCount, base: 0x9fc00).bytes.count <= 0xf0000 - 0x9fc00)
    }
}

let debianKernel: String? = {
    let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/boot")) ?? []
    return entries.filter { $0.hasPrefix("vmlinuz-") }.sorted().last.map { "/boot/" + $0 }
}()
