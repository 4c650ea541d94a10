import CKVM
import Foundation
import KVM
import Synchronization

/// A running virtual machine: KVM VM and vCPUs, guest memory, devices, vCPU threads and the
/// run state.
///
/// Built from a `MachineConfiguration`; `start()` launches the vCPU threads (paused with `-S`);
/// `pause()` returns only when every vCPU is out of KVM_RUN; `waitUntilEnded()` blocks until
/// the guest resets, shuts down, fails, or the user quits.
public final class Machine: @unchecked Sendable {
    // Sendable: fixed after init except the mutex-guarded thread list and state.
    public let configuration: MachineConfiguration
    public let hostFlavor: KVMHostFlavor
    public let memory: GuestMemory
    public let bootPlan: BootPlan
    let system: KVMSystem
    let virtualMachine: VirtualMachine
    let vcpus: [VCPU]
    /// The MSRs saved for migration that this host's KVM supports, looked up once so that
    /// saving state while the guest is stopped costs no extra system call.
    let migratedMSRIndices: [UInt32]
    let bus: PortIOBus
    let serial: Serial16550
    let keyboardController: I8042Controller
    /// The `-drive` images, in order, and the virtio-mmio devices that show them to the guest.
    public let disks: [DiskImage]
    let virtioDevices: [VirtioMMIODevice]
    let console: SerialConsole
    private let threadList = Mutex<[VCPUThread]>([])
    /// The vCPU threads (empty until `start`).
    private var threads: [VCPUThread] { threadList.withLock { $0 } }
    /// Orders every request that changes the machine's life; see `LifecycleQueue`.
    let lifecycleQueue = LifecycleQueue()
    private let cpuThrottle = CPUThrottle()
    private let startedCondition = NSCondition()
    private var started = false

    struct LifecycleState {
        var runState: RunState
        var ending: MachineEnding?
        /// A `stop` arrived while a migration's switchover had the vCPUs stopped: if the
        /// migration fails, the guest stays paused instead of running again.
        var stopRequestedDuringSwitchover = false
    }
    private let lifecycle: Mutex<LifecycleState>
    private let endingCondition = NSCondition()
    /// Told of every run-state change, reset and ending (the QMP layer turns these into events).
    public let events = MachineEventObservers()

    /// The guest-physical addresses KVM needs for its real-mode helpers, in the hole below 4 GiB.
    static let tssAddress: UInt64 = 0xfffb_d000
    static let identityMapAddress: UInt64 = 0xfffb_c000

