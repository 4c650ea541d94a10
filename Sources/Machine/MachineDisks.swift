import Foundation

/// Where the virtio-mmio devices sit: Firecracker's layout (4 KiB windows from 0xd0000000, in
/// the hole below 4 GiB) and legacy interrupt lines that nothing else uses here (COM1 is 4).
enum VirtioSlots {
    static let base: UInt64 = 0xd000_0000
    static let interruptLines: [UInt32] = [5, 6, 7, 10]
    static var maximumCount: Int { interruptLines.count }
}

/// The machine's disks: MMIO dispatch, the image locks across a migration, saved state.
extension Machine {
    static func logDeviceProblem(_ message: String) {
        FileHandle.standardError.write(Data("tern: \(message)\n".utf8))
    }

    /// The virtio-mmio device whose window holds `address`.
    func virtioDevice(at address: UInt64) -> VirtioMMIODevice? {
        guard address >= VirtioSlots.base else { return nil }
        let index = Int((address - VirtioSlots.base) / VirtioMMIODevice.windowSize)
        return index < virtioDevices.count ? virtioDevices[index] : nil
    }

    /// Takes every image's lock; the guest runs only on images it holds.
    public func activateDisks() throws(DiskImageError) {
        for disk in disks { try disk.activate() }
    }

    /// Flushes every image (unless `flush` is false) and releases its lock, so a migration's
    /// destination can take it. The vCPUs must be stopped.
    public func flushAndDeactivateDisks(flush: Bool = true) throws(DiskImageError) {
        if flush { for disk in disks { try disk.flush() } }
        for disk in disks { disk.deactivate() }
    }

    /// The saved-state section names of the disks' devices.
    var diskSectionNames: [String] { disks.indices.map { "virtio-blk/\($0)" } }

    /// Each disk's section: its image size (so a destination with another size says so), then
    /// the transport's registers.
    func saveDiskState() -> [StateSection] {
        zip(disks, virtioDevices).enumerated().map { index, pair in
            var writer = StateWriter()
            writer.append(pair.0.size)
            pair.1.encodeState(into: &writer)
            return StateSection(name: diskSectionNames[index], version: Self.machineSectionVersion, payload: writer.bytes)
        }
    }

    /// Decodes the disks' sections, checking each against this machine's image.
    func decodeDiskState(_ byName: [String: StateSection]) throws(StateLoadError) -> [VirtioMMIODevice.Registers] {
        var decoded: [VirtioMMIODevice.Registers] = []
        for (index, name) in diskSectionNames.enumerated() {
            guard let section = byName[name] else { throw StateLoadError("section '\(name)' is missing") }
            var reader = try StateReader(section, version: Self.machineSectionVersion)
            let size = try reader.read(UInt64.self)
            guard size == disks[index].size else {
                throw StateLoadError("disk \(index): the source's image is \(size) bytes, this destination's '\(disks[index].path)' is \(disks[index].size) bytes")
            }
            decoded.append(try VirtioMMIODevice.decodeState(from: &reader))
            try reader.finish()
        }
        return decoded
    }

    func applyDiskState(_ registers: [VirtioMMIODevice.Registers]) {
        for (device, saved) in zip(virtioDevices, registers) { device.apply(saved) }
    }
}
