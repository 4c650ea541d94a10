import Machine

/// `-drive file=PATH,format=raw,if=virtio[,readonly=on][,cache=MODE][,id=ID]`: QEMU's
/// spelling of a disk, parsed into a `DriveConfiguration`. The image itself is opened (and
/// its errors reported, naming the file) when the machine is built.
enum DriveOption {
    static func parse(_ text: String, index: Int) throws(CommandLineError) -> DriveConfiguration {
        let context = "tern run: -drive \(text)"
        let list = try QEMUOptionList(parsing: text, option: "drive", impliedKey: "file")
        try list.check(known: ["file", "format", "if", "readonly", "cache", "id", "media", "index"], option: "drive", text: text)
        guard let path = list.implied ?? list["file"], !path.isEmpty else {
            throw CommandLineError("\(context): needs file=PATH (a raw disk image)")
        }
        if let format = list["format"], format != "raw" {
            throw CommandLineError("\(context): tern reads raw images only (format=raw); convert with 'qemu-img convert -O raw \(path) IMAGE.raw'")
        }
        if let interface = list["if"], interface != "virtio" {
            throw CommandLineError("\(context): tern's disks are virtio-blk devices: if=virtio (not if=\(interface))")
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
        return DriveConfiguration(path: path, readOnly: readOnly, cache: cache, id: list["id"] ?? "drive-virtio-disk\(index)")
    }
}
