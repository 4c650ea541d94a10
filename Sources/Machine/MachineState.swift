import CKVM
import KVM

/// Saving and loading the whole machine's device state, as named sections, for migration.
///
/// Sections, in the order saved: `runstate`, `kvmclock`, `pic/master`, `pic/slave`, `ioapic`,
/// `pit`, `serial/com1`, `i8042`, `virtio-blk/0`... (one per disk), then `cpu/0`…`cpu/N-1`. The loader requires exactly this set
/// (any order), each at a version it knows; see docs/migration-stream.md.
extension Machine {
    static let machineSectionVersion: UInt32 = 1

    /// The names of the sections `saveState` writes and `loadState` requires, in saved order.
    public var stateSectionNames: [String] {
        ["runstate", "kvmclock", "pic/master", "pic/slave", "ioapic", "pit", "serial/com1", "i8042"]
            + diskSectionNames + (0..<configuration.cpuCount).map { "cpu/\($0)" }
    }

    /// Saves the device state. The vCPUs must be paused (every vCPU is read on its own thread).
    /// `runState` is the state to record for the destination: `running` or `paused`.
    public func saveState(recordedRunState: RunState) throws(MachineError) -> [StateSection] {
        try lifecycleQueue.run { () throws(MachineError) in try saveStateInTurn(recordedRunState: recordedRunState) }
    }

    private func saveStateInTurn(recordedRunState: RunState) throws(MachineError) -> [StateSection] {
        guard !runState.isRunning else { throw .refused("the vCPUs are running: their state can be saved only while they are stopped") }
        var sections: [StateSection] = []
        var run = StateWriter()
        run.append(UInt8(recordedRunState == .running ? 1 : 0))
        sections.append(StateSection(name: "runstate", version: Self.machineSectionVersion, payload: run.bytes))
        do {
            let clock = try virtualMachine.clock()
            var writer = StateWriter()
            writer.append(clock.clock)
            sections.append(StateSection(name: "kvmclock", version: Self.machineSectionVersion, payload: writer.bytes))
            for (chip, name) in [(UInt32(0), "pic/master"), (1, "pic/slave"), (2, "ioapic")] {
                var writer = StateWriter()
                writer.appendRaw(try virtualMachine.interruptControllerState(chip: chip))
                sections.append(StateSection(name: name, version: Self.machineSectionVersion, payload: writer.bytes))
            }
            var pit = StateWriter()
            pit.appendRaw(try virtualMachine.timerState())
            sections.append(StateSection(name: "pit", version: Self.machineSectionVersion, payload: pit.bytes))
        } catch {
            throw .kvm(error)
        }
        sections.append(serial.saveState())
        sections.append(keyboardController.saveState())
        sections.append(contentsOf: saveDiskState())
        let msrs = migratedMSRIndices
        for (index, thread) in vcpuThreads.enumerated() {
            let result = thread.perform { vcpu -> Result<VCPUState, KVMError> in
                do throws(KVMError) { return .success(try VCPUState.save(vcpu, msrIndices: msrs)) } catch { return .failure(error) }
            }
            switch result {
            case let .success(state)?: sections.append(state.encode(index: index))
            case let .failure(error)?: throw .kvm(error)
            case nil: throw .refused("vCPU \(index) has stopped for good (the machine ended)")
            }
        }
        return sections
    }

    /// Loads device state saved by `saveState`, checking every section before applying any.
    /// The vCPUs must be paused. Returns the run state the source recorded.
    public func loadState(_ sections: [StateSection]) throws(StateLoadError) -> RunState {
        try lifecycleQueue.run { () throws(StateLoadError) in try loadStateInTurn(sections) }
    }

    private func loadStateInTurn(_ sections: [StateSection]) throws(StateLoadError) -> RunState {
        guard !runState.isRunning else { throw StateLoadError("the vCPUs are running: state can be loaded only into a stopped machine") }
        var byName: [String: StateSection] = [:]
        for section in sections {
            guard byName[section.name] == nil else { throw StateLoadError("section '\(section.name)' appears twice") }
            byName[section.name] = section
        }
        let cpuNames = (0..<configuration.cpuCount).map { "cpu/\($0)" }
        let expected = Set(stateSectionNames)
        if let unknown = byName.keys.first(where: { !expected.contains($0) }) {
            throw StateLoadError("unknown section '\(unknown)' (does the source have more vCPUs? this machine has \(configuration.cpuCount))")
        }
        if let missing = expected.subtracting(byName.keys).sorted().first {
            throw StateLoadError("section '\(missing)' is missing")
        }
        func machineSection(_ name: String) throws(StateLoadError) -> StateReader {
            try StateReader(byName[name]!, version: Self.machineSectionVersion)
        }
        // Decode everything first: nothing is applied unless all of it is valid.
        var runReader = try machineSection("runstate")
        let wasRunning = try runReader.read(UInt8.self) != 0
        try runReader.finish()
        var clockReader = try machineSection("kvmclock")
        let clock = try clockReader.read(UInt64.self)
        try clockReader.finish()
        var chips: [kvm_irqchip] = []
        for (chip, name) in [(UInt32(0), "pic/master"), (1, "pic/slave"), (2, "ioapic")] {
            var reader = try machineSection(name)
            let state = try reader.readRaw(kvm_irqchip.self, initial: kvm_irqchip())
            try reader.finish()
            guard state.chip_id == chip else { throw StateLoadError("section '\(name)' holds interrupt controller \(state.chip_id)") }
            chips.append(state)
        }
        var pitReader = try machineSection("pit")
        let pit = try pitReader.readRaw(kvm_pit_state2.self, initial: kvm_pit_state2())
        try pitReader.finish()
        let diskRegisters = try decodeDiskState(byName)
        var vcpuStates: [VCPUState] = []
        for name in cpuNames { vcpuStates.append(try VCPUState.decode(byName[name]!)) }

        do {
            for chip in chips { try virtualMachine.setInterruptControllerState(chip) }
            try virtualMachine.setTimerState(pit)
            try virtualMachine.setClock(nanoseconds: clock)
        } catch {
            throw StateLoadError("KVM refused the machine state: \(error)")
        }
        try serial.loadState(byName["serial/com1"]!)
        try keyboardController.loadState(byName["i8042"]!)
        applyDiskState(diskRegisters)
        for (thread, state) in zip(vcpuThreads, vcpuStates) {
            let failure = thread.perform { vcpu -> KVMError? in
                do throws(KVMError) { try state.restore(to: vcpu); return nil } catch { return error }
            }
            switch failure {
            case nil: throw StateLoadError("vCPU \(thread.vcpu.id) has stopped for good (the machine ended)")
            case let .some(.some(error)): throw StateLoadError("KVM refused vCPU \(thread.vcpu.id)'s state: \(error)")
            case .some(.none): break
            }
        }
        return wasRunning ? .running : .paused
    }
}