    public init(configuration: MachineConfiguration) throws(MachineError) {
        self.configuration = configuration
        self.hostFlavor = KVMHostFlavor.detect()
        guard (1...MachineConfiguration.maximumCPUCount).contains(configuration.cpuCount) else {
            throw .invalidConfiguration("-smp \(configuration.cpuCount): tern runs 1 to \(MachineConfiguration.maximumCPUCount) vCPUs")
        }
        guard configuration.drives.count <= MachineConfiguration.maximumDriveCount else {
            throw .invalidConfiguration("-drive: tern attaches at most \(MachineConfiguration.maximumDriveCount) disks (\(configuration.drives.count) given)")
        }
        guard configuration.memorySize >= MachineConfiguration.minimumMemorySize else {
            throw .invalidConfiguration("-m \(configuration.memorySize >> 20)M: tern needs at least \(MachineConfiguration.minimumMemorySize >> 20) MiB")
        }

        let system: KVMSystem
        do {
            system = try KVMSystem(path: configuration.kvmDevicePath)
        } catch {
            throw .kvmUnavailable(path: configuration.kvmDevicePath, reason: String(cString: strerror(error.errno)))
        }
        self.system = system
        do {
            let version = try system.apiVersion()
            guard version == KVMSystem.expectedAPIVersion else { throw MachineError.kvmAPIVersion(version) }
        } catch let error as MachineError {
            throw error
        } catch {
            throw .kvm(error as! KVMError)
        }
        for capability in KVMCapability.required where system.checkExtension(capability) == 0 {
            throw .missingCapability(capability)
        }

        do {
            let vm = try system.createVirtualMachine()
            self.virtualMachine = vm
            // Order matters: these three before any vCPU exists.
            try vm.setTSSAddress(Self.tssAddress)
            try vm.setIdentityMapAddress(Self.identityMapAddress)
            try vm.createInterruptController()
            try vm.createProgrammableIntervalTimer()
        } catch {
            throw .kvm(error)
        }

        let layout = GuestMemoryLayout(ramSize: configuration.memorySize)
        do {
            self.memory = try GuestMemory(layout: layout)
            if configuration.preallocateMemory { try memory.preallocate() }
        } catch {
            throw .memory(error)
        }
        do {
            for region in layout.regions {
                try virtualMachine.setUserMemoryRegion(
                    slot: region.slot, guestPhysicalAddress: region.guestAddress.rawValue, size: region.size,
                    hostAddress: memory.hostBase + Int(region.hostOffset), logDirtyPages: false)
            }
        } catch {
            throw .kvm(error)
        }

        // A migration's destination takes its images' locks only when its guest is to run.
        var disks: [DiskImage] = []
        do {
            for drive in configuration.drives {
                disks.append(try DiskImage(drive, active: !configuration.waitsForIncomingMigration))
            }
        } catch {
            throw .disk(error)
        }
        self.disks = disks
        let vmForDisks = virtualMachine
        let guestMemory = memory
        self.virtioDevices = disks.enumerated().map { index, image in
            let line = VirtioSlots.interruptLines[index]
            return VirtioMMIODevice(
                base: VirtioSlots.base + UInt64(index) * VirtioMMIODevice.windowSize, interruptLine: line,
                backend: VirtioBlock(image: image) { message in Machine.logDeviceProblem("virtio-blk \(index): \(message)") },
                memory: guestMemory,
                raiseInterrupt: {
                    // An edge: Linux programs these ISA lines edge-triggered from the MP table.
                    _ = try? vmForDisks.setInterruptLine(line, high: true)
                    _ = try? vmForDisks.setInterruptLine(line, high: false)
                },
                onBrokenQueue: { message in Machine.logDeviceProblem("virtio-blk \(index) needs a reset: \(message)") })
        }

        self.bootPlan = try loadBootImage(configuration: configuration, into: memory,
                                          deviceArguments: virtioDevices.map(\.kernelArgument))

        let console = try SerialConsole(backend: configuration.serial)
        self.console = console
        let vm = virtualMachine
        self.serial = Serial16550(
            output: { console.write($0) },
            interruptLine: { level in try? vm.setInterruptLine(Serial16550.com1Interrupt, high: level) })
        let initial: RunState = configuration.waitsForIncomingMigration ? .inmigrate
            : configuration.startPaused ? .prelaunch : .running
        self.lifecycle = Mutex(LifecycleState(runState: initial))

        var bus = PortIOBus()
        bus.map(base: Serial16550.com1Base, count: 8, to: serial)
        // The reset line: resolved through a box because `self` is not complete yet.
        let resetTarget = WeakMachineReference()
        let keyboardController = I8042Controller {
            resetTarget.machine?.end(.guestReset(reason: "the guest pulsed the keyboard controller's reset line"))
        }
        self.keyboardController = keyboardController
        bus.map(base: I8042Controller.dataPort, count: I8042Controller.portCount, to: keyboardController)
        self.bus = bus

        let hostMSRs = Set((try? system.msrIndexList()) ?? [])
        self.migratedMSRIndices = VCPUState.migratedMSRs.filter { hostMSRs.contains($0) }
        do {
            let supported = try system.supportedCPUID()
            let template = CPUIDTemplate(supported: supported, cpuCount: configuration.cpuCount,
                                         exposeInvariantTSC: configuration.exposeInvariantTSC)
            if configuration.exposeInvariantTSC && !template.hostHasInvariantTSC {
                throw MachineError.invariantTSCUnavailable
            }
            var vcpus: [VCPU] = []
            for index in 0..<configuration.cpuCount {
                let vcpu = try virtualMachine.createVCPU(id: UInt32(index))
                try VCPUSetup.configure(vcpu, index: index, cpuid: template, plan: bootPlan,
                                        cpuCount: configuration.cpuCount)
                vcpus.append(vcpu)
            }
            self.vcpus = vcpus
        } catch let error as MachineError {
            throw error
        } catch {
            throw .kvm(error as! KVMError)
        }
        resetTarget.machine = self
    }

    /// Launches one thread per vCPU; they run at once unless the machine was created paused.
    public func start() {
        lifecycleQueue.run {
            let paused = !runState.isRunning
            let created = vcpus.map { vcpu in
                VCPUThread(vcpu: vcpu, startPaused: paused) { [unowned self] vcpu, exit in
                    self.handle(exit, on: vcpu)
                }
            }
            created.forEach { $0.start() }
            threadList.withLock { $0 = created }
            cpuThrottle.attach(created)
        }
        startedCondition.lock()
        started = true
        startedCondition.broadcast()
        startedCondition.unlock()
        console.startInput(to: serial) { [weak self] in
            self?.end(.hostQuit(cause: .console, reason: "Ctrl-A x on the console"))
        }
    }

    /// Blocks until `start()` has created the vCPU threads. A monitor can accept commands
    /// before that (QMP's wait=on, `-incoming`); state save and load wait here first.
    public func waitUntilStarted() {
        startedCondition.lock()
        while !started { startedCondition.wait() }
        startedCondition.unlock()
    }

    public var runState: RunState {
        lifecycle.withLock { $0.runState }
    }

