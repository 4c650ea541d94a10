import CKVM
import KVM

/// Everything KVM holds for one vCPU, saved and restored in the order KVM needs.
///
/// Saved (on the vCPU's own thread, while paused): MP state first, then registers, special
/// registers, XSAVE, XCRs, LAPIC, debug registers, MSRs, and pending events last. Restored:
/// MP state, registers, special registers, XSAVE, XCRs, debug registers, LAPIC, MSRs (the TSC
/// among them), events last, so that a pending interrupt lands on a fully set-up CPU.
struct VCPUState {
    static let version: UInt32 = 1

    /// MSRs carried across a migration, when this host's KVM supports them: the TSC, SYSENTER,
    /// the syscall MSRs, the kernel GS base, TSC_AUX, MISC_ENABLE, PAT, the TSC deadline, and
    /// KVM's paravirtual MSRs (kvmclock, async page faults, steal time, PV EOI).
    static let migratedMSRs: [UInt32] = [
        0x10, 0x174, 0x175, 0x176, 0x1a0, 0x277, 0x6e0,
        0xc000_0081, 0xc000_0082, 0xc000_0083, 0xc000_0084, 0xc000_0102, 0xc000_0103,
        0x4b56_4d00, 0x4b56_4d01, 0x4b56_4d02, 0x4b56_4d03, 0x4b56_4d04,
    ]

    var multiprocessingState: UInt32
    var registers: kvm_regs
    var specialRegisters: kvm_sregs
    var extendedState: kvm_xsave
    var extendedControlRegisters: kvm_xcrs
    var localAPIC: kvm_lapic_state
    var debugRegisters: kvm_debugregs
    var modelSpecificRegisters: [(index: UInt32, value: UInt64)]
    var events: kvm_vcpu_events

    static func save(_ vcpu: VCPU, msrIndices: [UInt32]) throws(KVMError) -> VCPUState {
        VCPUState(
            multiprocessingState: try vcpu.multiprocessingState(),
            registers: try vcpu.registers(),
            specialRegisters: try vcpu.specialRegisters(),
            extendedState: try vcpu.extendedState(),
            extendedControlRegisters: try vcpu.extendedControlRegisters(),
            localAPIC: try vcpu.localAPICState(),
            debugRegisters: try vcpu.debugRegisters(),
            modelSpecificRegisters: try vcpu.modelSpecificRegisters(msrIndices),
            events: try vcpu.events())
    }

    func restore(to vcpu: VCPU) throws(KVMError) {
        try vcpu.setMultiprocessingState(multiprocessingState)
        try vcpu.setRegisters(registers)
        try vcpu.setSpecialRegisters(specialRegisters)
        try vcpu.setExtendedState(extendedState)
        try vcpu.setExtendedControlRegisters(extendedControlRegisters)
        try vcpu.setDebugRegisters(debugRegisters)
        try vcpu.setLocalAPICState(localAPIC)
        try vcpu.setModelSpecificRegisters(modelSpecificRegisters)
        try vcpu.setEvents(events)
    }

    func encode(index: Int) -> StateSection {
        var writer = StateWriter()
        writer.append(multiprocessingState)
        writer.appendRaw(registers)
        writer.appendRaw(specialRegisters)
        writer.appendRaw(extendedState)
        writer.appendRaw(extendedControlRegisters)
        writer.appendRaw(localAPIC)
        writer.appendRaw(debugRegisters)
        writer.append(UInt32(modelSpecificRegisters.count))
        for msr in modelSpecificRegisters {
            writer.append(msr.index)
            writer.append(msr.value)
        }
        writer.appendRaw(events)
        return StateSection(name: "cpu/\(index)", version: Self.version, payload: writer.bytes)
    }

    static func decode(_ section: StateSection) throws(StateLoadError) -> VCPUState {
        var reader = try StateReader(section, version: version)
        let mpState = try reader.read(UInt32.self)
        let registers = try reader.readRaw(kvm_regs.self, initial: kvm_regs())
        let sregs = try reader.readRaw(kvm_sregs.self, initial: kvm_sregs())
        let xsave = try reader.readRaw(kvm_xsave.self, initial: kvm_xsave())
        let xcrs = try reader.readRaw(kvm_xcrs.self, initial: kvm_xcrs())
        let lapic = try reader.readRaw(kvm_lapic_state.self, initial: kvm_lapic_state())
        let debug = try reader.readRaw(kvm_debugregs.self, initial: kvm_debugregs())
        let count = Int(try reader.read(UInt32.self))
        guard count <= 256 else { throw StateLoadError("section '\(section.name)' lists \(count) MSRs; at most 256 are accepted") }
        var msrs: [(index: UInt32, value: UInt64)] = []
        for _ in 0..<count {
            let index = try reader.read(UInt32.self)
            msrs.append((index, try reader.read(UInt64.self)))
        }
        let events = try reader.readRaw(kvm_vcpu_events.self, initial: kvm_vcpu_events())
        try reader.finish()
        guard mpState <= 8 else { throw StateLoadError("section '\(section.name)': MP state \(mpState) is not a KVM MP state") }
        return VCPUState(multiprocessingState: mpState, registers: registers, specialRegisters: sregs, extendedState: xsave,
                         extendedControlRegisters: xcrs, localAPIC: lapic, debugRegisters: debug,
                         modelSpecificRegisters: msrs, events: events)
    }
}
