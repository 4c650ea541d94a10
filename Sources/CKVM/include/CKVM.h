// CKVM: the kernel's KVM ABI, made importable by Swift.
//
// Swift cannot import the ioctl request numbers (they are function-like macros), call the
// variadic ioctl(2), or reach flexible array members and anonymous unions. This header
// provides exactly that and nothing else: request numbers as inline functions, fixed-arity
// ioctl wrappers, accessors for kvm_run's exit union and flexible arrays, and static
// assertions on the layouts Swift code relies on. No logic lives here.
#ifndef CKVM_H
#define CKVM_H

#include <linux/kvm.h>
#include <sys/ioctl.h>
#include <stdint.h>
#include <stddef.h>
#include <pthread.h>
#include <signal.h>

// MARK: ioctl request numbers

#define CKVM_REQUEST(name) static inline unsigned long CKVM_##name(void) { return name; }
CKVM_REQUEST(KVM_GET_API_VERSION)
CKVM_REQUEST(KVM_CREATE_VM)
CKVM_REQUEST(KVM_CHECK_EXTENSION)
CKVM_REQUEST(KVM_GET_VCPU_MMAP_SIZE)
CKVM_REQUEST(KVM_GET_SUPPORTED_CPUID)
CKVM_REQUEST(KVM_GET_MSR_INDEX_LIST)
CKVM_REQUEST(KVM_SET_TSS_ADDR)
CKVM_REQUEST(KVM_SET_IDENTITY_MAP_ADDR)
CKVM_REQUEST(KVM_CREATE_IRQCHIP)
CKVM_REQUEST(KVM_GET_IRQCHIP)
CKVM_REQUEST(KVM_SET_IRQCHIP)
CKVM_REQUEST(KVM_CREATE_PIT2)
CKVM_REQUEST(KVM_GET_PIT2)
CKVM_REQUEST(KVM_SET_PIT2)
CKVM_REQUEST(KVM_IRQ_LINE)
CKVM_REQUEST(KVM_SET_USER_MEMORY_REGION)
CKVM_REQUEST(KVM_GET_DIRTY_LOG)
CKVM_REQUEST(KVM_GET_CLOCK)
CKVM_REQUEST(KVM_SET_CLOCK)
CKVM_REQUEST(KVM_CREATE_VCPU)
CKVM_REQUEST(KVM_RUN)
CKVM_REQUEST(KVM_GET_REGS)
CKVM_REQUEST(KVM_SET_REGS)
CKVM_REQUEST(KVM_GET_SREGS)
CKVM_REQUEST(KVM_SET_SREGS)
CKVM_REQUEST(KVM_SET_CPUID2)
CKVM_REQUEST(KVM_GET_FPU)
CKVM_REQUEST(KVM_SET_FPU)
CKVM_REQUEST(KVM_GET_LAPIC)
CKVM_REQUEST(KVM_SET_LAPIC)
CKVM_REQUEST(KVM_GET_MP_STATE)
CKVM_REQUEST(KVM_SET_MP_STATE)
CKVM_REQUEST(KVM_GET_MSRS)
CKVM_REQUEST(KVM_SET_MSRS)
CKVM_REQUEST(KVM_GET_XSAVE)
CKVM_REQUEST(KVM_SET_XSAVE)
CKVM_REQUEST(KVM_GET_XCRS)
CKVM_REQUEST(KVM_SET_XCRS)
CKVM_REQUEST(KVM_GET_VCPU_EVENTS)
CKVM_REQUEST(KVM_SET_VCPU_EVENTS)
CKVM_REQUEST(KVM_GET_DEBUGREGS)
CKVM_REQUEST(KVM_SET_DEBUGREGS)
CKVM_REQUEST(KVM_GET_TSC_KHZ)
CKVM_REQUEST(KVM_KVMCLOCK_CTRL)
#undef CKVM_REQUEST

// MARK: fixed-arity ioctl

static inline int ckvm_ioctl_pointer(int fd, unsigned long request, void *argument) {
    return ioctl(fd, request, argument);
}
static inline int ckvm_ioctl_value(int fd, unsigned long request, unsigned long argument) {
    return ioctl(fd, request, argument);
}

// MARK: kvm_run accessors (the exit reason selects a member of an anonymous union)

static inline void ckvm_run_set_immediate_exit(struct kvm_run *run, uint8_t value) {
    __atomic_store_n(&run->immediate_exit, value, __ATOMIC_SEQ_CST);
}

