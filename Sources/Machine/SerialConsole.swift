import Foundation
import Synchronization

/// Connects the UART to the outside: transmitted bytes to standard output or a file, and, in
/// `stdio` mode, the keyboard to the guest.
///
/// When standard input is a terminal it is put in raw mode (restored on exit), so keys such as
/// Ctrl-C reach the guest; as in QEMU, Ctrl-A x quits tern and Ctrl-A Ctrl-A sends Ctrl-A.
public final class SerialConsole: @unchecked Sendable {
    // Sendable: `outputDescriptor` is fixed; the terminal settings are touched only by
    // `start`/`restoreTerminal`, which the machine calls once each.
    private let outputDescriptor: Int32
    private let ownsOutput: Bool
    private let readsInput: Bool
    private var savedTerminal: termios?
    private let stopping = Atomic<Bool>(false)

    public init(backend: SerialBackend) throws(MachineError) {
        switch backend {
        case .stdio:
            outputDescriptor = STDOUT_FILENO
            ownsOutput = false
            readsInput = true
        case .none:
            outputDescriptor = -1
            ownsOutput = false
            readsInput = false
        case let .file(path):
            let fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
            guard fd >= 0 else { throw .serial(path: path, reason: String(cString: strerror(errno))) }
            outputDescriptor = fd
            ownsOutput = true
            readsInput = false
        }
    }

    deinit {
        restoreTerminal()
        if ownsOutput { close(outputDescriptor) }
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
        guard readsInput else { return }
        if isatty(STDIN_FILENO) == 1 {
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
                let n = buffer.withUnsafeMutableBytes { read(STDIN_FILENO, $0.baseAddress!, $0.count) }
                if n < 0 && errno == EINTR { continue }
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
