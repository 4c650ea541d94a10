/// QEMU options that libvirt (and other QEMU front ends) pass and that tern accepts without a
/// change of behaviour, because they ask for what tern does anyway or tune a QEMU feature tern
/// does not have; and the refusal, by name, of the values that ask for something tern cannot do.
/// docs/libvirt.md lists them.
extension RunOptions {
    static func checkIgnorable(_ name: String, _ value: String) throws(CommandLineError) {
        let context = "tern run: -\(name) \(value)"
        switch name {
        case "object":
            let list = try QEMUOptionList(parsing: value, option: "object", impliedKey: "qom-type")
            switch list.implied {
            case "secret":
                // libvirt's master key for encrypted secrets: tern has nothing to decrypt.
                return
            case let type? where type.hasPrefix("memory-backend"):
                throw CommandLineError("\(context): tern allocates guest RAM itself (-m, -mem-prealloc); it has no memory backends")
            default:
                throw CommandLineError("\(context): tern has no '\(list.implied ?? "")' object (it accepts secret, tls-creds-x509 and authz-simple)")
            }
        case "overcommit":
            let list = try QEMUOptionList(parsing: value, option: "overcommit", impliedKey: "")
            try list.check(known: ["mem-lock", "cpu-pm"], option: "overcommit", text: value)
            if QEMUOptionList.isOn(list["mem-lock"]) == true {
                throw CommandLineError("\(context): tern does not lock guest RAM (mem-lock=off)")
            }
            if QEMUOptionList.isOn(list["cpu-pm"]) == true {
                throw CommandLineError("\(context): tern does not pass CPU power management through (cpu-pm=off)")
            }
        case "rtc":
            let list = try QEMUOptionList(parsing: value, option: "rtc", impliedKey: "")
            try list.check(known: ["base", "clock", "driftfix"], option: "rtc", text: value)
            // tern has no CMOS clock: a guest keeps time by its TSC, which migrates with it.
            guard (list["base"] ?? "utc") == "utc" else {
                throw CommandLineError("\(context): tern has no CMOS clock to offset; only base=utc is accepted")
            }
        case "boot":
            // No firmware: tern boots the kernel (or the built-in guest) directly, so the boot
            // order, menu and strictness have nothing to choose between.
            let list = try QEMUOptionList(parsing: value, option: "boot", impliedKey: "order")
            try list.check(known: ["order", "once", "menu", "strict", "splash-time", "reboot-timeout"], option: "boot", text: value)
        case "audiodev":
            let list = try QEMUOptionList(parsing: value, option: "audiodev", impliedKey: "driver")
            guard list.implied == "none" else {
                throw CommandLineError("\(context): tern has no sound device; only driver none is accepted")
            }
        case "msg":
            let list = try QEMUOptionList(parsing: value, option: "msg", impliedKey: "")
            try list.check(known: ["timestamp", "guest-name"], option: "msg", text: value)
        case "sandbox":
            throw CommandLineError("\(context): tern has no seccomp sandbox")
        case "global":
            throw CommandLineError("\(context): tern has no device properties to set globally")
        default:
            break
        }
    }

    /// `-uuid`: 8-4-4-4-12 hexadecimal digits.
    static func uuid(_ value: String) throws(CommandLineError) -> String {
        let groups = value.split(separator: "-", omittingEmptySubsequences: false)
        guard groups.map(\.count) == [8, 4, 4, 4, 12], groups.allSatisfy({ $0.allSatisfy(\.isHexDigit) }) else {
            throw CommandLineError("tern run: -uuid \(value): expected a UUID such as 05e2977d-6858-49d4-9145-ba4f3e9b5ef7")
        }
        return value.lowercased()
    }
}
