import CKVM
#if canImport(Glibc)
import Glibc
#endif

/// One KVM virtual CPU: its descriptor, its shared `kvm_run` area, and one method per ioctl.
///
/// Threading: `run()` and the state accessors are called only by the thread that owns the vCPU
/// (the machine layer's vCPU thread). The single exception is `requestImmediateExit`, which any
/// thread may call to kick the vCPU out of KVM_RUN.
public final class VCPU: @unchecked Sendable {
    // Sendable: see the threading rule above; kvm_run.immediate_exit is written atomically.
    public let id: UInt32
    public let descriptor: OwnedFileDescriptor
    private let runArea: UnsafeMutableRawPointer
    private let runAreaSize: Int

    init(id: UInt32, descriptor: OwnedFileDescriptor, runArea: UnsafeMutableRawPointer, runAreaSize: Int) {
        self.id = id
        self.descriptor = descriptor
        self.runArea = runArea
        self.runAreaSize = runAreaSize
    }

    deinit {
        munmap(runArea, runAreaSize)
    }

    private var runStructure: UnsafeMutablePointer<kvm_run> { runArea.assumingMemoryBound(to: kvm_run.self) }

    private func ioctl<T>(_ name: String, _ request: UInt, _ value: inout T) throws(KVMError) {
        let fd = descriptor.rawValue
        let result: Int32 = withUnsafeMutablePointer(to: &value) { pointer in
            while true {
                let rc = ckvm_ioctl_pointer(fd, request, pointer)
                if rc >= 0 || errno != EINTR { return rc < 0 ? -errno : rc }
            }
        }
        if result < 0 { throw KVMError(name, errno: -result) }
    }

    // MARK: running

    /// KVM_RUN until the next exit. Returns `.interrupted` when a signal or an immediate-exit
    /// request ended the run early; the caller decides whether to enter again.
    public func run() throws(KVMError) -> VCPUExit {
        let rc = ckvm_ioctl_value(descriptor.rawValue, CKVM_KVM_RUN(), 0)
        if rc < 0 {
            let code = errno
            if code == EINTR || code == EAGAIN { return .interrupted }
            throw KVMError("KVM_RUN", errno: code, detail: "vCPU \(id)")
        }
        return VCPUExit(decoding: runStructure, runArea: runArea)
    }

    /// Sets or clears `kvm_run.immediate_exit`, so the next (or current, with a signal) KVM_RUN
    /// returns EINTR at once. Safe from any thread.
    public func requestImmediateExit(_ enabled: Bool) {
        ckvm_run_set_immediate_exit(runStructure, enabled ? 1 : 0)
    }

    // MARK: registers

    public func registers() throws(KVMError) -> kvm_regs {
        var value = kvm_regs()
        try ioctl("KVM_GET_REGS", CKVM_KVM_GET_REGS(), &value)
        return value
    }

    public func setRegisters(_ registers: kvm_regs) throws(KVMError) {
        var value = registers
        try ioctl("KVM_SET_REGS", CKVM_KVM_SET_REGS(), &value)
    }

    public func specialRegisters() throws(KVMError) -> kvm_sregs {
        var value = kvm_sregs()
        try ioctl("KVM_GET_SREGS", CKVM_KVM_GET_SREGS(), &value)
        return value
    }

    public func setSpecialRegisters(_ registers: kvm_sregs) throws(KVMError) {
        var value = registers
        try ioctl("KVM_SET_SREGS", CKVM_KVM_SET_SREGS(), &value)
    }

    public func floatingPointState() throws(KVMError) -> kvm_fpu {
        var value = kvm_fpu()
        try ioctl("KVM_GET_FPU", CKVM_KVM_GET_FPU(), &value)
        return value
    }

    public func setFloatingPointState(_ state: kvm_fpu) throws(KVMError) {
        var value = state
        try ioctl("KVM_SET_FPU", CKVM_KVM_SET_FPU(), &value)
    }

    public func localAPICState() throws(KVMError) -> kvm_lapic_state {
        var value = kvm_lapic_state()
        try ioctl("KVM_GET_LAPIC", CKVM_KVM_GET_LAPIC(), &value)
        return value
    }

    public func setLocalAPICState(_ state: kvm_lapic_state) throws(KVMError) {
        var value = state
        try ioctl("KVM_SET_LAPIC", CKVM_KVM_SET_LAPIC(), &value)
    }

    /// KVM_GET_MP_STATE: KVM_MP_STATE_RUNNABLE (0), UNINITIALIZED (1, waiting for INIT/SIPI),
    /// INIT_RECEIVED (2), HALTED (3), SIPI_RECEIVED (4).
    public func multiprocessingState() throws(KVMError) -> UInt32 {
        var value = kvm_mp_state()
        try ioctl("KVM_GET_MP_STATE", CKVM_KVM_GET_MP_STATE(), &value)
        return value.mp_state
    }

    public func setMultiprocessingState(_ state: UInt32) throws(KVMError) {
        var value = kvm_mp_state(mp_state: state)
        try ioctl("KVM_SET_MP_STATE", CKVM_KVM_SET_MP_STATE(), &value)
    }

    public func extendedState() throws(KVMError) -> kvm_xsave {
        var value = kvm_xsave()
        try ioctl("KVM_GET_XSAVE", CKVM_KVM_GET_XSAVE(), &value)
        return value
    }

