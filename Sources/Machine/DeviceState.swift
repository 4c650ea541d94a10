/// Saved state of tern's own devices. Each device's section sits beside its model here so
/// that a field added to a device is seen next to the code that saves it.
extension Serial16550 {
    static let stateVersion: UInt32 = 1

    func saveState() -> StateSection {
        state.withLock { state in
            var writer = StateWriter()
            writer.append(state.interruptEnable)
            writer.append(state.lineControl)
            writer.append(state.modemControl)
            writer.append(state.scratch)
            writer.append(state.divisorLow)
            writer.append(state.divisorHigh)
            writer.append(state.fifoControl)
            writer.append(UInt8(state.transmitInterruptPending ? 1 : 0))
            writer.append(bytes: Array(state.receiveBuffer[state.receiveReadIndex...]))
            return StateSection(name: "serial/com1", version: Self.stateVersion, payload: writer.bytes)
        }
    }

    func loadState(_ section: StateSection) throws(StateLoadError) {
        var reader = try StateReader(section, version: Self.stateVersion)
        var loaded = State()
        loaded.interruptEnable = try reader.read(UInt8.self) & 0x0f
        loaded.lineControl = try reader.read(UInt8.self)
        loaded.modemControl = try reader.read(UInt8.self) & 0x1f
        loaded.scratch = try reader.read(UInt8.self)
        loaded.divisorLow = try reader.read(UInt8.self)
        loaded.divisorHigh = try reader.read(UInt8.self)
        loaded.fifoControl = try reader.read(UInt8.self) & 0xc9
        loaded.transmitInterruptPending = try reader.read(UInt8.self) != 0
        loaded.receiveBuffer = try reader.readBytes(maximum: Self.receiveCapacity)
        try reader.finish()
        state.withLock { state in
            let level = state.interruptLevel
            state = loaded
            state.interruptLevel = level
            _ = updateInterrupt(&state)
        }
    }
}

extension I8042Controller {
    static let stateVersion: UInt32 = 1

    func saveState() -> StateSection {
        state.withLock { state in
            var writer = StateWriter()
            writer.append(state.commandByte)
            writer.append(state.pendingCommand ?? 0)
            writer.append(UInt8(state.pendingCommand == nil ? 0 : 1))
            writer.append(bytes: state.output)
            return StateSection(name: "i8042", version: Self.stateVersion, payload: writer.bytes)
        }
    }

    func loadState(_ section: StateSection) throws(StateLoadError) {
        var reader = try StateReader(section, version: Self.stateVersion)
        var loaded = State()
        loaded.commandByte = try reader.read(UInt8.self)
        let pending = try reader.read(UInt8.self)
        loaded.pendingCommand = try reader.read(UInt8.self) != 0 ? pending : nil
        loaded.output = try reader.readBytes(maximum: 64)
        try reader.finish()
        state.withLock { $0 = loaded }
    }
}
