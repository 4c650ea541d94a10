import CKVM

/// Why KVM_RUN returned: the decoded `kvm_run` exit.
public enum VCPUExit {
    /// Port I/O. For `in`, the handler fills `data`; for `out`, it reads it. `data` holds
    /// `size * count` bytes (string instructions repeat) and points into the kvm_run area.
    case io(port: UInt16, isWrite: Bool, size: Int, count: Int, data: UnsafeMutableRawBufferPointer)
    /// Memory-mapped I/O to an address with no memory slot.
    case mmio(address: UInt64, isWrite: Bool, data: UnsafeMutableRawBufferPointer)
    /// The guest executed HLT (only seen without an in-kernel LAPIC).
    case halt
    /// A triple fault: the CPU resets.
    case shutdown
    /// A signal or an immediate-exit request ended the run before the guest exited.
    case interrupted
    /// KVM could not emulate an instruction or handle an exit.
    case internalError(suberror: UInt32, data: [UInt64])
    /// VM entry failed; the hardware's reason code.
    case failedEntry(hardwareReason: UInt64, cpu: UInt32)
    /// A system event such as shutdown or reset requested through a hypervisor interface.
    case systemEvent(type: UInt32)
    /// A debug exit (single-step or breakpoint).
    case debug
    /// Any other exit reason, by number.
    case unhandled(reason: UInt32)

    init(decoding run: UnsafeMutablePointer<kvm_run>, runArea: UnsafeMutableRawPointer) {
        switch Int32(run.pointee.exit_reason) {
        case KVM_EXIT_IO:
            let io = ckvm_run_io(run)
            let length = Int(io.size) * Int(io.count)
            let data = UnsafeMutableRawBufferPointer(start: runArea + Int(io.dataOffset), count: length)
            self = .io(port: io.port, isWrite: io.direction == UInt8(KVM_EXIT_IO_OUT),
                       size: Int(io.size), count: Int(io.count), data: data)
        case KVM_EXIT_MMIO:
            let length = min(Int(ckvm_run_mmio_length(run)), 8)
            let data = UnsafeMutableRawBufferPointer(start: ckvm_run_mmio_data(run), count: length)
            self = .mmio(address: ckvm_run_mmio_address(run), isWrite: ckvm_run_mmio_is_write(run) != 0, data: data)
        case KVM_EXIT_HLT:
            self = .halt
        case KVM_EXIT_SHUTDOWN:
            self = .shutdown
        case KVM_EXIT_INTR:
            self = .interrupted
        case KVM_EXIT_INTERNAL_ERROR:
            let count = min(ckvm_run_internal_ndata(run), 16)
            self = .internalError(suberror: ckvm_run_internal_suberror(run),
                                  data: (0..<count).map { ckvm_run_internal_data(run, $0) })
        case KVM_EXIT_FAIL_ENTRY:
            self = .failedEntry(hardwareReason: ckvm_run_fail_entry_reason(run), cpu: ckvm_run_fail_entry_cpu(run))
        case KVM_EXIT_SYSTEM_EVENT:
            self = .systemEvent(type: ckvm_run_system_event_type(run))
        case KVM_EXIT_DEBUG:
            self = .debug
        default:
            self = .unhandled(reason: run.pointee.exit_reason)
        }
    }
}
