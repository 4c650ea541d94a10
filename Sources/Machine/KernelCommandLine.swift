/// Builds the command line a guest kernel receives: tern's defaults for this machine, then the
/// user's `-append`, so that a user's setting of the same parameter wins (Linux keeps the last).
public enum KernelCommandLine {
    /// What this machine needs: the console on the one UART, no PCI and no ACPI (tern provides
    /// neither; the MP table describes the CPUs and interrupt routing), reboot through the
    /// keyboard controller so that `reboot` reaches tern, and an i8042 probe that does not wait
    /// for devices that are not there.
    public static let defaults = [
        "console=ttyS0", "earlyprintk=serial,ttyS0,115200", "reboot=k", "panic=1", "pci=off", "acpi=off",
        "i8042.noaux", "i8042.nomux", "i8042.nopnp", "i8042.dumbkbd",
    ]

    /// The defaults followed by the user's text, single-spaced.
    public static func merge(userArguments: String?) -> String {
        var words = defaults
        if let userArguments {
            words += userArguments.split(separator: " ", omittingEmptySubsequences: true).map(String.init)
        }
        return words.joined(separator: " ")
    }
}
