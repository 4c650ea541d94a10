import CKVM
#if canImport(Glibc)
import Glibc
#endif

/// The `/dev/kvm` system descriptor: API version, capabilities, host-supported CPUID, and the
/// factory for virtual machines.
public final class KVMSystem: @unchecked Sendable {
    // Sendable: immutable after init; every request on the descriptor is a read-only query.
    /// The KVM API version every kernel since 2.6.22 reports; anything else is unusable.
    public static let expectedAPIVersion: Int32 = 12

    public let descriptor: OwnedFileDescriptor
    public let path: String

    /// Opens the KVM device. Fails with `open(/dev/kvm)` and the errno when KVM is missing or
    /// the user lacks permission.
    public init(path: String = "/dev/kvm") throws(KVMError) {
        let fd = open(path, O_RDWR | O_CLOEXEC)
        if fd < 0 {
            throw KVMError("open", errno: errno, detail: path)
        }
        self.descriptor = OwnedFileDescriptor(taking: fd)
        self.path = path
    }

    /// KVM_GET_API_VERSION.
    public func apiVersion() throws(KVMError) -> Int32 {
        try retryingOnInterrupt("KVM_GET_API_VERSION") {
            ckvm_ioctl_value(descriptor.rawValue, CKVM_KVM_GET_API_VERSION(), 0)
        }
    }

    /// KVM_CHECK_EXTENSION: 0 when the capability is absent, otherwise a capability-specific value.
    public func checkExtension(_ capability: KVMCapability) -> Int32 {
        let result = ckvm_ioctl_value(descriptor.rawValue, CKVM_KVM_CHECK_EXTENSION(), UInt(capability.rawValue))
        return max(result, 0)
    }

    /// KVM_GET_VCPU_MMAP_SIZE: the size of each vCPU's shared `kvm_run` area.
    public func vcpuMmapSize() throws(KVMError) -> Int {
        Int(try retryingOnInterrupt("KVM_GET_VCPU_MMAP_SIZE") {
            ckvm_ioctl_value(descriptor.rawValue, CKVM_KVM_GET_VCPU_MMAP_SIZE(), 0)
        })
    }

    /// KVM_GET_SUPPORTED_CPUID: every CPUID leaf the host and KVM can offer a guest.
    public func supportedCPUID() throws(KVMError) -> [CPUIDEntry] {
        let capacity = 256
        let bytes = MemoryLayout<kvm_cpuid2>.size + capacity * MemoryLayout<kvm_cpuid_entry2>.stride
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 8)
        defer { buffer.deallocate() }
        buffer.initializeMemory(as: UInt8.self, repeating: 0, count: bytes)
        let cpuid = buffer.assumingMemoryBound(to: kvm_cpuid2.self)
        cpuid.pointee.nent = UInt32(capacity)
        _ = try retryingOnInterrupt("KVM_GET_SUPPORTED_CPUID") {
            ckvm_ioctl_pointer(descriptor.rawValue, CKVM_KVM_GET_SUPPORTED_CPUID(), buffer)
        }
        let entries = ckvm_cpuid2_entries(cpuid)!
        return (0..<Int(cpuid.pointee.nent)).map { CPUIDEntry(entries[$0]) }
    }

    /// KVM_GET_MSR_INDEX_LIST: the MSRs KVM can save and restore for a vCPU.
    public func msrIndexList() throws(KVMError) -> [UInt32] {
        let capacity = 1024
        let bytes = MemoryLayout<kvm_msr_list>.size + capacity * 4
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 8)
        defer { buffer.deallocate() }
        let list = buffer.assumingMemoryBound(to: kvm_msr_list.self)
        list.pointee.nmsrs = UInt32(capacity)
        _ = try retryingOnInterrupt("KVM_GET_MSR_INDEX_LIST") {
            ckvm_ioctl_pointer(descriptor.rawValue, CKVM_KVM_GET_MSR_INDEX_LIST(), buffer)
        }
        let indices = ckvm_msr_list_indices(list)!
        return (0..<Int(list.pointee.nmsrs)).map { indices[$0] }
    }

    /// KVM_CREATE_VM.
    public func createVirtualMachine() throws(KVMError) -> VirtualMachine {
        let fd = try retryingOnInterrupt("KVM_CREATE_VM") {
            ckvm_ioctl_value(descriptor.rawValue, CKVM_KVM_CREATE_VM(), 0)
        }
        return VirtualMachine(descriptor: OwnedFileDescriptor(taking: fd), system: self)
    }
}

/// The KVM capabilities tern checks for, by their KVM_CAP_* numbers.
public enum KVMCapability: Int32, CaseIterable, Sendable {
    case irqchip = 0
    case userMemory = 3
    case setTSSAddress = 4
    case extendedCPUID = 7
    case mpState = 14
    case syncMMU = 16
    case setIdentityMapAddress = 37
    case adjustClock = 39
    case vcpuEvents = 41
    case pit2 = 33
    case pitState2 = 35
    case debugRegisters = 50
    case xsave = 55
    case xcrs = 56
    case getTSCKHz = 61
    case kvmclockControl = 76
    case immediateExit = 136
    case dirtyLogRing = 192

    /// The name KVM's documentation uses.
    public var name: String {
        switch self {
        case .irqchip: "KVM_CAP_IRQCHIP"
        case .userMemory: "KVM_CAP_USER_MEMORY"
        case .setTSSAddress: "KVM_CAP_SET_TSS_ADDR"
        case .extendedCPUID: "KVM_CAP_EXT_CPUID"
        case .mpState: "KVM_CAP_MP_STATE"
        case .syncMMU: "KVM_CAP_SYNC_MMU"
        case .setIdentityMapAddress: "KVM_CAP_SET_IDENTITY_MAP_ADDR"
        case .adjustClock: "KVM_CAP_ADJUST_CLOCK"
        case .vcpuEvents: "KVM_CAP_VCPU_EVENTS"
        case .pit2: "KVM_CAP_PIT2"
        case .pitState2: "KVM_CAP_PIT_STATE2"
        case .debugRegisters: "KVM_CAP_DEBUGREGS"
        case .xsave: "KVM_CAP_XSAVE"
        case .xcrs: "KVM_CAP_XCRS"
        case .getTSCKHz: "KVM_CAP_GET_TSC_KHZ"
        case .kvmclockControl: "KVM_CAP_KVMCLOCK_CTRL"
        case .immediateExit: "KVM_CAP_IMMEDIATE_EXIT"
        case .dirtyLogRing: "KVM_CAP_DIRTY_LOG_RING"
        }
    }

    /// The capabilities tern cannot run without.
    public static let required: [KVMCapability] = [
        .irqchip, .userMemory, .setTSSAddress, .extendedCPUID, .mpState, .syncMMU,
        .setIdentityMapAddress, .adjustClock, .vcpuEvents, .pit2, .pitState2, .debugRegisters,
        .xsave, .xcrs, .immediateExit,
    ]
}
