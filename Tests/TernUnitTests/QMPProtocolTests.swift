import Testing
@testable import QMP

@Suite("QMP protocol pieces")
struct QMPProtocolTests {
    @Test("JSON round-trips with QEMU's spacing and escapes")
    func jsonRoundTrip() throws {
        let text = #"{"execute": "pmemsave", "arguments": {"val": 1048576, "size": -1, "big": 18446744073709551615, "f": 1.5, "ok": true, "n": null, "s": "a\"b\\c\n\u0001é"}, "id": [1, "x"]}"#
        let value = try JSONParser.parse(Array(text.utf8))
        #expect(value.objectValue?["arguments"]?.objectValue?["big"] == .uint(UInt64.max))
        #expect(value.objectValue?["arguments"]?.objectValue?["s"] == .string("a\"b\\c\n\u{01}é"))
        #expect(value.serialized == text)
        #expect(try JSONParser.parse(Array(value.serialized.utf8)) == value)
    }

    @Test("surrogate pairs decode to one scalar")
    func surrogates() throws {
        #expect(try JSONParser.parse(Array(#""\ud83d\ude00""#.utf8)) == .string("😀"))
    }

    @Test("malformed JSON is refused with a reason", arguments: [
        "{", "{\"a\" 1}", "[1,]", "tru", "\"unterminated", "{\"a\":1} x", "01x", "\"\\x\"", "\"\\ud800\"", "-",
    ])
    func malformed(text: String) {
        #expect(throws: JSONParseError.self) { try JSONParser.parse(Array(text.utf8)) }
    }

    /// Found by the qmp-json fuzz target (fuzz/regressions/qmp-json-infinity): -3e10404 parsed
    /// as -infinity, which serialises as null.
    @Test("a number beyond a double's range is refused, not turned into infinity", arguments: [
        "-3e10404", "1e400", "[1, 2.5e308]", String(repeating: "9", count: 400),
    ])
    func outOfRange(text: String) {
        #expect(throws: JSONParseError.self) { try JSONParser.parse(Array(text.utf8)) }
    }

    @Test("the largest finite doubles still parse")
    func largestDoubles() throws {
        #expect(try JSONParser.parse(Array("1.7976931348623157e308".utf8)) == .double(.greatestFiniteMagnitude))
        #expect(try JSONParser.parse(Array("-1e-400".utf8)) == .double(-0.0))
    }

    @Test("deep nesting is refused instead of exhausting the stack")
    func deepNesting() {
        let text = String(repeating: "[", count: 100_000) + String(repeating: "]", count: 100_000)
        #expect(throws: JSONParseError.self) { try JSONParser.parse(Array(text.utf8)) }
    }

    @Test("the splitter cuts back-to-back values however the bytes arrive")
    func splitting() {
        let stream = Array(#"{"execute": "a"}{"execute":"b", "x": "}{"} [1] "s" 42"#.utf8) + [0x0a]
        for chunkSize in [1, 3, 7, stream.count] {
            var splitter = JSONStreamSplitter()
            var pieces: [String] = []
            var index = 0
            while index < stream.count {
                let end = min(index + chunkSize, stream.count)
                for piece in splitter.feed(stream[index..<end]) {
                    if case let .text(bytes) = piece { pieces.append(String(decoding: bytes, as: UTF8.self)) }
                }
                index = end
            }
            #expect(pieces == [#"{"execute": "a"}"#, #"{"execute":"b", "x": "}{"}"#, "[1]", "\"s\"", "42"])
        }
    }

    @Test("a byte that is not JSON ends the piece and the rest of its line is skipped")
    func recovery() {
        var splitter = JSONStreamSplitter()
        let pieces = splitter.feed(Array("{bad json [1]\n{\"ok\": 1}\n".utf8))
        #expect(pieces == [.text(Array("{b".utf8)), .text(Array("{\"ok\": 1}".utf8))])
    }

    @Test("a raw control character inside a string is an error at once, and the next request is read")
    func controlCharacterInString() {
        var splitter = JSONStreamSplitter()
        let pieces = splitter.feed(Array("{\"execute\": \"query-status}\n{\"execute\": \"x\"}\n".utf8))
        #expect(pieces == [.text(Array("{\"execute\": \"query-status}\n".utf8)), .text(Array("{\"execute\": \"x\"}".utf8))])
    }

    @Test("an oversized value is reported once and never stored")
    func oversized() {
        var splitter = JSONStreamSplitter(maximumSize: 1024)
        var pieces = splitter.feed(Array("{\"a\": \"".utf8))
        for _ in 0..<1000 { pieces += splitter.feed([UInt8](repeating: 0x61, count: 1024)) }
        pieces += splitter.feed(Array("\"}\n{\"b\": 2}".utf8))
        #expect(pieces == [.oversized, .text(Array("{\"b\": 2}".utf8))])
    }

    @Test("arguments: missing, unexpected and wrongly typed, with QEMU's messages")
    func argumentValidation() throws {
        let declared: [QMPArgument] = [.required("val", .integer), .required("filename", .string), .optional("cpu-index", .integer)]
        func error(_ given: JSONObject) -> String? {
            do {
                _ = try QMPArguments(validating: given, against: declared)
                return nil
            } catch {
                return error.desc
            }
        }
        #expect(error(["val": 1, "filename": "f"]) == nil)
        #expect(error(["val": 1, "filename": "f", "cpu-index": 0]) == nil)
        #expect(error(["filename": "f"]) == "Parameter 'val' is missing")
        #expect(error(["val": 1, "filename": "f", "foo": 1]) == "Parameter 'foo' is unexpected")
        #expect(error(["val": "1", "filename": "f"]) == "Invalid parameter type for 'val', expected: integer")
        #expect(error(["val": 1, "filename": 2]) == "Invalid parameter type for 'filename', expected: string")
    }

    @Test("-qmp endpoints in both spellings, and what is refused", arguments: [
        ("unix:/tmp/q.sock,server=on,wait=off", QMPEndpoint(address: .unix(path: "/tmp/q.sock"), waitForClient: false)),
        ("unix:/tmp/q.sock,server,nowait", QMPEndpoint(address: .unix(path: "/tmp/q.sock"), waitForClient: false)),
        ("tcp:127.0.0.1:4444,server=on,wait=off", QMPEndpoint(address: .tcp(host: "127.0.0.1", port: "4444"), waitForClient: false)),
        ("tcp:[::1]:4444,server", QMPEndpoint(address: .tcp(host: "::1", port: "4444"), waitForClient: true)),
    ])
    func endpoints(text: String, expected: QMPEndpoint) throws {
        #expect(try QMPEndpoint(parsing: text) == expected)
    }

    @Test("bad -qmp values say what is accepted", arguments: [
        "unix:/tmp/q.sock", "stdio", "tcp:4444,server", "unix:,server", "unix:/x,server,bogus=1",
    ])
    func badEndpoints(text: String) {
        #expect(throws: QMPEndpointError.self) { try QMPEndpoint(parsing: text) }
    }
}
