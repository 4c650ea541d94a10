import Machine

/// Device state as a live section that does not iterate: at the switchover it writes one
/// record per machine section (vCPUs, interrupt controllers, timers, UART, ...).
///
/// Record body: u8 name length, name (UTF-8), u32 section version, u32 payload length, payload.
final class OutgoingDeviceStateSection: OutgoingLiveSection {
    let name = "devices"
    let version: UInt32 = 1
    private let machine: Machine

    init(machine: Machine) { self.machine = machine }

    func complete(_ stream: SectionStream, _ context: SwitchoverContext) throws(MigrationStreamError) {
        let sections: [StateSection]
        do {
            sections = try machine.saveState(recordedRunState: context.guestWasRunning ? .running : .paused)
        } catch {
            throw MigrationStreamError("saving the device state failed: \(error)")
        }
        for section in sections {
            stream.record { writer in
                let name = Array(section.name.utf8)
                writer.append(UInt8(name.count))
                writer.append(bytes: name)
                writer.append(section.version)
                writer.append(UInt32(section.payload.count))
                writer.append(bytes: section.payload)
            }
        }
    }
}

/// The destination side: collects every device section, bounded in count and bytes, and
/// applies them only after the stream has ended and all of them decode.
final class IncomingDeviceStateSection: IncomingLiveSection {
    private let target: MigrationTarget
    private var sections: [StateSection] = []
    private var bytesHeld = 0
    /// The run state the source recorded, once finished.
    private(set) var recordedRunState: RunState?

    init(target: MigrationTarget) { self.target = target }

    func load(_ body: ByteCursor) throws(MigrationStreamError) {
        let name = try body.string(maximum: MigrationStreamFormat.maximumDeviceNameLength, "device section name")
        guard !name.isEmpty else { throw MigrationStreamError("a device section with an empty name") }
        let version = try body.read(UInt32.self, "device section version")
        let length = Int(try body.read(UInt32.self, "device section length"))
        guard length <= Int(MigrationStreamFormat.maximumDevicePayload) else {
            throw MigrationStreamError("device section '\(name)' claims \(length) bytes (at most \(MigrationStreamFormat.maximumDevicePayload))")
        }
        guard sections.count < MigrationStreamFormat.maximumDeviceSections,
              bytesHeld + length <= MigrationStreamFormat.maximumDeviceStateBytes else {
            throw MigrationStreamError("the stream carries more device state than any machine has (\(sections.count) sections, \(bytesHeld) bytes)")
        }
        let payload = Array(try body.take(length, "device section '\(name)'"))
        try body.finish("device section '\(name)'")
        bytesHeld += length
        sections.append(StateSection(name: name, version: version, payload: payload))
    }

    func finish() throws(MigrationStreamError) {
        guard !sections.isEmpty else { throw MigrationStreamError("the stream carries no device state") }
        do {
            recordedRunState = try target.loadDeviceState(sections)
        } catch {
            throw MigrationStreamError("device state: \(error.message)")
        }
    }
}
