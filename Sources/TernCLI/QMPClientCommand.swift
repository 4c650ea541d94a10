import CSocket
import Foundation
import QMP

/// `tern qmp SOCKET [COMMAND [ARGS-JSON]]`: a QMP client for people.
public enum QMPClientCommand {
    public static let usage = """
    Usage: tern qmp SOCKET [COMMAND [ARGS-JSON]]

    Connects to a QMP monitor (tern's or QEMU's), negotiates capabilities, and
      - with COMMAND: runs it with the JSON object ARGS-JSON as its arguments, prints the
        reply's "return" value as JSON and exits 0, or prints the error and exits 1;
      - without: reads commands from standard input, one per line, as
        'COMMAND [ARGS-JSON]' or a whole JSON request, and prints every reply and event.

    SOCKET is a Unix socket path, unix:PATH, or tcp:HOST:PORT.

    Examples:
      tern qmp /tmp/tern.sock query-status
      tern qmp /tmp/tern.sock pmemsave '{"val": 1048576, "size": 4096, "filename": "/tmp/page"}'
      tern qmp tcp:127.0.0.1:4444

    """

    public static func main(arguments: [String]) -> Int32 {
        if arguments.first == "-h" || arguments.first == "--help" || arguments.isEmpty {
            print(usage, terminator: "")
            return arguments.isEmpty ? 2 : 0
        }
        let connection: QMPConnection
        do {
            connection = try QMPConnection(address: arguments[0])
            _ = try connection.receiveMessage() // greeting
            _ = try connection.execute("qmp_capabilities", arguments: nil)
        } catch {
            printError("qmp: \(error)")
            return 1
        }
        if arguments.count >= 2 {
            var commandArguments: JSONObject?
            if arguments.count >= 3 {
                guard let parsed = try? JSONParser.parse(Array(arguments[2].utf8)), let object = parsed.objectValue else {
                    printError("qmp: ARGS-JSON must be a JSON object, e.g. '{\"val\": 0, \"size\": 4096, \"filename\": \"/tmp/x\"}'")
                    return 2
                }
                commandArguments = object
            }
            do {
                let reply = try connection.execute(arguments[1], arguments: commandArguments)
                if let value = reply.objectValue?["return"] {
                    print(value.serialized)
                    return 0
                }
                let error = reply.objectValue?["error"]?.objectValue
                printError("qmp: \(error?["class"]?.stringValue ?? "Error"): \(error?["desc"]?.stringValue ?? reply.serialized)")
                return 1
            } catch {
                printError("qmp: \(error)")
                return 1
            }
        }
        return interactive(connection)
    }

    /// Prints everything the server sends while sending each line typed.
    static func interactive(_ connection: QMPConnection) -> Int32 {
        let reader = Thread {
            while let message = try? connection.receiveMessage() {
                print(message.serialized)
                fflush(nil)
            }
            print("(connection closed)")
            exit(0)
        }
        reader.start()
        let prompt = isatty(STDIN_FILENO) == 1
        if prompt { print("Connected. Type COMMAND [ARGS-JSON] or a JSON request; Ctrl-D ends.") }
        while let line = readLine() {
            let text = line.trimmingCharacters(in: .whitespaces)
            if text.isEmpty { continue }
            var request: JSONValue
            if text.hasPrefix("{") {
                guard let parsed = try? JSONParser.parse(Array(text.utf8)) else {
                    print("not valid JSON"); continue
                }
                request = parsed
            } else {
                let parts = text.split(separator: " ", maxSplits: 1).map(String.init)
                var object: JSONObject = ["execute": .string(parts[0])]
                if parts.count == 2 {
                    guard let parsed = try? JSONParser.parse(Array(parts[1].utf8)), parsed.objectValue != nil else {
                        print("arguments must be a JSON object"); continue
                    }
                    object["arguments"] = parsed
                }
                request = .object(object)
            }
            do { try connection.send(request) } catch { print("send failed: \(error)"); return 1 }
        }
        return 0
    }
}

/// A blocking QMP client connection, line-oriented.
final class QMPConnection: @unchecked Sendable {
    // Sendable: one thread sends, one receives; the descriptor is fixed.
    let descriptor: Int32
    private var buffer: [UInt8] = []
    private var splitter = JSONStreamSplitter(maximumSize: 64 << 20)
    private var pending: [JSONValue] = []

    struct ConnectionError: Error, CustomStringConvertible {
        let description: String
    }

    init(address: String) throws {
        var fd: Int32
        if address.hasPrefix("tcp:") {
            let hostPort = address.dropFirst(4)
            guard let colon = hostPort.lastIndex(of: ":") else { throw ConnectionError(description: "expected tcp:HOST:PORT") }
            fd = csocket_connect_tcp(String(hostPort[..<colon]), String(hostPort[hostPort.index(after: colon)...]))
        } else {
            let path = address.hasPrefix("unix:") ? String(address.dropFirst(5)) : address
            fd = csocket_connect_unix(path)
        }
        guard fd >= 0 else {
            throw ConnectionError(description: "cannot connect to \(address): \(String(cString: strerror(-fd)))")
        }
        descriptor = fd
    }

    deinit { close(descriptor) }

    func send(_ message: JSONValue) throws {
        let bytes = Array((message.serialized + "\n").utf8)
        var offset = 0
        while offset < bytes.count {
            let n = bytes.withUnsafeBytes { csocket_send(descriptor, $0.baseAddress! + offset, $0.count - offset, -1) }
            guard n > 0 else { throw ConnectionError(description: "the monitor closed the connection") }
            offset += n
        }
    }

    func receiveMessage() throws -> JSONValue {
        while pending.isEmpty {
            var chunk = [UInt8](repeating: 0, count: 65536)
            let n = chunk.withUnsafeMutableBytes { read(descriptor, $0.baseAddress!, $0.count) }
            guard n > 0 else { throw ConnectionError(description: "the monitor closed the connection") }
            for piece in splitter.feed(chunk[0..<n]) {
                if case let .text(bytes) = piece, let value = try? JSONParser.parse(bytes) { pending.append(value) }
            }
        }
        return pending.removeFirst()
    }

    /// Sends a command and returns its reply, skipping events that arrive first.
    func execute(_ name: String, arguments: JSONObject?) throws -> JSONValue {
        var request: JSONObject = ["execute": .string(name)]
        if let arguments { request["arguments"] = .object(arguments) }
        try send(.object(request))
        while true {
            let message = try receiveMessage()
            if message.objectValue?["event"] == nil { return message }
        }
    }
}
