import Synchronization

/// A 16550A UART as on a PC's COM1: transmit, a receive FIFO, the interrupt identification
/// logic, the divisor latch, scratch and modem registers with loopback, so that Linux's 8250
/// driver detects it as a 16550A and a person can type into a guest shell.
///
/// Transmission is instantaneous: a byte written to THR goes straight to `output`, and the
/// transmitter is always empty. Received bytes come from `receive(_:)` (the console thread).
public final class Serial16550: PortIODevice {
    public static let com1Base: UInt16 = 0x3f8
    public static let com1Interrupt: UInt32 = 4
    /// Bytes held before the console must wait; larger than a real 16-byte FIFO so pasted text
    /// is not dropped, since the guest drains it at its own pace.
    public static let receiveCapacity = 4096

    enum Register {
        static let data: UInt16 = 0 // RBR / THR, or DLL with DLAB
        static let interruptEnable: UInt16 = 1 // IER, or DLM with DLAB
        static let interruptIdentification: UInt16 = 2 // IIR on read, FCR on write
        static let lineControl: UInt16 = 3
        static let modemControl: UInt16 = 4
        static let lineStatus: UInt16 = 5
        static let modemStatus: UInt16 = 6
        static let scratch: UInt16 = 7
    }

    struct State {
        var interruptEnable: UInt8 = 0
        var lineControl: UInt8 = 0x03 // 8N1
        var modemControl: UInt8 = 0x08 // OUT2
        var scratch: UInt8 = 0
        var divisorLow: UInt8 = 0x0c // 9600 baud
        var divisorHigh: UInt8 = 0
        var fifoControl: UInt8 = 0
        var transmitInterruptPending = false
        var receiveBuffer: [UInt8] = []
        var receiveReadIndex = 0
        var interruptLevel = false

        var receivedCount: Int { receiveBuffer.count - receiveReadIndex }
        var divisorLatchAccess: Bool { lineControl & 0x80 != 0 }
        var loopback: Bool { modemControl & 0x10 != 0 }

        /// IIR: receive data has priority over transmitter empty; bits 7:6 say FIFOs are on.
        var interruptIdentification: UInt8 {
            let fifoBits: UInt8 = fifoControl & 0x01 != 0 ? 0xc0 : 0
            if interruptEnable & 0x01 != 0 && receivedCount > 0 { return fifoBits | 0x04 }
            if interruptEnable & 0x02 != 0 && transmitInterruptPending { return fifoBits | 0x02 }
            return fifoBits | 0x01
        }

        var lineStatus: UInt8 {
            (receivedCount > 0 ? 0x01 : 0) | 0x20 | 0x40 // data ready, THR empty, transmitter empty
        }

        var modemStatus: UInt8 {
            if loopback {
                // DCD <- OUT2, RI <- OUT1, DSR <- DTR, CTS <- RTS: Linux's probe checks this.
                let mcr = modemControl
                return (mcr & 0x08) << 4 | (mcr & 0x04) << 4 | (mcr & 0x01) << 5 | (mcr & 0x02) << 3
            }
            return 0xb0 // DCD, DSR, CTS
        }

        mutating func pushReceived(_ byte: UInt8) -> Bool {
            if receiveReadIndex > 0 && receiveReadIndex == receiveBuffer.count {
                receiveBuffer.removeAll(keepingCapacity: true)
                receiveReadIndex = 0
            }
            guard receivedCount < Serial16550.receiveCapacity else { return false }
            receiveBuffer.append(byte)
            return true
        }
    }

    let state = Mutex(State())
    private let output: @Sendable (UInt8) -> Void
    private let interruptLine: @Sendable (Bool) -> Void

    /// - Parameters:
    ///   - output: called with each byte the guest transmits.
    ///   - interruptLine: drives IRQ 4 to a level; called only when the level changes.
    public init(output: @escaping @Sendable (UInt8) -> Void, interruptLine: @escaping @Sendable (Bool) -> Void) {
        self.output = output
        self.interruptLine = interruptLine
    }

    /// Queues bytes typed at the console. Returns how many fit; the caller retries the rest.
    @discardableResult
    public func receive(_ bytes: some Sequence<UInt8>) -> Int {
        var accepted = 0
        let level = state.withLock { state -> Bool in
            for byte in bytes {
                guard state.pushReceived(byte) else { break }
                accepted += 1
            }
            return updateInterrupt(&state)
        }
        _ = level
        return accepted
    }

    /// Whether there is room to receive more input.
    public var canReceive: Bool {
        state.withLock { $0.receivedCount < Self.receiveCapacity }
    }

    public func read(offset: UInt16, size: Int) -> UInt32 {
        state.withLock { state -> UInt32 in
            let value: UInt8
            switch offset {
            case Register.data:
                if state.divisorLatchAccess {
                    value = state.divisorLow
                } else if state.receivedCount > 0 {
                    value = state.receiveBuffer[state.receiveReadIndex]
                    state.receiveReadIndex += 1
                } else {
                    value = 0
                }
            case Register.interruptEnable:
                value = state.divisorLatchAccess ? state.divisorHigh : state.interruptEnable
            case Register.interruptIdentification:
                value = state.interruptIdentification
                // Reading IIR while it reports THR empty acknowledges that interrupt.
                if value & 0x0f == 0x02 { state.transmitInterruptPending = false }
            case Register.lineControl:
                value = state.lineControl
            case Register.modemControl:
                value = state.modemControl
            case Register.lineStatus:
                value = state.lineStatus
            case Register.modemStatus:
                value = state.modemStatus
            case Register.scratch:
                value = state.scratch
            default:
                value = 0xff
            }
            _ = updateInterrupt(&state)
            return UInt32(value)
        }
    }

    public func write(offset: UInt16, size: Int, value: UInt32) {
        let byte = UInt8(truncatingIfNeeded: value)
        var transmitted: UInt8?
        state.withLock { state in
            switch offset {
            case Register.data:
                if state.divisorLatchAccess {
                    state.divisorLow = byte
                } else {
                    if state.loopback {
                        _ = state.pushReceived(byte)
                    } else {
                        transmitted = byte
                    }
                    state.transmitInterruptPending = true
                }
            case Register.interruptEnable:
                if state.divisorLatchAccess {
                    state.divisorHigh = byte
                } else {
                    let enablingTransmit = byte & 0x02 != 0 && state.interruptEnable & 0x02 == 0
                    state.interruptEnable = byte & 0x0f
                    // The transmitter is always empty, so enabling its interrupt raises it.
                    if enablingTransmit { state.transmitInterruptPending = true }
                }
            case Register.interruptIdentification:
                state.fifoControl = byte & 0xc9
                if byte & 0x02 != 0 { // clear the receive FIFO
                    state.receiveBuffer.removeAll(keepingCapacity: true)
                    state.receiveReadIndex = 0
                }
            case Register.lineControl:
                state.lineControl = byte
            case Register.modemControl:
                state.modemControl = byte & 0x1f
            case Register.scratch:
                state.scratch = byte
            default:
                break // LSR and MSR are read-only
            }
            _ = updateInterrupt(&state)
        }
        if let transmitted { output(transmitted) }
    }

    /// Recomputes IRQ 4 and drives the line when its level changes. Called with the lock held,
    /// so that level changes reach the interrupt controller in order.
    func updateInterrupt(_ state: inout State) -> Bool {
        // OUT2 gates the interrupt onto the bus on a PC.
        let level = state.interruptIdentification & 0x01 == 0 && state.modemControl & 0x08 != 0
        if level != state.interruptLevel {
            state.interruptLevel = level
            interruptLine(level)
        }
        return level
    }
}
