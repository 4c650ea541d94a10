/// Cuts a byte stream into top-level JSON texts, as QEMU's JSON streamer does: a client may
/// send values back to back, split across reads, with or without newlines between them.
///
/// It tracks only nesting and strings, not grammar; each piece is then parsed on its own. A
/// byte that cannot appear in JSON outside a string ends the piece at once (so the parser
/// reports it) and the rest of that line is skipped, as QEMU's lexer recovers from an error.
/// A piece longer than `maximumSize` is reported once as `.oversized` and skipped without
/// being stored, so a hostile client cannot make the server hold more than that.
public struct JSONStreamSplitter {
    public enum Piece: Equatable {
        case text([UInt8])
        case oversized
    }

    public let maximumSize: Int
    private var buffer: [UInt8] = []
    private var depth = 0
    private var inString = false
    private var escaped = false
    private var inScalar = false
    private var discarding = false
    private var recovering = false

    /// Bytes that may appear outside strings: structure, numbers, and the letters of
    /// true, false and null.
    private static let tokenBytes: Set<UInt8> = Set("{}[],:\"-+.0123456789eEtrufalsn \t\r\n".utf8)

    public init(maximumSize: Int = 1 << 20) {
        self.maximumSize = maximumSize
    }

    /// Consumes bytes and returns every piece they complete.
    public mutating func feed<S: Sequence>(_ bytes: S) -> [Piece] where S.Element == UInt8 {
        var pieces: [Piece] = []
        for byte in bytes {
            if let piece = consume(byte) { pieces.append(piece) }
        }
        return pieces
    }

    private var isIdle: Bool { depth == 0 && !inString && !inScalar }

    private mutating func consume(_ byte: UInt8) -> Piece? {
        if recovering {
            if byte == 0x0a { recovering = false }
            return nil
        }
        let isWhitespace = byte == 0x20 || byte == 0x0a || byte == 0x0d || byte == 0x09
        // Outside a string, a byte that is not JSON; inside one, a raw control character
        // (as QEMU's lexer, which takes only 0x20 and up in strings): an error right away.
        if inString ? byte < 0x20 : !Self.tokenBytes.contains(byte) {
            // Not JSON: hand over what we have, with this byte, for the parser to reject.
            let piece = buffer + [byte]
            let wasDiscarding = discarding
            buffer.removeAll()
            depth = 0
            inScalar = false
            inString = false
            escaped = false
            discarding = false
            recovering = byte != 0x0a
            return wasDiscarding ? nil : .text(piece) // an oversized piece was reported already
        }
        if isIdle && isWhitespace && buffer.isEmpty && !discarding { return nil }

        if !discarding {
            buffer.append(byte)
            if buffer.count > maximumSize {
                buffer.removeAll()
                discarding = true
                advance(byte, isWhitespace: isWhitespace)
                if isIdle { discarding = false }
                return .oversized
            }
        }
        advance(byte, isWhitespace: isWhitespace)
        guard isIdle else { return nil }
        if discarding {
            discarding = false
            return nil
        }
        let piece = buffer
        buffer.removeAll(keepingCapacity: buffer.capacity <= 64 << 10)
        // A scalar ends at whitespace, which is not part of it.
        let trimmed = isWhitespace ? Array(piece.dropLast()) : piece
        return trimmed.isEmpty ? nil : .text(trimmed)
    }

    private mutating func advance(_ byte: UInt8, isWhitespace: Bool) {
        if inString {
            if escaped { escaped = false } else if byte == UInt8(ascii: "\\") { escaped = true } else if byte == UInt8(ascii: "\"") {
                inString = false
            }
            return
        }
        switch byte {
        case UInt8(ascii: "\""):
            inString = true
        case UInt8(ascii: "{"), UInt8(ascii: "["):
            if inScalar { inScalar = false }
            depth += 1
        case UInt8(ascii: "}"), UInt8(ascii: "]"):
            depth = max(depth - 1, 0)
        default:
            if depth == 0 {
                inScalar = !isWhitespace
            }
        }
    }
}