/// The `io` member of kvm_run, valid when exit_reason is KVM_EXIT_IO.
typedef struct {
    uint8_t direction;   // KVM_EXIT_IO_IN or KVM_EXIT_IO_OUT
    uint8_t size;        // 1, 2 or 4 bytes per access
    uint16_t port;
    uint32_t count;      // accesses (string I/O repeats)
    uint64_t dataOffset; // offset of the data from the start of kvm_run
} ckvm_io_exit;

static inline ckvm_io_exit ckvm_run_io(const struct kvm_run *run) {
    ckvm_io_exit exit = { run->io.direction, run->io.size, run->io.port, run->io.count, run->io.data_offset };
    return exit;
}

/// The `mmio` member of kvm_run, valid when exit_reason is KVM_EXIT_MMIO.
static inline uint64_t ckvm_run_mmio_address(const struct kvm_run *run) { return run->mmio.phys_addr; }
static inline uint32_t ckvm_run_mmio_length(const struct kvm_run *run) { return run->mmio.len; }
static inline uint8_t ckvm_run_mmio_is_write(const struct kvm_run *run) { return run->mmio.is_write; }
static inline uint8_t *ckvm_run_mmio_data(struct kvm_run *run) { return run->mmio.data; }

static inline uint32_t ckvm_run_internal_suberror(const struct kvm_run *run) { return run->internal.suberror; }
static inline uint32_t ckvm_run_internal_ndata(const struct kvm_run *run) { return run->internal.ndata; }
static inline uint64_t ckvm_run_internal_data(const struct kvm_run *run, uint32_t i) {
    return i < 16 ? run->internal.data[i] : 0;
}
static inline uint64_t ckvm_run_fail_entry_reason(const struct kvm_run *run) {
    return run->fail_entry.hardware_entry_failure_reason;
}
static inline uint32_t ckvm_run_fail_entry_cpu(const struct kvm_run *run) { return run->fail_entry.cpu; }
static inline uint32_t ckvm_run_system_event_type(const struct kvm_run *run) { return run->system_event.type; }

// MARK: flexible arrays

static inline struct kvm_cpuid_entry2 *ckvm_cpuid2_entries(struct kvm_cpuid2 *cpuid) { return cpuid->entries; }
static inline struct kvm_msr_entry *ckvm_msrs_entries(struct kvm_msrs *msrs) { return msrs->entries; }
static inline uint32_t *ckvm_msr_list_indices(struct kvm_msr_list *list) { return list->indices; }

// MARK: kvm_irqchip union

static inline struct kvm_pic_state *ckvm_irqchip_pic(struct kvm_irqchip *chip) { return &chip->chip.pic; }
static inline struct kvm_ioapic_state *ckvm_irqchip_ioapic(struct kvm_irqchip *chip) { return &chip->chip.ioapic; }

// MARK: signals (sigaction's handler field is a macro over a union)

/// Installs a handler that does nothing, without SA_RESTART, so that a signal sent to a vCPU
/// thread makes its KVM_RUN return EINTR.
int ckvm_install_kick_handler(int signal_number);

/// Unblocks a signal in the calling thread. Threads started from a dispatch worker inherit a
/// mask that blocks every signal, which would leave a vCPU deaf to its kick.
int ckvm_unblock_signal(int signal_number);

/// The calling thread's kernel id (gettid), which Glibc does not export to Swift.
int ckvm_thread_id(void);

/// Names the calling thread for the kernel (at most 15 bytes are kept), which Glibc's
/// pthread_setname_np would do were it exported to Swift.
int ckvm_set_thread_name(const char *name);

// MARK: layout tripwires

_Static_assert(sizeof(struct kvm_regs) == 144, "kvm_regs layout");
_Static_assert(sizeof(struct kvm_sregs) == 312, "kvm_sregs layout");
_Static_assert(sizeof(struct kvm_segment) == 24, "kvm_segment layout");
_Static_assert(sizeof(struct kvm_cpuid_entry2) == 40, "kvm_cpuid_entry2 layout");
_Static_assert(sizeof(struct kvm_lapic_state) == 1024, "kvm_lapic_state layout");
_Static_assert(sizeof(struct kvm_userspace_memory_region) == 32, "memory region layout");
_Static_assert(sizeof(struct kvm_xsave) == 4096, "kvm_xsave layout");

#endif
