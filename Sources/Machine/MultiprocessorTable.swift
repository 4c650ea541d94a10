/// The Intel MultiProcessor Specification 1.4 tables: a floating pointer structure and a
/// configuration table listing the CPUs, the ISA bus, the IOAPIC and how ISA interrupts reach
/// it. With `acpi=off` this is how Linux finds the application processors to start.
public struct MultiprocessorTable: Sendable {
    public static let localAPICAddress: UInt32 = 0xfee0_0000
    public static let ioAPICAddress: UInt32 = 0xfec0_0000
    static let apicVersion: UInt8 = 0x14
    static let ioAPICVersion: UInt8 = 0x11

    /// The floating pointer followed by the configuration table, ready to copy to `base`.
    public let bytes: [UInt8]

    public init(cpuCount: Int, base: GuestAddress) {
        let ioAPICID = UInt8(cpuCount)
        var entries: [[UInt8]] = []
        for cpu in 0..<cpuCount {
            var processor = [UInt8](repeating: 0, count: 20)
            processor[0] = 0 // processor entry
            processor[1] = UInt8(cpu) // local APIC id
            processor[2] = Self.apicVersion
            processor[3] = cpu == 0 ? 0x3 : 0x1 // enabled, and BSP for CPU 0
            processor.setLittleEndian(UInt32(0x600), at: 4) // family 6
            processor.setLittleEndian(UInt32(0x201), at: 8) // FPU, APIC
            entries.append(processor)
        }
        entries.append([1, 0] + Array("ISA   ".utf8)) // bus 0 is ISA
        var ioAPIC: [UInt8] = [2, ioAPICID, Self.ioAPICVersion, 1, 0, 0, 0, 0]
        ioAPIC.setLittleEndian(Self.ioAPICAddress, at: 4)
        entries.append(ioAPIC)
        // ISA interrupts: the 8259 cascade on pin 0, the timer (IRQ 0) on pin 2 as KVM routes
        // GSI 0, every other IRQ on the pin of its number (IRQ 2 is the cascade itself).
        entries.append([3, 3, 0, 0, 0, 0, ioAPICID, 0])
        for irq in UInt8(0)..<16 where irq != 2 {
            entries.append([3, 0, 0, 0, 0, irq, ioAPICID, irq == 0 ? 2 : irq])
        }
        // Local interrupts: LINT0 is ExtINT (virtual wire), LINT1 is NMI, on every CPU.
        entries.append([4, 3, 0, 0, 0, 0, 0xff, 0])
        entries.append([4, 1, 0, 0, 0, 0, 0xff, 1])

        let tableAddress = UInt32(base.rawValue) + 16
        var table = [UInt8](repeating: 0, count: 44)
        table.replaceSubrange(0..<4, with: Array("PCMP".utf8))
        table[6] = 4 // spec revision 1.4
        table.replaceSubrange(8..<16, with: Array("TERN    ".utf8))
        table.replaceSubrange(16..<28, with: Array("KVM MACHINE ".utf8))
        table.setLittleEndian(UInt16(entries.count), at: 34)
        table.setLittleEndian(Self.localAPICAddress, at: 36)
        table += entries.flatMap { $0 }
        table.setLittleEndian(UInt16(table.count), at: 4)
        table[7] = Self.checksum(table)

        var floating = [UInt8](repeating: 0, count: 16)
        floating.replaceSubrange(0..<4, with: Array("_MP_".utf8))
        floating.setLittleEndian(tableAddress, at: 4)
        floating[8] = 1 // length in 16-byte units
        floating[9] = 4 // spec revision 1.4
        floating[10] = Self.checksum(floating)
        bytes = floating + table
    }

    /// The byte that makes the sum of all bytes zero.
    static func checksum(_ bytes: [UInt8]) -> UInt8 {
        let sum = bytes.reduce(UInt8(0), &+)
        return 0 &- sum
    }
}