    /// How the machine ended, once it has.
    public var ending: MachineEnding? {
        lifecycle.withLock { $0.ending }
    }

    /// Stops every vCPU and returns when all are outside KVM_RUN; the machine is then in
    /// `state` (`paused`, or `finish-migrate` for a migration's last copy). From a state that
    /// is not running, only the state changes (a `stop` does not undo `finish-migrate`).
    /// Returns whether the vCPUs were running.
    @discardableResult
    public func pause(to state: RunState = .paused) -> Bool {
        lifecycleQueue.run {
            let wasRunning = lifecycle.withLock { lifecycle -> Bool? in
                guard lifecycle.ending == nil else { return nil }
                let running = lifecycle.runState == .running
                if state == .paused && lifecycle.runState == .finishMigrate { lifecycle.stopRequestedDuringSwitchover = true }
                if state == .finishMigrate { lifecycle.stopRequestedDuringSwitchover = false }
                if running || (state != .paused && lifecycle.runState != state) { lifecycle.runState = state }
                return running
            }
            guard let wasRunning else { return false }
            if wasRunning {
                threads.forEach { $0.pause() }
                events.notify(.runStateChanged(state))
            }
            return wasRunning
        }
    }

    /// Sets a run state that involves no vCPU change (e.g. `postmigrate` after `finish-migrate`,
    /// or `paused` once an incoming migration has loaded with `-S`).
    public func setStoppedState(_ state: RunState) {
        precondition(!state.isRunning, "use resume() to run")
        lifecycleQueue.run {
            lifecycle.withLock { if $0.ending == nil && !$0.runState.isRunning { $0.runState = state } }
        }
    }

    /// Ends a migration's switchover that did not complete: the machine leaves `finish-migrate`
    /// for `paused`, and runs again if `resume` (its guest was running when the migration
    /// stopped it) unless a `stop` arrived meanwhile. Returns whether the vCPUs run again.
    @discardableResult
    public func endFailedSwitchover(resume: Bool) -> Bool {
        lifecycleQueue.run {
            let stopRequested = lifecycle.withLock { state -> Bool? in
                guard state.ending == nil, state.runState == .finishMigrate else { return nil }
                state.runState = .paused
                defer { state.stopRequestedDuringSwitchover = false }
                return state.stopRequestedDuringSwitchover
            }
            guard let stopRequested, resume else { return false }
            if stopRequested {
                events.notify(.runStateChanged(.paused))
                return false
            }
            return self.resume()
        }
    }

    /// Lets the vCPUs run again from a state that allows it (`paused`, `prelaunch`,
    /// `postmigrate`, and `inmigrate` once the incoming state has loaded).
    /// Returns whether the vCPUs were started (false when already running or not allowed).
    @discardableResult
    public func resume(fromIncomingMigration: Bool = false) -> Bool {
        lifecycleQueue.run {
            // The guest never runs on an image another process may write (after a migration
            // handed it over, the destination holds it).
            guard (try? activateDisks()) != nil else { return false }
            let changed = lifecycle.withLock { state -> Bool in
                guard state.ending == nil else { return false }
                guard state.runState.canResume || (fromIncomingMigration && state.runState == .inmigrate) else { return false }
                state.runState = .running
                return true
            }
            guard changed else { return false }
            threads.forEach { $0.resume() }
            events.notify(.runStateChanged(.running))
            return true
        }
    }

    /// Ends the machine for good: records why (the first reason wins), stops every vCPU thread
    /// and wakes `waitUntilEnded`. Safe from any thread, including a vCPU thread.
    public func end(_ ending: MachineEnding) {
        let newState: RunState = if case .internalError = ending { .internalError } else { .shutdown }
        let first = lifecycle.withLock { state -> Bool in
            guard state.ending == nil else { return false }
            state.ending = ending
            state.runState = newState
            return true
        }
        guard first else { return }
        events.notify(.runStateChanged(newState))
        events.notify(.ended(ending))
        endingCondition.lock()
        endingCondition.broadcast()
        endingCondition.unlock()
    }

    var vcpuThreads: [VCPUThread] { threads }

    /// Throttles every vCPU to run `100 - percent` % of the time (0 ends the throttle, at most
    /// 99), for migration's auto-converge.
    public func setCPUThrottle(percent: Int) {
        cpuThrottle.set(percent)
    }

    /// The throttle in force, in percent.
    public var cpuThrottlePercent: Int { cpuThrottle.percent }

    /// How long the throttle takes to give the guest its share once (a slice run plus its
    /// sleep; 10 ms unthrottled, a second at 99%): a dirty-rate sample shorter than this
    /// catches a run slice or none.
    public var cpuThrottlePeriodMilliseconds: UInt64 {
        CPUThrottle.periodNanoseconds(percent: cpuThrottle.percent) / 1_000_000
    }

