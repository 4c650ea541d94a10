import CKVM
#if canImport(Glibc)
import Glibc
#endif

/// A KVM virtual machine descriptor: memory slots, the in-kernel interrupt controllers and PIT,
/// interrupt lines, the dirty log, the KVM clock, and the factory for vCPUs.
///
/// Ordering rules KVM imposes, obeyed by the machine layer: KVM_SET_TSS_ADDR and
/// KVM_SET_IDENTITY_MAP_ADDR and KVM_CREATE_IRQCHIP come before the first vCPU is created;
/// KVM_CREATE_PIT2 after the irqchip.
public final class VirtualMachine: @unchecked Sendable {
    // Sendable: the kernel serialises VM ioctls; this wrapper holds no mutable state.
    public let descriptor: OwnedFileDescriptor
    public let system: KVMSystem

    init(descriptor: OwnedFileDescriptor, system: KVMSystem) {
        self.descriptor = descriptor
        self.system = system
    }

    private func ioctl(_ name: String, _ request: UInt, _ argument: UnsafeMutableRawPointer?) throws(KVMError) {
        _ = try retryingOnInterrupt(name) { ckvm_ioctl_pointer(descriptor.rawValue, request, argument) }
    }

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

    /// KVM_SET_TSS_ADDR: three pages of guest-physical space KVM may use for real-mode emulation.
    public func setTSSAddress(_ address: UInt64) throws(KVMError) {
        _ = try retryingOnInterrupt("KVM_SET_TSS_ADDR") {
            ckvm_ioctl_value(descriptor.rawValue, CKVM_KVM_SET_TSS_ADDR(), UInt(address))
        }
    }

    /// KVM_SET_IDENTITY_MAP_ADDR: one page for the EPT identity map of real mode.
    public func setIdentityMapAddress(_ address: UInt64) throws(KVMError) {
        var value = address
        try ioctl("KVM_SET_IDENTITY_MAP_ADDR", CKVM_KVM_SET_IDENTITY_MAP_ADDR(), &value)
    }

    /// KVM_CREATE_IRQCHIP: in-kernel PIC pair, IOAPIC and one LAPIC per vCPU.
    public func createInterruptController() throws(KVMError) {
        try ioctl("KVM_CREATE_IRQCHIP", CKVM_KVM_CREATE_IRQCHIP(), nil)
    }

    /// KVM_CREATE_PIT2 with the dummy speaker port, so port 0x61 (PIT channel 2 gate) works.
    public func createProgrammableIntervalTimer() throws(KVMError) {
        var config = kvm_pit_config()
        config.flags = UInt32(KVM_PIT_SPEAKER_DUMMY)
        try ioctl("KVM_CREATE_PIT2", CKVM_KVM_CREATE_PIT2(), &config)
    }

    /// KVM_SET_USER_MEMORY_REGION: maps host memory at a guest-physical address in a slot.
    public func setUserMemoryRegion(slot: UInt32, guestPhysicalAddress: UInt64, size: UInt64,
                                    hostAddress: UnsafeMutableRawPointer?, logDirtyPages: Bool) throws(KVMError) {
        var region = kvm_userspace_memory_region()
        region.slot = slot
        region.flags = logDirtyPages ? UInt32(KVM_MEM_LOG_DIRTY_PAGES) : 0
        region.guest_phys_addr = guestPhysicalAddress
        region.memory_size = size
        region.userspace_addr = UInt64(UInt(bitPattern: hostAddress))
        try ioctl("KVM_SET_USER_MEMORY_REGION", CKVM_KVM_SET_USER_MEMORY_REGION(), &region)
    }

    /// KVM_GET_DIRTY_LOG: copies the slot's dirty bitmap (one bit per 4 KiB page) into `bitmap`
    /// and clears it in the kernel. `bitmap` must hold at least pages/64 words.
    public func fetchDirtyLog(slot: UInt32, into bitmap: UnsafeMutablePointer<UInt64>) throws(KVMError) {
        var log = kvm_dirty_log()
        log.slot = slot
        log.dirty_bitmap = UnsafeMutableRawPointer(bitmap)
        try ioctl("KVM_GET_DIRTY_LOG", CKVM_KVM_GET_DIRTY_LOG(), &log)
    }

    /// KVM_IRQ_LINE: drives an interrupt line of the in-kernel PIC/IOAPIC to a level.
    public func setInterruptLine(_ line: UInt32, high: Bool) throws(KVMError) {
        var level = kvm_irq_level()
        level.irq = line
        level.level = high ? 1 : 0
        try ioctl("KVM_IRQ_LINE", CKVM_KVM_IRQ_LINE(), &level)
    }

    /// KVM_GET_IRQCHIP for chip 0 (master PIC), 1 (slave PIC) or 2 (IOAPIC).
    public func interruptControllerState(chip: UInt32) throws(KVMError) -> kvm_irqchip {
        var state = kvm_irqchip()
        state.chip_id = chip
        try ioctl("KVM_GET_IRQCHIP", CKVM_KVM_GET_IRQCHIP(), &state)
        return state
    }

    /// KVM_SET_IRQCHIP.
    public func setInterruptControllerState(_ state: kvm_irqchip) throws(KVMError) {
        var copy = state
        try ioctl("KVM_SET_IRQCHIP", CKVM_KVM_SET_IRQCHIP(), &copy)
    }

    /// KVM_GET_PIT2.
    public func timerState() throws(KVMError) -> kvm_pit_state2 {
        var state = kvm_pit_state2()
        try ioctl("KVM_GET_PIT2", CKVM_KVM_GET_PIT2(), &state)
        return state
    }

    /// KVM_SET_PIT2.
    public func setTimerState(_ state: kvm_pit_state2) throws(KVMError) {
        var copy = state
        try ioctl("KVM_SET_PIT2", CKVM_KVM_SET_PIT2(), &copy)
    }

    /// KVM_GET_CLOCK: the kvmclock base, in nanoseconds.
    public func clock() throws(KVMError) -> kvm_clock_data {
        var data = kvm_clock_data()
        try ioctl("KVM_GET_CLOCK", CKVM_KVM_GET_CLOCK(), &data)
        return data
    }

    /// KVM_SET_CLOCK.
    public func setClock(nanoseconds: UInt64) throws(KVMError) {
        var data = kvm_clock_data()
        data.clock = nanoseconds
        try ioctl("KVM_SET_CLOCK", CKVM_KVM_SET_CLOCK(), &data)
    }

    /// KVM_CREATE_VCPU and the mmap of its `kvm_run` area.
    public func createVCPU(id: UInt32) throws(KVMError) -> VCPU {
        let fd = try retryingOnInterrupt("KVM_CREATE_VCPU") {
            ckvm_ioctl_value(descriptor.rawValue, CKVM_KVM_CREATE_VCPU(), UInt(id))
        }
        let owned = OwnedFileDescriptor(taking: fd)
        let size = try system.vcpuMmapSize()
        guard let area = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), area != MAP_FAILED else {
            throw KVMError("mmap", errno: errno, detail: "kvm_run area of vCPU \(id)")
        }
        return VCPU(id: id, descriptor: owned, runArea: area, runAreaSize: size)
    }
}
