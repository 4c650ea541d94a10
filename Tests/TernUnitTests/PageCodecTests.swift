import CPageCodec
import CZlib
import CZstd
import Foundation
import Testing
@testable import Migration

/// The byte-level codecs of stream v2, with no KVM: CRC32C, XBZRLE and page compression,
/// each against hostile input that must be refused without writing outside its page.
@Suite("Page codecs")
struct PageCodecTests {
    static let pageSize = 4096

    func randomPage(seed: UInt64) -> [UInt8] {
        var state = seed | 1
        return (0..<Self.pageSize).map { _ in
            state ^= state << 13; state ^= state >> 7; state ^= state << 17
            return UInt8(truncatingIfNeeded: state)
        }
    }

    func crc(_ bytes: [UInt8], from start: UInt32 = 0) -> UInt32 {
        bytes.withUnsafeBytes { cpage_crc32c(start, $0.baseAddress, $0.count) }
    }

    @Test("CRC32C: the standard check value, and chaining equals one pass")
    func crc32c() {
        #expect(crc(Array("123456789".utf8)) == 0xE306_9283)
        #expect(crc([]) == 0)
        let data = randomPage(seed: 7) + Array(randomPage(seed: 8).prefix(123))
        for split in [0, 1, 7, 8, 33, 4096, data.count] {
            #expect(crc(Array(data[split...]), from: crc(Array(data[..<split]))) == crc(data))
        }
        var flipped = data
        flipped[1000] ^= 0x10
        #expect(crc(flipped) != crc(data))
        // Long buffers take the three-lane path (lanes of 8 KiB and 256 bytes, joined by
        // shift tables): they must agree with a bitwise reference at every length and split.
        var long: [UInt8] = []
        for seed in 0..<30 { long += randomPage(seed: UInt64(seed) + 100) }
        for length in [24575, 24576, 24577, 25000, 49152 + 768 + 5, long.count] {
            let slice = Array(long[..<length])
            #expect(crc(slice) == Self.bitwiseCRC32C(slice), "length \(length)")
        }
        #expect(crc(Array(long[30000...]), from: crc(Array(long[..<30000]))) == crc(long))
    }

    /// CRC32C one bit at a time, as the definition says.
    static func bitwiseCRC32C(_ bytes: [UInt8]) -> UInt32 {
        var crc: UInt32 = 0xFFFF_FFFF
        for byte in bytes {
            crc ^= UInt32(byte)
            for _ in 0..<8 { crc = (crc >> 1) ^ (0x82F6_3B78 & (0 &- (crc & 1))) }
        }
        return ~crc
    }

    func encode(old: [UInt8], new: [UInt8], capacity: Int = 4096) -> [UInt8]? {
        var out = [UInt8](repeating: 0, count: capacity)
        let length = old.withUnsafeBufferPointer { o in new.withUnsafeBufferPointer { n in out.withUnsafeMutableBufferPointer { d in
            cpage_xbzrle_encode(o.baseAddress, n.baseAddress, Self.pageSize, d.baseAddress, capacity)
        } } }
        return length < 0 ? nil : Array(out[..<length])
    }

