/// The first record of a version 2 stream: everything the destination must match before a
/// single page is loaded, so a mismatch fails at once and says what differs.
struct StreamConfiguration: Equatable {
    /// A live section as the stream names it: the id its records carry, its name and version.
    struct Section: Equatable {
        var id: UInt16
        var name: String
        var version: UInt32
    }

    var ramSize: UInt64
    var pageSize: UInt32 = UInt32(MigrationStreamFormat.pageSize)
    var cpuCount: UInt32
    /// The device-state sections the source will send (`cpu/0`, `pit`, ...).
    var deviceSections: [String]
    /// Every capability on at the source.
    var capabilities: [String]
    /// The page encodings the source may use.
    var encodings: [PageEncoding]
    var sections: [Section]
    /// The source listens for return-path messages on this connection.
    var returnPath: Bool

    /// Capabilities that change what the destination must do, so both sides must agree on them.
    static let negotiatedCapabilities: Set<String> = [MigrationCapability.compress.rawValue, MigrationCapability.multifd.rawValue]

    static let maximumNames = 1024
    static let maximumNameLength = 64

    func encode(into writer: MigrationStreamWriter) {
        writer.append(ramSize)
        writer.append(pageSize)
        writer.append(cpuCount)
        writer.append(UInt8(returnPath ? 1 : 0))
        func strings(_ list: [String]) {
            writer.append(UInt16(list.count))
            for item in list {
                let bytes = Array(item.utf8.prefix(Self.maximumNameLength))
                writer.append(UInt8(bytes.count))
                writer.append(bytes: bytes)
            }
        }
        strings(deviceSections)
        strings(capabilities)
        writer.append(UInt16(encodings.count))
        for encoding in encodings { writer.append(encoding.rawValue) }
        writer.append(UInt16(sections.count))
        for section in sections {
            writer.append(section.id)
            let bytes = Array(section.name.utf8.prefix(Self.maximumNameLength))
            writer.append(UInt8(bytes.count))
            writer.append(bytes: bytes)
            writer.append(section.version)
        }
    }

    static func decode(_ cursor: ByteCursor) throws(MigrationStreamError) -> StreamConfiguration {
        let ramSize = try cursor.read(UInt64.self, "RAM size")
        let pageSize = try cursor.read(UInt32.self, "page size")
        let cpuCount = try cursor.read(UInt32.self, "vCPU count")
        let flags = try cursor.read(UInt8.self, "flags")
        func strings(_ what: String) throws(MigrationStreamError) -> [String] {
            let count = Int(try cursor.read(UInt16.self, "\(what) count"))
            guard count <= maximumNames else { throw MigrationStreamError("the configuration lists \(count) \(what)") }
            var list: [String] = []
            for _ in 0..<count { list.append(try cursor.string(maximum: maximumNameLength, "a \(what) name")) }
            return list
        }
        let devices = try strings("device sections")
        let capabilities = try strings("capabilities")
        let encodingCount = Int(try cursor.read(UInt16.self, "encoding count"))
        var encodings: [PageEncoding] = []
        for _ in 0..<encodingCount {
            let raw = try cursor.read(UInt8.self, "encoding")
            guard let encoding = PageEncoding(rawValue: raw) else {
                throw MigrationStreamError("the source uses page encoding 0x\(String(raw, radix: 16)), which this tern does not know")
            }
            encodings.append(encoding)
        }
        let sectionCount = Int(try cursor.read(UInt16.self, "section count"))
        guard sectionCount <= 64 else { throw MigrationStreamError("the configuration lists \(sectionCount) live sections") }
        var sections: [Section] = []
        for _ in 0..<sectionCount {
            let id = try cursor.read(UInt16.self, "section id")
            let name = try cursor.string(maximum: maximumNameLength, "a live section name")
            let version = try cursor.read(UInt32.self, "section version")
            guard !sections.contains(where: { $0.id == id }) else { throw MigrationStreamError("live section id \(id) appears twice") }
            sections.append(Section(id: id, name: name, version: version))
        }
        try cursor.finish("the configuration record")
        return StreamConfiguration(ramSize: ramSize, pageSize: pageSize, cpuCount: cpuCount, deviceSections: devices,
                                   capabilities: capabilities, encodings: encodings, sections: sections,
                                   returnPath: flags & 1 != 0)
    }

    /// Why a destination with `local`'s machine and capabilities cannot load this stream, or nil.
    func mismatch(ramSize localRAM: UInt64, cpuCount localCPUs: Int, deviceSections localDevices: [String],
                  capabilities localCapabilities: [String]) -> String? {
        if pageSize != UInt32(MigrationStreamFormat.pageSize) {
            return "the source uses \(pageSize)-byte pages, this tern \(MigrationStreamFormat.pageSize)"
        }
        if ramSize != localRAM {
            return "the source has \(ramSize >> 20) MiB of RAM, this machine \(localRAM >> 20) MiB (start it with the same -m)"
        }
        if cpuCount != UInt32(localCPUs) {
            return "the source has \(cpuCount) vCPUs, this machine \(localCPUs) (start it with the same -smp)"
        }
        if let extra = deviceSections.first(where: { !localDevices.contains($0) }) {
            return "the source sends device state '\(extra)' that this machine does not have"
        }
        if let missing = localDevices.first(where: { !deviceSections.contains($0) }) {
            return "this machine needs device state '\(missing)' that the source does not send"
        }
        for name in Self.negotiatedCapabilities.sorted() {
            let source = capabilities.contains(name)
            let destination = localCapabilities.contains(name)
            if source && !destination {
                return "the source uses capability '\(name)' but it is off here (set it with migrate-set-capabilities before migrate-incoming)"
            }
            if destination && !source {
                return "capability '\(name)' is on here but the source does not use it (set it on both sides or neither)"
            }
        }
        // Postcopy needs the destination's consent (it registers userfaultfd and answers page
        // requests); a destination ready for postcopy takes a pre-copy stream as well.
        let postcopy = MigrationCapability.postcopyRAM.rawValue
        if capabilities.contains(postcopy) && !localCapabilities.contains(postcopy) {
            return "the source uses capability '\(postcopy)' but it is off here (set it with migrate-set-capabilities before migrate-incoming)"
        }
        return nil
    }
}
