import Foundation
import Machine

/// What the destination brings to a load: its capabilities and thread counts.
struct IncomingSettings {
    var capabilities: [String] = []
    var decompressThreads = 2
}

/// The destination side: reads the stream header and hands the rest to the loader of its
/// version — version 2 (`load`, below) or version 1 (`StreamV1Loader`, for VMs saved by older
/// terns).
///
/// Version 2 guarantees: the configuration record is checked against this machine before any
/// page is loaded; every record's length is bounded before it is read and its checksum checked
/// before it is used; each page decoder checks every offset and length before it writes, and
/// never writes outside the pages its record names; device state is applied only after the
/// stream has ended and every section decodes. Where the source asked for a return path and
/// the connection is a socket, the verdict (loaded, or failed with the reason) goes back on it.
final class IncomingMigration {
    private let target: MigrationTarget
    private let descriptor: Int32
    private let reader: MigrationStreamReader
    private let settings: IncomingSettings
    private(set) var statistics = IncomingStatistics()
    /// Wall-clock nanoseconds when the source stopped its vCPUs, from the stream.
    private(set) var sourceStoppedAt: UInt64?
    private var returnPath: ReturnPathSender?

    init(target: MigrationTarget, descriptor: Int32, settings: IncomingSettings = IncomingSettings()) {
        self.target = target
        self.descriptor = descriptor
        self.reader = MigrationStreamReader(descriptor: descriptor)
        self.settings = settings
    }

    convenience init(machine: Machine, descriptor: Int32, settings: IncomingSettings = IncomingSettings()) {
        self.init(target: machine as MigrationTarget, descriptor: descriptor, settings: settings)
        machine.waitUntilStarted() // the vCPU threads must exist to take their state
    }

    /// Loads the whole stream. Returns the run state the source recorded.
    func load(progress: (IncomingStatistics) -> Void) throws(MigrationStreamError) -> RunState {
        do {
            let state = try loadStream(progress: progress)
            returnPath?.send(.loaded)
            return state
        } catch {
            returnPath?.send(.failed(error.message))
            throw error
        }
    }

    private func loadStream(progress: (IncomingStatistics) -> Void) throws(MigrationStreamError) -> RunState {
        let magic = try reader.readBytes(MigrationStreamFormat.magic.count)
        guard magic == MigrationStreamFormat.magic else {
            throw MigrationStreamError("not a tern migration stream (bad magic)")
        }
        let version = try reader.read(UInt32.self)
        guard MigrationStreamFormat.readableVersions.contains(version) else {
            throw MigrationStreamError("stream version \(version) is not supported (this tern reads versions \(MigrationStreamFormat.readableVersions.lowerBound) to \(MigrationStreamFormat.readableVersions.upperBound))")
        }
        if version == 1 {
            let v1 = StreamV1Loader(target: target, reader: reader)
            defer { statistics = v1.statistics; sourceStoppedAt = v1.sourceStoppedAt }
            return try v1.load(progress: progress)
        }
        return try loadVersion2(progress: progress)
    }

    private func loadVersion2(progress: (IncomingStatistics) -> Void) throws(MigrationStreamError) -> RunState {
        let records = StreamRecordReader(reader: reader)
        let first = try records.next()
        guard first.type == .configuration else {
            throw MigrationStreamError("the stream does not begin with its configuration record")
        }
        let configuration = try records.withBody { (body) throws(MigrationStreamError) in try StreamConfiguration.decode(body) }
        if configuration.returnPath && isSocket(descriptor) { returnPath = ReturnPathSender(descriptor: descriptor) }
        if let mismatch = configuration.mismatch(ramSize: target.memory.size, cpuCount: target.cpuCount,
                                                 deviceSections: target.deviceSectionNames,
                                                 capabilities: settings.capabilities) {
            throw MigrationStreamError(mismatch)
        }
        var sections: [UInt16: IncomingLiveSection] = [:]
        var ram: IncomingRAMSection?
        var devices: IncomingDeviceStateSection?
        for section in configuration.sections {
            switch (section.name, section.version) {
            case ("ram", 1):
                let loader = IncomingRAMSection(memory: target.memory, encodings: configuration.encodings,
                                                decompressThreads: settings.decompressThreads)
                ram = loader
                sections[section.id] = loader
            case ("devices", 1):
                let loader = IncomingDeviceStateSection(target: target)
                devices = loader
                sections[section.id] = loader
            case ("ram", _), ("devices", _):
                throw MigrationStreamError("live section '\(section.name)' version \(section.version) is not supported (this tern reads version 1)")
            default:
                throw MigrationStreamError("the source sends live section '\(section.name)', which this tern does not know")
            }
        }
        guard ram != nil, let devices else { throw MigrationStreamError("the stream has no RAM or no device-state section") }
        func publish() {
            statistics.pagesLoaded = ram?.pagesLoaded ?? 0
            statistics.zeroPagesLoaded = ram?.zeroPagesLoaded ?? 0
            statistics.bytesRead = records.bytesRead
        }
        while true {
            let record = try records.next()
            guard let type = record.type else {
                if record.isRequired {
                    throw MigrationStreamError("a required record of unknown type 0x\(String(record.typeByte, radix: 16)) at byte \(record.streamOffset)")
                }
                continue // an optional record from a newer tern
            }
            switch type {
            case .configuration:
                throw MigrationStreamError("a second configuration record at byte \(record.streamOffset)")
            case .sectionData:
                guard let section = sections[record.section] else {
                    throw MigrationStreamError("a record for live section \(record.section), which the configuration does not list")
                }
                try records.withBody { (body) throws(MigrationStreamError) in try section.load(body) }
                if records.recordsRead % 4096 == 0 { publish(); progress(statistics) }
            case .passEnd:
                publish()
                progress(statistics)
            case .ping:
                let value = try records.withBody { (body) throws(MigrationStreamError) -> UInt32 in
                    let value = try body.read(UInt32.self, "ping value")
                    try body.finish("a PING record")
                    return value
                }
                returnPath?.send(.pong(value))
            case .sourceStopped:
                sourceStoppedAt = try records.withBody { (body) throws(MigrationStreamError) -> UInt64 in
                    try body.read(UInt64.self, "stop time")
                }
            case .end:
                let expected = try records.withBody { (body) throws(MigrationStreamError) -> UInt64 in
                    let count = try body.read(UInt64.self, "record count")
                    try body.finish("the END record")
                    return count
                }
                guard expected == records.recordsRead - 1 else {
                    throw MigrationStreamError("the source wrote \(expected) records but \(records.recordsRead - 1) arrived")
                }
                publish()
                for section in sections.values where section !== devices { try section.finish() }
                try devices.finish()
                return devices.recordedRunState ?? .paused
            }
        }
    }
}
