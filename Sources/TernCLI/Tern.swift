import Foundation

/// The `tern` command: dispatches to a subcommand.
public enum Tern {
    public static func main(arguments: [String]) -> Int32 {
        signal(SIGPIPE, SIG_IGN) // a closed console pipe is an error return, not a kill
        guard let command = arguments.first else {
            print(HelpText.overview, terminator: "")
            return 2
        }
        let rest = Array(arguments.dropFirst())
        // QEMU's command line with no subcommand (`tern -S -machine ...`), as libvirt runs a
        // domain's emulator: the same as `tern run ...`.
        if command.hasPrefix("-") && !["-h", "--help", "-help", "--version", "-version"].contains(command) {
            return RunCommand.main(arguments: arguments)
        }
        switch command {
        case "run":
            return RunCommand.main(arguments: rest)
        case "guest-image":
            return GuestImageCommand.main(arguments: rest)
        case "qmp":
            return QMPClientCommand.main(arguments: rest)
        case "migrate":
            return MigrateCommand.main(arguments: rest)
        case "demo":
            return DemoCommand.main(arguments: rest)
        case "help", "-h", "--help", "-help":
            switch rest.first {
            case "run": print(HelpText.run, terminator: "")
            case "guest-image": print(GuestImageCommand.usage, terminator: "")
            case "qmp": print(QMPClientCommand.usage, terminator: "")
            case "migrate": print(MigrateCommand.usage, terminator: "")
            case "demo": print(DemoCommand.usage, terminator: "")
            default: print(HelpText.overview, terminator: "")
            }
            return 0
        case "--version", "-version", "version":
            print("tern \(HelpText.version)")
            return 0
        default:
            printError("unknown command '\(command)' (commands: demo, run, migrate, qmp, guest-image, help; see tern --help)")
            return 2
        }
    }
}
