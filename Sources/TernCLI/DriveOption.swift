import Machine

/// `-drive file=PATH,format=raw,if=virtio[,readonly=on][,cache=MODE][,id=ID]`: QEMU's
/// spelling of a disk, parsed into a `DriveConfiguration`; or, with `if=none,id=ID`, a drive
/// that `-device virtio-blk-device,drive=ID` attaches (QEMU's microvm spelling). The image
/// itself is opened (and its errors reported, naming the file) when the machine is built.
enum DriveOption {
    /// A parsed `-drive`: attached at once (`if=virtio`) or waiting for its `-device`.
    struct Parsed {
        var drive: DriveConfiguration
        var waitsForDevice: Bool
    }

    static func parse(_ text: String, index: Int) throws(CommandLineError) -> Parsed {
        let context = "tern run: -drive \(text)"
        let list = try QEMUOptionList(parsing: text, option: "drive", impliedKey: "file")
        try list.check(known: ["file", "format", "if", "readonly", "cache", "id", "media", "index"], option: "drive", text: text)
        guard let path = list.implied ?? list["file"], !path.isEmpty else {
            throw CommandLineError("\(context): needs file=PATH (a raw disk image)")
        }
        if let format = list["format"], format != "raw" {
            throw CommandLineError("\(context): tern reads raw images only (format=raw); convert with 'qemu-img convert -O raw \(path) IMAGE.raw'")
        }
        let waitsForDevice = list["if"] == "none"
        if let interface = list["if"], interface != "virtio" && interface != "none" {
            throw CommandLineError("\(context): tern's disks are virtio-blk devices: if=virtio, or if=none with -device virtio-blk-device,drive=ID (not if=\(interface))")
        }
        if waitsForDevice && list["id"] == nil {
            throw CommandLineError("\(context): if=none needs id=ID for -device virtio-blk-device,drive=ID")
        }
        if let media = list["media"], media != "disk" {
            throw CommandLineError("\(context): tern has no CD-ROM; media=disk only")
        }
        var readOnly = false
        if let value = list["readonly"] {
            guard let on = QEMUOptionList.isOn(value) else { throw CommandLineError("\(context): readonly takes on or off") }
            readOnly = on
        }
        var cache = DriveCacheMode.writeback
        if let value = list["cache"] {
            guard let mode = DriveCacheMode(rawValue: value) else {
                throw CommandLineError("\(context): cache=\(value) is not one of \(DriveCacheMode.allCases.map(\.rawValue).joined(separator: ", "))")
            }
            cache = mode
        }
        return Parsed(drive: DriveConfiguration(path: path, readOnly: readOnly, cache: cache,
                                                id: list["id"] ?? "drive-virtio-disk\(index)"),
                      waitsForDevice: waitsForDevice)
    }

    /// `-device virtio-blk-device,drive=ID[,id=..]`: attaches the `if=none` drive ID.
    static func attach(_ list: QEMUOptionList, text: String, waiting: inout [DriveConfiguration],
                       to drives: inout [DriveConfiguration]) throws(CommandLineError) {
        let context = "tern run: -device \(text)"
        try list.check(known: ["drive", "id", "serial"], option: "device", text: text)
        guard let id = list["drive"] else { throw CommandLineError("\(context): needs drive=ID (a -drive if=none,id=ID)") }
        guard let index = waiting.firstIndex(where: { $0.id == id }) else {
            throw CommandLineError("\(context): no -drive if=none,id=\(id) is waiting for a device")
        }
        drives.append(waiting.remove(at: index))
    }
}
