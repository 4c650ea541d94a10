import CGuestMemory
import Foundation
import Machine

/// Loads a version 1 stream (what terns before the live-section engine wrote, and so any VM
/// saved with `exec:cat > FILE` by them), checking every record before it is applied.
///
/// Guarantees: a page record is applied only if its offset is page-aligned and it lies wholly
/// inside guest RAM (checked with overflow-safe arithmetic); every count and length is bounded
/// before anything is allocated or read; device state is applied only after every section has
/// been read and decoded. Any violation ends the load with a reason.
final class StreamV1Loader {
    private let machine: MigrationTarget
    private let reader: MigrationStreamReader
    private let pageSize = MigrationStreamFormat.pageSize
    private(set) var statistics = IncomingStatistics()
    /// Wall-clock nanoseconds when the source stopped its vCPUs, from the stream.
    private(set) var sourceStoppedAt: UInt64?

    init(target: MigrationTarget, reader: MigrationStreamReader) {
        self.machine = target
        self.reader = reader
    }

    /// Loads the rest of the stream after its header. Returns the run state the source recorded.
    func load(progress: (IncomingStatistics) -> Void) throws(MigrationStreamError) -> RunState {
        var layoutSeen = false
        var sections: [StateSection] = []
        var deviceBytesHeld = 0
        var pagesReceived: UInt64 = 0
        var recordCount = 0
        while true {
            let typeByte = try reader.read(UInt8.self)
            guard let type = MigrationStreamFormat.RecordType(rawValue: typeByte) else {
                throw MigrationStreamError("unknown record type 0x\(String(typeByte, radix: 16)) at byte \(reader.bytesRead - 1)")
            }
            if type != .ramLayout && !layoutSeen {
                throw MigrationStreamError("the stream does not begin with its RAM layout")
            }
            switch type {
            case .ramLayout:
                let size = try reader.read(UInt64.self)
                let page = try reader.read(UInt32.self)
                guard !layoutSeen else { throw MigrationStreamError("a second RAM layout record") }
                guard UInt64(page) == pageSize else { throw MigrationStreamError("page size \(page), expected \(pageSize)") }
                guard size == machine.memory.size else {
                    throw MigrationStreamError("the source has \(size >> 20) MiB of RAM, this machine \(machine.memory.size >> 20) MiB (start it with the same -m)")
                }
                layoutSeen = true
            case .ramPages, .ramZero:
                let offset = try reader.read(UInt64.self)
                let count = try reader.read(UInt32.self)
                guard count > 0, count <= MigrationStreamFormat.maximumPagesPerRecord, offset % pageSize == 0 else {
                    throw MigrationStreamError("a page record with offset 0x\(String(offset, radix: 16)) and \(count) pages is malformed")
                }
                let length = UInt64(count) * pageSize
                guard let destination = machine.memory.pointer(atOffset: offset, length: length) else {
                    throw MigrationStreamError("a page record at offset 0x\(String(offset, radix: 16)) (\(count) pages) lies outside guest RAM")
                }
                if type == .ramPages {
                    try reader.read(into: destination, count: Int(length))
                    statistics.pagesLoaded += UInt64(count)
                } else {
                    zeroGuestPages(machine.memory, offset: offset, length: length)
                    statistics.zeroPagesLoaded += UInt64(count)
                }
                pagesReceived += UInt64(count)
            case .passEnd:
                _ = try reader.read(UInt32.self)
                statistics.bytesRead = reader.bytesRead
                progress(statistics)
            case .device:
                let nameLength = Int(try reader.read(UInt16.self))
                guard nameLength > 0, nameLength <= MigrationStreamFormat.maximumDeviceNameLength else {
                    throw MigrationStreamError("a device section name of \(nameLength) bytes")
                }
                guard let name = String(validating: try reader.readBytes(nameLength), as: UTF8.self) else {
                    throw MigrationStreamError("a device section name is not UTF-8")
                }
                let sectionVersion = try reader.read(UInt32.self)
                let length = try reader.read(UInt32.self)
                guard length <= MigrationStreamFormat.maximumDevicePayload else {
                    throw MigrationStreamError("device section '\(name)' claims \(length) bytes (at most \(MigrationStreamFormat.maximumDevicePayload))")
                }
                guard sections.count < MigrationStreamFormat.maximumDeviceSections else {
                    throw MigrationStreamError("more than \(MigrationStreamFormat.maximumDeviceSections) device sections")
                }
                // The same total cap as version 2: 1,024 sections of 1 MiB would otherwise be
                // 1 GiB held before any name is checked.
                guard deviceBytesHeld + Int(length) <= MigrationStreamFormat.maximumDeviceStateBytes else {
                    throw MigrationStreamError("the stream carries more device state than any machine has (\(sections.count) sections, \(deviceBytesHeld) bytes)")
                }
                deviceBytesHeld += Int(length)
                sections.append(StateSection(name: name, version: sectionVersion, payload: try reader.readBytes(Int(length))))
            case .sourceStopped:
                sourceStoppedAt = try reader.read(UInt64.self)
            case .end:
                let expected = try reader.read(UInt64.self)
                guard expected == pagesReceived else {
                    throw MigrationStreamError("the source sent \(expected) pages but \(pagesReceived) arrived")
                }
                guard !sections.isEmpty else { throw MigrationStreamError("the stream carries no device state") }
                statistics.bytesRead = reader.bytesRead
                do {
                    return try machine.loadDeviceState(sections)
                } catch {
                    throw MigrationStreamError("device state: \(error.message)")
                }
            }
            recordCount += 1
            if recordCount % 4096 == 0 {
                statistics.bytesRead = reader.bytesRead
                progress(statistics)
            }
        }
    }
}
