/// Where and how the vCPUs start, as decided by a loader.
public struct BootPlan: Equatable, Sendable {
    /// The 64-bit entry point.
    public var entry: GuestAddress
    /// The zero page, passed in RSI.
    public var bootParams: GuestAddress
    /// True for the built-in guest, whose every vCPU starts at the entry (RDI = index,
    /// RDX = count); false for Linux, whose application processors wait for INIT/SIPI.
    public var startsAllCPUs: Bool
    /// The command line the guest received, for diagnostics.
    public var commandLine: String
}

/// Fixed guest-physical addresses of the boot structures both loaders use.
enum BootAddresses {
    static let bootParams: GuestAddress = 0x7000
    static let commandLine: GuestAddress = 0x20000
    static let commandLineLimit = 0x10000
    static let multiprocessorTable = GuestAddress(E820Map.multiprocessorTableBase)
}
