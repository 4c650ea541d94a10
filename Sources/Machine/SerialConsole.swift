import CProcess
import Foundation
import Synchronization

/// Connects the UART to the outside: transmitted bytes to standard output, a file or a
/// pseudo-terminal, and, in `stdio` and `pty` modes, what is typed there to the guest.
///
/// When standard input is a terminal it is put in raw mode (restored on exit), so keys such as
/// Ctrl-C reach the guest; as in QEMU, Ctrl-A x quits tern and Ctrl-A Ctrl-A sends Ctrl-A.
public final class SerialConsole: @unchecked Sendable {
    // Sendable: `outputDescriptor` is fixed; the terminal settings are touched only by
    // `start`/`restoreTerminal`, which the machine calls once each.
    private let outputDescriptor: Int32
    private let ownsOutput: Bool
    private let inputDescriptor: Int32
    /// QEMU's chardev filename for `query-chardev`: `stdio`, `file:PATH`, `pty:/dev/pts/N`, `null`.
    public let filename: String
    private var savedTerminal: termios?
    private let stopping = Atomic<Bool>(false)

    public init(backend: SerialBackend) throws(MachineError) {
        switch backend {
        case .stdio:
            outputDescriptor = STDOUT_FILENO
            ownsOutput = false
            inputDescriptor = STDIN_FILENO
            filename = "stdio"
        case .none:
            outputDescriptor = -1
            ownsOutput = false
            inputDescriptor = -1
            filename = "null"
        case let .file(path):
            let fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
            guard fd >= 0 else { throw .serial(path: path, reason: String(cString: strerror(errno))) }
            outputDescriptor = fd
            ownsOutput = true
            inputDescriptor = -1
            filename = "file:\(path)"
        case .pty:
            let (fd, path) = try Self.openPseudoTerminal()
            outputDescriptor = fd
            ownsOutput = true
            inputDescriptor = fd
            filename = "pty:\(path)"
        }
    }

    deinit {
        restoreTerminal()
        if ownsOutput { close(outputDescriptor) }
    }

    /// A pseudo-terminal master, non-blocking (a full buffer drops bytes instead of stopping
    /// the vCPU that writes them) and raw (the guest's bytes pass unchanged, as in QEMU).
    private static func openPseudoTerminal() throws(MachineError) -> (Int32, String) {
        var path = [CChar](repeating: 0, count: 256)
        let fd = cprocess_open_pty(&path, UInt(path.count))
        guard fd >= 0 else { throw .serial(path: "pty", reason: String(cString: strerror(-fd))) }
        return (fd, String(cString: path))
    }

    /// Writes one transmitted byte. Retries on EINTR (vCPU threads receive kick signals).
    public func write(_ byte: UInt8) {
        guard outputDescriptor >= 0 else { return }
        var value = byte
        while true {
            let n = Foundation.write(outputDescriptor, &value, 1)
            if n >= 0 || errno != EINTR { return }
        }
    }

    /// Starts feeding standard input to `serial`; `quit` is called on Ctrl-A x or end of input
    /// from a terminal.
    public func startInput(to serial: Serial16550, quit: @escaping @Sendable () -> Void) {
        guard inputDescriptor >= 0 else { return }
        let input = inputDescriptor
        if input == STDIN_FILENO && isatty(STDIN_FILENO) == 1 {
            var settings = termios()
            if tcgetattr(STDIN_FILENO, &settings) == 0 {
                savedTerminal = settings
                cfmakeraw(&settings)
                settings.c_oflag |= tcflag_t(OPOST | ONLCR) // keep newline translation for our own messages
                tcsetattr(STDIN_FILENO, TCSANOW, &settings)
            }
        }
        let interactive = savedTerminal != nil
        let thread = Thread { [self] in
            var escape = false
            var buffer = [UInt8](repeating: 0, count: 256)
            while !stopping.load(ordering: .relaxed) {
                let n = buffer.withUnsafeMutableBytes { read(input, $0.baseAddress!, $0.count) }
                if n < 0 && errno == EINTR { continue }
                if n < 0 && input != STDIN_FILENO && (errno == EAGAIN || errno == EIO) {
                    // A pseudo-terminal with nothing typed, or no one on the other side (EIO): wait.
                    var waiting = pollfd(fd: input, events: Int16(POLLIN), revents: 0)
                    if poll(&waiting, 1, 200) <= 0 || waiting.revents & Int16(POLLHUP) != 0 { usleep(100_000) }
                    continue
                }
                if n <= 0 { return } // end of input: the guest simply gets no more keys
                var bytes: [UInt8] = []
                for byte in buffer[0..<n] {
                    if interactive && escape {
                        escape = false
                        if byte == UInt8(ascii: "x") { quit(); return }
                        if byte == 0x01 { bytes.append(0x01) }
                        continue
                    }
                    if interactive && byte == 0x01 { escape = true; continue }
                    bytes.append(byte)
                }
                var offset = 0
                while offset < bytes.count && !stopping.load(ordering: .relaxed) {
                    offset += serial.receive(bytes[offset...])
                    if offset < bytes.count { usleep(1000) } // the guest has not drained its FIFO yet
                }
            }
        }
        thread.name = "console"
        thread.start()
    }

    /// Puts the terminal back as it was. Safe to call more than once.
    public func restoreTerminal() {
        stopping.store(true, ordering: .relaxed)
        if var saved = savedTerminal {
            tcsetattr(STDIN_FILENO, TCSANOW, &saved)
            savedTerminal = nil
        }
    }
}