    /// The host thread id of each vCPU's thread, in vCPU order (after `start`).
    public var vcpuThreadIDs: [Int32] { threads.map(\.threadID) }

    /// Where COM1 goes, as QEMU's `query-chardev` names it (`pty:/dev/pts/N`, `file:PATH`, ...).
    public var serialFilename: String { console.filename }

    /// Resets the machine as a power cycle would, without ending it: every vCPU back to its
    /// boot state and the boot image loaded again, then running again if it was running.
    /// RAM keeps its contents, as on a real reset. Refused while the guest's memory and state
    /// belong to a migration (`inmigrate`, `finish-migrate`) or after the machine has ended.
    public func reset() throws(MachineError) {
        try lifecycleQueue.run { () throws(MachineError) in try resetInTurn() }
    }

    private func resetInTurn() throws(MachineError) {
        switch runState {
        case .inmigrate:
            throw .refused("the machine is waiting for an incoming migration")
        case .finishMigrate:
            throw .refused("the machine is stopped for a migration's switchover (finish-migrate); try again once the migration has completed or failed")
        case .shutdown, .internalError:
            throw .refused("the machine has ended")
        default:
            break
        }
        threads.forEach { $0.pause() }
        defer { if runState == .running { threads.forEach { $0.resume() } } }
        // A reset device: the guest's driver starts over on a new boot.
        virtioDevices.forEach { $0.reset() }
        let plan = try loadBootImage(configuration: configuration, into: memory,
                                     deviceArguments: virtioDevices.map(\.kernelArgument))
        let count = configuration.cpuCount
        for (index, thread) in threads.enumerated() {
            let failure = thread.perform { vcpu -> KVMError? in
                do throws(KVMError) {
                    if index > 0 && !plan.startsAllCPUs {
                        try vcpu.setMultiprocessingState(UInt32(KVM_MP_STATE_UNINITIALIZED))
                    }
                    try VCPUSetup.reset(vcpu, index: index, plan: plan, cpuCount: count)
                    return nil
                } catch {
                    return error
                }
            }
            switch failure {
            case .none: throw .refused("the machine ended during the reset")
            case let .some(.some(error)): throw .kvm(error)
            case .some(.none): break
            }
        }
        events.notify(.reset(byGuest: false))
    }

    /// Blocks until the machine ends, then stops the vCPU threads and restores the terminal.
    public func waitUntilEnded() -> MachineEnding {
        endingCondition.lock()
        while ending == nil { endingCondition.wait() }
        endingCondition.unlock()
        threads.forEach { $0.stop() }
        console.restoreTerminal()
        return ending!
    }
}

/// Writes the long-mode tables and the guest image (built-in or Linux) into memory.
/// Loads what the configuration boots. `deviceArguments` (the virtio-mmio devices' tokens) are
/// appended to the kernel command line, as Firecracker does: no firmware tables describe them.
func loadBootImage(configuration: MachineConfiguration, into memory: GuestMemory,
                   deviceArguments: [String]) throws(MachineError) -> BootPlan {
    do { try LongModeSetup.writeTables(into: memory) } catch { throw .memory(error) }
    func withDevices(_ arguments: String?) -> String? {
        guard !deviceArguments.isEmpty else { return arguments }
        return ([arguments ?? ""].filter { !$0.isEmpty } + deviceArguments).joined(separator: " ")
    }
    switch configuration.boot {
    case let .builtinGuest(arguments):
        return try BuiltinGuestLoader.load(arguments: withDevices(arguments) ?? "", into: memory)
    case let .linux(kernelPath, initrdPath, arguments):
        // The built-in guest's image file (`tern guest-image`) boots as QEMU boots it from -kernel.
        if initrdPath == nil, let image = BuiltinGuestLoader.imageFile(at: kernelPath) {
            return try BuiltinGuestLoader.load(image: image, arguments: withDevices(arguments) ?? "", into: memory)
        }
        return try LinuxLoader.load(kernelPath: kernelPath, initrdPath: initrdPath, arguments: withDevices(arguments),
                                    cpuCount: configuration.cpuCount, into: memory)
    }
}

/// Lets a device built during `Machine.init` reach the machine once init has finished.
final class WeakMachineReference: @unchecked Sendable {
    // Sendable: written once at the end of Machine.init, before any vCPU runs.
    weak var machine: Machine?
}

/// A list of callbacks for machine events, called in order on the thread that caused them.
public final class MachineEventObservers: Sendable {
    private let observers = Mutex<[@Sendable (MachineEvent) -> Void]>([])

    public func add(_ observer: @escaping @Sendable (MachineEvent) -> Void) {
        observers.withLock { $0.append(observer) }
    }

    func notify(_ event: MachineEvent) {
        let current = observers.withLock { $0 }
        current.forEach { $0(event) }
    }
}