    public func setExtendedState(_ state: kvm_xsave) throws(KVMError) {
        var value = state
        try ioctl("KVM_SET_XSAVE", CKVM_KVM_SET_XSAVE(), &value)
    }

    public func extendedControlRegisters() throws(KVMError) -> kvm_xcrs {
        var value = kvm_xcrs()
        try ioctl("KVM_GET_XCRS", CKVM_KVM_GET_XCRS(), &value)
        return value
    }

    public func setExtendedControlRegisters(_ state: kvm_xcrs) throws(KVMError) {
        var value = state
        try ioctl("KVM_SET_XCRS", CKVM_KVM_SET_XCRS(), &value)
    }

    public func events() throws(KVMError) -> kvm_vcpu_events {
        var value = kvm_vcpu_events()
        try ioctl("KVM_GET_VCPU_EVENTS", CKVM_KVM_GET_VCPU_EVENTS(), &value)
        return value
    }

    public func setEvents(_ state: kvm_vcpu_events) throws(KVMError) {
        var value = state
        try ioctl("KVM_SET_VCPU_EVENTS", CKVM_KVM_SET_VCPU_EVENTS(), &value)
    }

    public func debugRegisters() throws(KVMError) -> kvm_debugregs {
        var value = kvm_debugregs()
        try ioctl("KVM_GET_DEBUGREGS", CKVM_KVM_GET_DEBUGREGS(), &value)
        return value
    }

    public func setDebugRegisters(_ state: kvm_debugregs) throws(KVMError) {
        var value = state
        try ioctl("KVM_SET_DEBUGREGS", CKVM_KVM_SET_DEBUGREGS(), &value)
    }

    /// KVM_GET_TSC_KHZ: the guest TSC frequency.
    public func timeStampCounterKHz() throws(KVMError) -> UInt32 {
        UInt32(try retryingOnInterrupt("KVM_GET_TSC_KHZ") {
            ckvm_ioctl_value(descriptor.rawValue, CKVM_KVM_GET_TSC_KHZ(), 0)
        })
    }

    // MARK: CPUID and MSRs

    /// KVM_SET_CPUID2. Must come before the first KVM_RUN.
    public func setCPUID(_ entries: [CPUIDEntry]) throws(KVMError) {
        let bytes = MemoryLayout<kvm_cpuid2>.size + entries.count * MemoryLayout<kvm_cpuid_entry2>.stride
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 8)
        defer { buffer.deallocate() }
        buffer.initializeMemory(as: UInt8.self, repeating: 0, count: bytes)
        let cpuid = buffer.assumingMemoryBound(to: kvm_cpuid2.self)
        cpuid.pointee.nent = UInt32(entries.count)
        let slots = ckvm_cpuid2_entries(cpuid)!
        for (i, entry) in entries.enumerated() { slots[i] = entry.raw }
        _ = try retryingOnInterrupt("KVM_SET_CPUID2") {
            ckvm_ioctl_pointer(descriptor.rawValue, CKVM_KVM_SET_CPUID2(), buffer)
        }
    }

    /// KVM_GET_MSRS for the given indices. Returns only the MSRs KVM could read, in order.
    public func modelSpecificRegisters(_ indices: [UInt32]) throws(KVMError) -> [(index: UInt32, value: UInt64)] {
        if indices.isEmpty { return [] }
        let bytes = MemoryLayout<kvm_msrs>.size + indices.count * MemoryLayout<kvm_msr_entry>.stride
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 8)
        defer { buffer.deallocate() }
        buffer.initializeMemory(as: UInt8.self, repeating: 0, count: bytes)
        let msrs = buffer.assumingMemoryBound(to: kvm_msrs.self)
        msrs.pointee.nmsrs = UInt32(indices.count)
        let slots = ckvm_msrs_entries(msrs)!
        for (i, index) in indices.enumerated() { slots[i].index = index }
        let read = try retryingOnInterrupt("KVM_GET_MSRS") {
            ckvm_ioctl_pointer(descriptor.rawValue, CKVM_KVM_GET_MSRS(), buffer)
        }
        return (0..<Int(read)).map { (slots[$0].index, slots[$0].data) }
    }

    /// KVM_SET_MSRS. Throws if KVM accepted fewer MSRs than given, naming the first refused.
    public func setModelSpecificRegisters(_ values: [(index: UInt32, value: UInt64)]) throws(KVMError) {
        if values.isEmpty { return }
        let bytes = MemoryLayout<kvm_msrs>.size + values.count * MemoryLayout<kvm_msr_entry>.stride
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 8)
        defer { buffer.deallocate() }
        buffer.initializeMemory(as: UInt8.self, repeating: 0, count: bytes)
        let msrs = buffer.assumingMemoryBound(to: kvm_msrs.self)
        msrs.pointee.nmsrs = UInt32(values.count)
        let slots = ckvm_msrs_entries(msrs)!
        for (i, entry) in values.enumerated() {
            slots[i].index = entry.index
            slots[i].data = entry.value
        }
        let written = try retryingOnInterrupt("KVM_SET_MSRS") {
            ckvm_ioctl_pointer(descriptor.rawValue, CKVM_KVM_SET_MSRS(), buffer)
        }
        if Int(written) < values.count {
            let refused = values[Int(written)].index
            throw KVMError("KVM_SET_MSRS", errno: EINVAL,
                           detail: "MSR 0x\(String(refused, radix: 16)) refused")
        }
    }
}
