#if canImport(Glibc)
import Glibc
#endif

/// What kind of KVM this host offers, so tern can say what to expect before it starts a guest.
public enum KVMHostFlavor: Equatable, Sendable {
    /// Hardware virtualisation (VMX or SVM): every guest runs at full speed.
    case hardware(module: String)
    /// `kvm_pvm`, the paravirtual KVM for nested clouds: CPL 3 guest code runs natively, but
    /// every store made at CPL 0 traps, and some instructions cannot be emulated.
    case paravirtual
    /// KVM is there but its module could not be identified.
    case unknown

    /// Reads `/sys/module` to tell which KVM vendor module is loaded.
    public static func detect(sysModulePath: String = "/sys/module") -> KVMHostFlavor {
        func exists(_ name: String) -> Bool { access("\(sysModulePath)/\(name)", F_OK) == 0 }
        if exists("kvm_pvm") { return .paravirtual }
        if exists("kvm_intel") { return .hardware(module: "kvm_intel") }
        if exists("kvm_amd") { return .hardware(module: "kvm_amd") }
        return .unknown
    }

    /// A note for the user about what this host means for guests, or nil on hardware KVM.
    public var advisory: String? {
        switch self {
        case .paravirtual:
            return "this host's /dev/kvm is kvm_pvm (paravirtual, no VMX/SVM): the built-in guest runs at full speed, "
                + "but a stock Linux kernel runs very slowly (every store at CPL 0 traps) and stops after printing its "
                + "early boot messages"
        case .hardware, .unknown:
            return nil
        }
    }
}
