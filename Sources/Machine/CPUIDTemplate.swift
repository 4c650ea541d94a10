import KVM

/// Turns the host's supported CPUID set into what one vCPU of this machine reports: its APIC
/// id, the topology (one thread per core, all cores in one package), the hypervisor bit, and
/// the invariant TSC only when the user asked for it (it blocks migration, as in QEMU).
public struct CPUIDTemplate: Sendable {
    public var supported: [CPUIDEntry]
    public var cpuCount: Int
    public var exposeInvariantTSC: Bool

    public init(supported: [CPUIDEntry], cpuCount: Int, exposeInvariantTSC: Bool) {
        self.supported = supported
        self.cpuCount = cpuCount
        self.exposeInvariantTSC = exposeInvariantTSC
    }

    /// Bits needed to number `cpuCount` cores.
    var coreIDBits: UInt32 {
        var bits: UInt32 = 0
        while (1 << bits) < cpuCount { bits += 1 }
        return bits
    }

    public func entries(forCPU index: Int) -> [CPUIDEntry] {
        let apicID = UInt32(index)
        let count = UInt32(cpuCount)
        return supported.map { original in
            var entry = original
            switch entry.function {
            case 0x1:
                entry.ebx = (entry.ebx & 0x0000_ffff) | (apicID << 24) | (min(count, 255) << 16)
                entry.ecx |= 1 << 31 // running under a hypervisor
                if cpuCount > 1 { entry.edx |= 1 << 28 } else { entry.edx &= ~(1 << 28) }
            case 0x4:
                // Cores per package - 1 in bits 31:26; one thread shares each cache level below L3.
                entry.eax = (entry.eax & 0x3fff) | ((count - 1) << 26)
                if entry.eax & 0x1f != 0 {
                    let level = (entry.eax >> 5) & 0x7
                    let sharing: UInt32 = level >= 3 ? count - 1 : 0
                    entry.eax = (entry.eax & ~(0xfff << 14)) | (sharing << 14)
                }
            case 0xb, 0x1f:
                entry.edx = apicID
                switch entry.index {
                case 0: // SMT level: one thread per core
                    entry.eax = 0
                    entry.ebx = 1
                    entry.ecx = 1 << 8 | entry.index
                case 1: // core level
                    entry.eax = coreIDBits
                    entry.ebx = count
                    entry.ecx = 2 << 8 | entry.index
                default:
                    entry.eax = 0
                    entry.ebx = 0
                    entry.ecx = entry.index
                }
            case 0x8000_0007:
                if !exposeInvariantTSC { entry.edx &= ~(1 << 8) }
            default:
                break
            }
            return entry
        }
    }

    /// Whether the host can offer the invariant TSC at all.
    public var hostHasInvariantTSC: Bool {
        supported.contains { $0.function == 0x8000_0007 && $0.edx & (1 << 8) != 0 }
    }
}
