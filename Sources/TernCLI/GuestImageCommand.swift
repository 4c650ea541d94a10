import Foundation
import Machine

/// `tern guest-image FILE`: writes the built-in guest as a file QEMU boots with `-kernel`.
public enum GuestImageCommand {
    public static let usage = """
    Usage: tern guest-image FILE

    Writes tern's built-in test guest to FILE: a multiboot image that
    'qemu-system-x86_64 -kernel FILE -append "wss=64M rate=32M" -nographic' boots,
    so that the same guest runs under QEMU and tern. See guest/README.md.

    """

    public static func main(arguments: [String]) -> Int32 {
        if arguments.contains(where: { $0 == "-h" || $0 == "--help" }) {
            print(usage, terminator: "")
            return 0
        }
        guard arguments.count == 1 else {
            printError("guest-image: expected one FILE argument (see tern guest-image --help)")
            return 2
        }
        let image = BuiltinGuestLoader.image
        do {
            try Data(image).write(to: URL(fileURLWithPath: arguments[0]))
        } catch {
            printError("guest-image: cannot write '\(arguments[0])': \(error.localizedDescription)")
            return 1
        }
        printError("wrote the built-in guest (\(image.count) bytes) to \(arguments[0])")
        return 0
    }
}
