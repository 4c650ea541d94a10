import Synchronization

/// The PC keyboard controller, reduced to what a guest needs to probe it and to reset the
/// machine: Linux's `reboot=k` writes 0xFE (pulse the reset line) to port 0x64, which tern
/// turns into a clean exit, as Firecracker does.
public final class I8042Controller: PortIODevice {
    public static let dataPort: UInt16 = 0x60
    public static let commandPort: UInt16 = 0x64

    enum Command {
        static let readCommandByte: UInt8 = 0x20
        static let writeCommandByte: UInt8 = 0x60
        static let selfTest: UInt8 = 0xaa
        static let interfaceTest: UInt8 = 0xab
        static let writeOutputPort: UInt8 = 0xd1
        static let pulseReset: UInt8 = 0xfe
    }

    struct State {
        var commandByte: UInt8 = 0x45 // keyboard interrupt on, system flag, translation
        var output: [UInt8] = []
        var pendingCommand: UInt8?
    }

    let state = Mutex(State())
    private let resetRequested: @Sendable () -> Void

    /// - Parameter resetRequested: called when the guest pulses the CPU reset line.
    public init(resetRequested: @escaping @Sendable () -> Void) {
        self.resetRequested = resetRequested
    }

    /// Ports 0x60 to 0x64 map here; offset 0 is data and offset 4 command/status. Port 0x61
    /// (offset 1) belongs to the in-kernel PIT and never reaches tern.
    public static let portCount: UInt16 = 5

    public func read(offset: UInt16, size: Int) -> UInt32 {
        state.withLock { state -> UInt32 in
            if offset == 0 { // data
                return state.output.isEmpty ? 0 : UInt32(state.output.removeFirst())
            }
            if offset != 4 { return 0xff }
            // status: output buffer full, system flag, last write was a command
            return UInt32((state.output.isEmpty ? 0 : 0x01) | 0x04)
        }
    }

    public func write(offset: UInt16, size: Int, value: UInt32) {
        let byte = UInt8(truncatingIfNeeded: value)
        let reset = state.withLock { state -> Bool in
            if offset == 0 {
                return writeData(byte, &state)
            }
            if offset != 4 { return false }
            return writeCommand(byte, &state)
        }
        if reset { resetRequested() }
    }

    private func writeCommand(_ command: UInt8, _ state: inout State) -> Bool {
        state.pendingCommand = nil
        switch command {
        case Command.readCommandByte: state.output.append(state.commandByte)
        case Command.writeCommandByte, Command.writeOutputPort: state.pendingCommand = command
        case Command.selfTest: state.output.append(0x55)
        case Command.interfaceTest: state.output.append(0x00)
        case Command.pulseReset: return true
        default: break // enable/disable keyboard or aux port: nothing to do
        }
        return false
    }

    private func writeData(_ byte: UInt8, _ state: inout State) -> Bool {
        switch state.pendingCommand {
        case Command.writeCommandByte?:
            state.commandByte = byte
            state.pendingCommand = nil
        case Command.writeOutputPort?:
            state.pendingCommand = nil
            return byte & 0x01 == 0 // bit 0 low holds the CPU in reset
        default:
            // A command to the keyboard itself: acknowledge; a reset also reports self-test passed.
            state.output.append(0xfa)
            if byte == 0xff { state.output.append(0xaa) }
        }
        return false
    }
}
