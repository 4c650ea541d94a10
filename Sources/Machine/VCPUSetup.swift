import CKVM
import KVM

/// Brings a freshly created vCPU to its power-on state for this machine.
///
/// KVM's ordering rules, obeyed here: KVM_SET_CPUID2 before the first KVM_RUN; the LAPIC is
/// set after CPUID (which can change its version); registers last.
enum VCPUSetup {
    /// IA32_MISC_ENABLE, with fast string operations on as firmware leaves it.
    static let miscellaneousEnableMSR: UInt32 = 0x1a0

    // LAPIC register offsets and the delivery modes of LINT0/LINT1 for virtual-wire mode.
    static let localVectorTable0 = 0x350
    static let localVectorTable1 = 0x360
    static let deliveryModeExternalInterrupt: UInt32 = 0x7 << 8
    static let deliveryModeNMI: UInt32 = 0x4 << 8

    static func configure(_ vcpu: VCPU, index: Int, cpuid: CPUIDTemplate, plan: BootPlan, cpuCount: Int) throws(KVMError) {
        try vcpu.setCPUID(cpuid.entries(forCPU: index))
        try reset(vcpu, index: index, plan: plan, cpuCount: cpuCount)
    }

    /// Everything but CPUID, which KVM refuses to change once the vCPU has run: also what a
    /// machine reset redoes.
    static func reset(_ vcpu: VCPU, index: Int, plan: BootPlan, cpuCount: Int) throws(KVMError) {
        try vcpu.setModelSpecificRegisters([(miscellaneousEnableMSR, 1)])

        // LINT0 delivers the 8259's ExtINT and LINT1 NMIs, so the PIC works before the guest
        // programs the IOAPIC (what firmware does on a PC).
        var lapic = try vcpu.localAPICState()
        withUnsafeMutableBytes(of: &lapic.regs) { registers in
            func update(_ offset: Int, mode: UInt32) {
                var value = registers.loadUnaligned(fromByteOffset: offset, as: UInt32.self)
                value = (value & ~0x700 & ~(1 << 16)) | mode // delivery mode, unmasked
                registers.storeBytes(of: value, toByteOffset: offset, as: UInt32.self)
            }
            update(localVectorTable0, mode: deliveryModeExternalInterrupt)
            update(localVectorTable1, mode: deliveryModeNMI)
        }
        try vcpu.setLocalAPICState(lapic)

        let isBoot = index == 0
        guard isBoot || plan.startsAllCPUs else {
            return // an application processor waits for INIT/SIPI from the guest
        }
        try vcpu.setSpecialRegisters(LongModeSetup.specialRegisters(from: try vcpu.specialRegisters()))
        try vcpu.setFloatingPointState(LongModeSetup.floatingPointState())
        try vcpu.setRegisters(LongModeSetup.registers(
            entry: plan.entry, rsi: plan.bootParams.rawValue, rdi: UInt64(index), rdx: UInt64(cpuCount)))
        if !isBoot {
            try vcpu.setMultiprocessingState(UInt32(KVM_MP_STATE_RUNNABLE))
        }
    }
}
