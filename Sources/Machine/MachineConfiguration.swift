/// Where the guest's COM1 goes.
public enum SerialBackend: Equatable, Sendable {
    /// tern's standard output, and standard input typed into the guest.
    case stdio
    /// Appended to a file.
    case file(path: String)
    /// Discarded.
    case none
    /// A new pseudo-terminal (QEMU's `-chardev pty`): output to it, input from it; its
    /// `/dev/pts/N` path is in `query-chardev`. Bytes the guest writes while no one reads the
    /// terminal are dropped once its buffer is full, so the guest never waits on a reader.
    case pty
}

/// What to boot.
public enum BootSource: Equatable, Sendable {
    /// The built-in test guest, with its `-append` parameters (wss=, rate=, pattern=).
    case builtinGuest(arguments: String)
    /// A Linux bzImage with an optional initrd and extra kernel arguments.
    case linux(kernelPath: String, initrdPath: String?, arguments: String?)
}

/// Everything needed to build a machine; the command line produces one of these.
public struct MachineConfiguration: Equatable, Sendable {
    public var memorySize: UInt64 = 512 << 20
    public var cpuCount: Int = 1
    public var boot: BootSource = .builtinGuest(arguments: "")
    public var serial: SerialBackend = .stdio
    /// `-S`: create the machine paused (`prelaunch`).
    public var startPaused = false
    public var name: String?
    /// `-cpu host,+invtsc`: expose the invariant TSC (and so block migration later).
    public var exposeInvariantTSC = false
    public var kvmDevicePath = "/dev/kvm"
    /// `-incoming`: the machine waits in `inmigrate` for its state to arrive instead of booting.
    public var waitsForIncomingMigration = false
    /// `-mem-prealloc`: allocate all guest RAM at start instead of at first touch.
    public var preallocateMemory = false
    /// `-machine none`: a machine with nothing to run, for tools that probe the monitor
    /// (libvirt's capability probe); `cont` is refused and no vCPU is listed.
    public var hasNoGuest = false
    /// `-uuid`: the VM's UUID as given, for `query-uuid`.
    public var uuid: String?
    /// `-drive ...,if=virtio`: raw images the guest sees as virtio-blk disks, in order.
    public var drives: [DriveConfiguration] = []
    /// The serial port's chardev id, for `query-chardev` (`serial0` unless `-chardev` names it).
    public var serialLabel = "serial0"

    /// The most vCPUs tern starts (the MP table numbers APIC ids in one byte).
    public static let maximumCPUCount = 64
    /// The most `-drive`s: one virtio-mmio slot and interrupt line each.
    public static var maximumDriveCount: Int { VirtioSlots.maximumCount }
    /// Guest RAM must hold the boot structures, the built-in guest and its tables.
    public static let minimumMemorySize: UInt64 = 32 << 20

    public init() {}
}
