import CLZMA

/// Unpacks a bzImage's compressed payload (the `vmlinux` ELF) on the host.
///
/// The setup header gives the payload's place (`payload_offset` at 0x248, relative to the
/// protected-mode code, and `payload_length` at 0x24c). tern decompresses xz payloads, the
/// format of Debian's kernels; for any other format it returns nil and the kernel decompresses
/// itself in the guest.
enum KernelPayload {
    static let payloadOffsetField = 0x248
    static let payloadLengthField = 0x24c
    static let xzMagic: [UInt8] = [0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]
    /// No real vmlinux is near this; a larger result means a hostile or corrupt file.
    static let maximumSize = 1 << 30

    static func decompressedVmlinux(of image: BzImage, path: String) throws(KernelImageError) -> [UInt8]? {
        guard image.protocolVersion >= 0x0208,
              let offset = image.bytes.littleEndian(UInt32.self, at: payloadOffsetField),
              let length = image.bytes.littleEndian(UInt32.self, at: payloadLengthField) else { return nil }
        let start = (image.setupSectors + 1) * 512 + Int(offset)
        let end = start + Int(length)
        guard length >= 16, end <= image.bytes.count,
              Array(image.bytes[start..<(start + xzMagic.count)]) == xzMagic else { return nil }
        // The build appends the decompressed size, little-endian, as the payload's last 4 bytes.
        let hint = Int(image.bytes.littleEndian(UInt32.self, at: end - 4)!)
        return try decompressXZ(image.bytes[start..<end], sizeHint: hint, path: path)
    }

    static func decompressXZ(_ input: ArraySlice<UInt8>, sizeHint: Int, path: String) throws(KernelImageError) -> [UInt8] {
        var stream = lzma_stream()
        guard lzma_stream_decoder(&stream, UInt64.max, 0) == LZMA_OK else {
            throw .unreadable(path: path, reason: "cannot start the xz decoder")
        }
        defer { lzma_end(&stream) }
        var output = [UInt8](repeating: 0, count: min(max(sizeHint, 1 << 20), maximumSize))
        var produced = 0
        let result: lzma_ret = input.withUnsafeBufferPointer { source in
            stream.next_in = source.baseAddress
            stream.avail_in = source.count
            while true {
                let status = output.withUnsafeMutableBufferPointer { destination -> lzma_ret in
                    stream.next_out = destination.baseAddress! + produced
                    stream.avail_out = destination.count - produced
                    let status = lzma_code(&stream, LZMA_FINISH)
                    produced = destination.count - stream.avail_out
                    return status
                }
                if status == LZMA_OK && stream.avail_out == 0 && output.count < maximumSize {
                    output += [UInt8](repeating: 0, count: min(output.count, maximumSize - output.count))
                    continue
                }
                return status
            }
        }
        guard result == LZMA_STREAM_END else {
            throw .notBzImage(path: path, reason: "its xz payload is corrupt (liblzma error \(result.rawValue))")
        }
        output.removeSubrange(produced...)
        return output
    }
}
