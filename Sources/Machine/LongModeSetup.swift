import CKVM

/// Puts a vCPU straight into 64-bit long mode, as the Linux 64-bit boot protocol requires and
/// as the built-in guest expects: a flat GDT, an identity map of the first 4 GiB with 2 MiB
/// pages, and CR0/CR4/EFER set for paging in long mode.
///
/// This host's paravirtual KVM cannot run 32-bit protected or real mode (measured: the vCPU
/// never leaves KVM_RUN), so tern never starts a guest anywhere but in long mode.
public enum LongModeSetup {
    public static let gdtAddress: GuestAddress = 0x500
    public static let pml4Address: GuestAddress = 0x9000
    public static let pdptAddress: GuestAddress = 0xa000
    /// Four page directories, one per GiB.
    public static let pageDirectoryAddress: GuestAddress = 0xb000
    public static let identityMappedGiB = 4

    /// Selectors the Linux boot protocol names: __BOOT_CS and __BOOT_DS.
    public static let codeSelector: UInt16 = 0x10
    public static let dataSelector: UInt16 = 0x18
    public static let taskSelector: UInt16 = 0x20

    /// GDT descriptors: null, null, 64-bit code, data, 32-bit TSS (for TR).
    public static let gdtEntries: [UInt64] = [
        0,
        0,
        0x00AF_9B00_0000_FFFF, // code: present, DPL 0, execute/read, accessed, L=1, G=1
        0x00CF_9300_0000_FFFF, // data: present, DPL 0, read/write, accessed, D/B=1, G=1
        0x008F_8B00_0000_FFFF, // busy TSS, so that TR is valid for VM entry
    ]

    // Page-table entry bits. U/S is set everywhere so the built-in guest's CPL 3 code may run
    // on this map; Linux replaces the map with its own before it runs anything at CPL 3.
    static let present: UInt64 = 1 << 0
    static let writable: UInt64 = 1 << 1
    static let user: UInt64 = 1 << 2
    static let largePage: UInt64 = 1 << 7

    /// Writes the GDT and page tables into guest memory.
    public static func writeTables(into memory: GuestMemory) throws(GuestMemoryError) {
        for (i, entry) in gdtEntries.enumerated() {
            try memory.store(entry, at: gdtAddress + UInt64(i * 8))
        }
        let tableFlags = present | writable | user
        try memory.store(pdptAddress.rawValue | tableFlags, at: pml4Address)
        for gib in 0..<identityMappedGiB {
            let directory = pageDirectoryAddress + UInt64(gib * 0x1000)
            try memory.store(directory.rawValue | tableFlags, at: pdptAddress + UInt64(gib * 8))
            for entry in 0..<512 {
                let address = UInt64(gib) << 30 | UInt64(entry) << 21
                try memory.store(address | tableFlags | largePage, at: directory + UInt64(entry * 8))
            }
        }
    }

    static func segment(selector: UInt16, type: UInt8, code: Bool) -> kvm_segment {
        var segment = kvm_segment()
        segment.base = 0
        segment.limit = 0xffff_ffff
        segment.selector = selector
        segment.type = type
        segment.present = 1
        segment.dpl = 0
        segment.db = code ? 0 : 1
        segment.s = 1
        segment.l = code ? 1 : 0
        segment.g = 1
        return segment
    }

    /// Special registers for 64-bit mode on the tables `writeTables` wrote, on top of the
    /// vCPU's reset values (which keep KVM's APIC base and other fields it owns).
    public static func specialRegisters(from reset: kvm_sregs) -> kvm_sregs {
        var sregs = reset
        let code = segment(selector: codeSelector, type: 0xb, code: true)
        let data = segment(selector: dataSelector, type: 0x3, code: false)
        sregs.cs = code
        sregs.ds = data
        sregs.es = data
        sregs.fs = data
        sregs.gs = data
        sregs.ss = data
        var task = kvm_segment()
        task.selector = taskSelector
        task.limit = 0xfffff
        task.type = 0xb
        task.present = 1
        sregs.tr = task
        sregs.gdt.base = gdtAddress.rawValue
        sregs.gdt.limit = UInt16(gdtEntries.count * 8 - 1)
        sregs.idt.base = 0
        sregs.idt.limit = 0
        sregs.cr0 = 0x8005_0033 // PG | AM | WP | NE | ET | MP | PE
        sregs.cr3 = pml4Address.rawValue
        sregs.cr4 = 0x20 // PAE
        sregs.efer = 0x500 // LME | LMA
        return sregs
    }

    /// General registers for entry at `entry` with interrupts off.
    public static func registers(entry: GuestAddress, rsi: UInt64, rdi: UInt64 = 0, rdx: UInt64 = 0) -> kvm_regs {
        var regs = kvm_regs()
        regs.rip = entry.rawValue
        regs.rflags = 0x2
        regs.rsi = rsi
        regs.rdi = rdi
        regs.rdx = rdx
        return regs
    }

    /// x87 and SSE control words as after FNINIT and reset.
    public static func floatingPointState() -> kvm_fpu {
        var fpu = kvm_fpu()
        fpu.fcw = 0x37f
        fpu.mxcsr = 0x1f80
        return fpu
    }
}