    /// Decodes into a copy of `page` placed between guard bytes; returns nil on refusal, and
    /// checks that a refusal left the page (and the guards) untouched.
    func decode(_ encoded: [UInt8], onto page: [UInt8]) -> [UInt8]? {
        var buffer = [UInt8](repeating: 0xEE, count: 64) + page + [UInt8](repeating: 0xEE, count: 64)
        let result = encoded.withUnsafeBufferPointer { e in buffer.withUnsafeMutableBufferPointer { b in
            cpage_xbzrle_decode(e.baseAddress, e.count, b.baseAddress! + 64, Self.pageSize)
        } }
        #expect(buffer[..<64].allSatisfy { $0 == 0xEE } && buffer[(64 + Self.pageSize)...].allSatisfy { $0 == 0xEE },
                "a decode wrote outside its page")
        if result != 0 {
            #expect(Array(buffer[64..<(64 + Self.pageSize)]) == page, "a refused delta changed the page")
            return nil
        }
        return Array(buffer[64..<(64 + Self.pageSize)])
    }

    @Test("XBZRLE round trips: a few changed cache lines, scattered bytes, the last byte, nothing")
    func xbzrleRoundTrip() throws {
        let old = randomPage(seed: 1)
        var lines = old
        for index in 0..<128 { lines[index] ^= 0x5A } // two cache lines
        var scattered = old
        for index in stride(from: 3, to: 4096, by: 97) { scattered[index] &+= 1 }
        var last = old
        last[4095] ^= 1
        for new in [lines, scattered, last] {
            let delta = try #require(encode(old: old, new: new))
            #expect(delta.count < 4096)
            #expect(decode(delta, onto: old) == new)
        }
        #expect(encode(old: old, new: old) == [])
        #expect(try #require(encode(old: old, new: lines)).count < 140, "two changed lines should cost about 130 bytes")
        // A whole new page does not fit in three quarters of one: overflow.
        #expect(encode(old: old, new: randomPage(seed: 2), capacity: 3072) == nil)
    }

    @Test("XBZRLE hostile deltas: runs past the page, bad lengths, truncation — refused, page untouched")
    func xbzrleHostile() {
        let page = randomPage(seed: 3)
        let cases: [[UInt8]] = [
            [0x80, 0x20, 0x01, 0xAA], // unchanged 4096, then a changed byte past the end
            [0x00, 0x81, 0x20] + [UInt8](repeating: 1, count: 4097), // changed run of 4097
            [0xFF, 0x1F, 0x01, 0x01], // unchanged run of 4095, changed 1: fits (control case below)
            [0x00, 0x00], // a zero-length changed run
            [0x05], // truncated after the first length
            [0x00, 0x04, 1, 2], // changed run claims 4 bytes, 2 present
            [0x80, 0x80, 0x80, 0x80, 0x01, 0x01, 0x00], // a length too long to be a page offset
            [0xFF, 0xFF, 0xFF, 0xFF, 0x0F, 0x01, 0x00], // ULEB128 overflow
        ]
        for (index, encoded) in cases.enumerated() {
            let result = decode(encoded, onto: page)
            if index == 2 {
                #expect(result != nil && result![4095] == 0x01, "the last byte of the page is in bounds")
            } else {
                #expect(result == nil, "hostile delta \(index) was accepted")
            }
        }
        // A valid first pair followed by a bad second one changes nothing either.
        #expect(decode([0x00, 0x01, 0x77, 0x80, 0x40, 0x01, 0x01], onto: page) == nil)
    }

    func compress(_ encoding: PageEncoding, _ page: [UInt8]) -> [UInt8]? {
        let compressor = PageCodecs.compressor(encoding, level: 1)
        var out = [UInt8](repeating: 0, count: 8192)
        let length = page.withUnsafeBytes { p in out.withUnsafeMutableBytes { o in
            compressor.compress(p.baseAddress!, length: p.count, into: o.baseAddress!, capacity: o.count)
        } }
        return length.map { Array(out[..<$0]) }
    }

    func decompress(_ encoding: PageEncoding, _ data: [UInt8]) -> [UInt8]? {
        let decompressor = PageCodecs.decompressor(encoding)
        var buffer = [UInt8](repeating: 0xEE, count: Self.pageSize + 64)
        let ok = data.withUnsafeBytes { d in buffer.withUnsafeMutableBytes { b in
            decompressor.decompress(d, into: b.baseAddress!, length: Self.pageSize)
        } }
        #expect(buffer[Self.pageSize...].allSatisfy { $0 == 0xEE }, "decompression wrote past the page")
        return ok ? Array(buffer[..<Self.pageSize]) : nil
    }

    @Test("zlib and zstd: pages round trip; compressible pages shrink", arguments: [PageEncoding.zlib, .zstd])
    func compressionRoundTrip(_ encoding: PageEncoding) throws {
        var compressible = [UInt8](repeating: 0, count: Self.pageSize)
        for index in 0..<Self.pageSize { compressible[index] = UInt8(index % 7) }
        for page in [randomPage(seed: 4), compressible] {
            let data = try #require(compress(encoding, page))
            #expect(decompress(encoding, data) == page)
        }
        #expect(try #require(compress(encoding, compressible)).count < 200)
    }

    @Test("zlib and zstd bombs, truncation and garbage are refused within the page", arguments: [PageEncoding.zlib, .zstd])
    func compressionHostile(_ encoding: PageEncoding) throws {
        // A bomb: 1 MiB of zeros compresses to a few hundred bytes and must not unpack into a page.
        let bomb: [UInt8]
        if encoding == .zlib {
            var source = [UInt8](repeating: 0, count: 1 << 20)
            var length = compressBound(UInt(source.count))
            var out = [UInt8](repeating: 0, count: Int(length))
            #expect(compress2(&out, &length, &source, UInt(source.count), 9) == 0)
            bomb = Array(out[..<Int(length)])
        } else {
            let source = [UInt8](repeating: 0, count: 1 << 20)
            var out = [UInt8](repeating: 0, count: 1 << 16)
            let length = ZSTD_compress(&out, out.count, source, source.count, 3)
            bomb = Array(out[..<length])
        }
        #expect(bomb.count < 8192)
        #expect(decompress(encoding, bomb) == nil)
        let good = try #require(compress(encoding, randomPage(seed: 5)))
        #expect(decompress(encoding, Array(good.dropLast(10))) == nil)
        #expect(decompress(encoding, Array(good.prefix(3))) == nil)
        #expect(decompress(encoding, good + [0, 1, 2]) == nil, "trailing bytes after the page")
        #expect(decompress(encoding, []) == nil)
        #expect(decompress(encoding, randomPage(seed: 6)) == nil)
        // Half a page of output is not a page either.
        let compressor = PageCodecs.compressor(encoding, level: 1)
        let halfPage = Array(randomPage(seed: 9).prefix(2048))
        var out = [UInt8](repeating: 0, count: 4096)
        let length = try #require(halfPage.withUnsafeBytes { p in out.withUnsafeMutableBytes { o in
            compressor.compress(p.baseAddress!, length: p.count, into: o.baseAddress!, capacity: o.count)
        } })
        #expect(decompress(encoding, Array(out[..<length])) == nil)
    }
}
