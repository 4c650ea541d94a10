import CZlib
import CZstd

/// Which compressor the `compress` capability uses: zlib, as QEMU 2015 does, or zstd
/// (chosen with the `multifd-compression` parameter, QEMU's later name for the method).
public enum CompressionMethod: String, Sendable, CaseIterable {
    case none
    case zlib
    case zstd

    var encoding: PageEncoding { self == .zstd ? .zstd : .zlib }
}

/// Compresses single pages; one per thread (the contexts are not shareable).
protocol PageCompressor: AnyObject {
    /// Compresses `length` bytes into `output` (capacity `capacity`); nil if it does not fit.
    func compress(_ input: UnsafeRawPointer, length: Int, into output: UnsafeMutableRawPointer, capacity: Int) -> Int?
}

/// Decompresses single pages; one per thread.
protocol PageDecompressor: AnyObject {
    /// Decompresses `input` into exactly `length` bytes at `output`. Fails, writing at most
    /// `length` bytes, if the data is malformed or would decompress to any other size.
    func decompress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawPointer, length: Int) -> Bool
}

enum PageCodecs {
    static func compressor(_ encoding: PageEncoding, level: Int) -> PageCompressor {
        encoding == .zstd ? ZstdPageCompressor(level: level) : ZlibPageCompressor(level: level)
    }

    static func decompressor(_ encoding: PageEncoding) -> PageDecompressor {
        encoding == .zstd ? ZstdPageDecompressor() : ZlibPageDecompressor()
    }
}

final class ZlibPageCompressor: PageCompressor {
    private var stream = z_stream()
    private var ready = false

    init(level: Int) {
        ready = deflateInit_(&stream, Int32(level), zlibVersion(), Int32(MemoryLayout<z_stream>.size)) == Z_OK
    }

    deinit { if ready { deflateEnd(&stream) } }

    func compress(_ input: UnsafeRawPointer, length: Int, into output: UnsafeMutableRawPointer, capacity: Int) -> Int? {
        guard ready, deflateReset(&stream) == Z_OK else { return nil }
        stream.next_in = UnsafeMutablePointer(mutating: input.assumingMemoryBound(to: Bytef.self))
        stream.avail_in = uInt(length)
        stream.next_out = output.assumingMemoryBound(to: Bytef.self)
        stream.avail_out = uInt(capacity)
        guard deflate(&stream, Z_FINISH) == Z_STREAM_END else { return nil }
        return capacity - Int(stream.avail_out)
    }
}

final class ZlibPageDecompressor: PageDecompressor {
    private var stream = z_stream()
    private var ready = false

    init() {
        ready = inflateInit_(&stream, zlibVersion(), Int32(MemoryLayout<z_stream>.size)) == Z_OK
    }

    deinit { if ready { inflateEnd(&stream) } }

    func decompress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawPointer, length: Int) -> Bool {
        guard ready, inflateReset(&stream) == Z_OK, let base = input.baseAddress, !input.isEmpty else { return false }
        stream.next_in = UnsafeMutablePointer(mutating: base.assumingMemoryBound(to: Bytef.self))
        stream.avail_in = uInt(input.count)
        stream.next_out = output.assumingMemoryBound(to: Bytef.self)
        stream.avail_out = uInt(length)
        // The output buffer is the page: a stream that would grow past it stops with Z_BUF_ERROR
        // or Z_OK, never writes more. It must end exactly at the page with all input used.
        let result = inflate(&stream, Z_FINISH)
        return result == Z_STREAM_END && stream.avail_out == 0 && stream.avail_in == 0
    }
}

final class ZstdPageCompressor: PageCompressor {
    private let context: OpaquePointer?
    private let level: Int32

    init(level: Int) {
        context = ZSTD_createCCtx()
        self.level = Int32(max(level, 1)) // zstd's level 0 means "default"; tern's 0 is "fastest"
    }

    deinit { ZSTD_freeCCtx(context) }

    func compress(_ input: UnsafeRawPointer, length: Int, into output: UnsafeMutableRawPointer, capacity: Int) -> Int? {
        guard let context else { return nil }
        let result = ZSTD_compressCCtx(context, output, capacity, input, length, level)
        return ZSTD_isError(result) != 0 ? nil : result
    }
}

final class ZstdPageDecompressor: PageDecompressor {
    private let context: OpaquePointer?

    init() { context = ZSTD_createDCtx() }

    deinit { ZSTD_freeDCtx(context) }

    func decompress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawPointer, length: Int) -> Bool {
        guard let context, let base = input.baseAddress, !input.isEmpty else { return false }
        // dstCapacity bounds the output: a frame claiming more fails with dstSize_tooSmall.
        let result = ZSTD_decompressDCtx(context, output, length, base, input.count)
        return ZSTD_isError(result) == 0 && result == length
    }
}
