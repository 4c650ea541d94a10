import Foundation
import QMP
import Testing
@testable import TernCLI

@Suite("QMP command table", .enabled(if: kvmAvailable, kvmMissingReason), .timeLimit(.minutes(1)))
struct QMPCommandTableTests {
    /// Commands whose handlers end or restart the machine; called last or checked apart.
    static let disruptive: Set<String> = ["quit", "system_reset"]

    @Test("every command query-commands lists has a handler, and every handler is listed")
    func listedCommandsHaveHandlers() throws {
        let socket = FileManager.default.temporaryDirectory.appendingPathComponent("tern-qmp-table-\(getpid()).sock").path
        let tern = try ChildProcess.tern(["run", "-m", "64M", "-S", "-serial", "none",
                                          "-qmp", "unix:\(socket),server=on,wait=off"])
        defer { tern.stop() }
        var connection: QMPConnection?
        for _ in 0..<100 where connection == nil {
            connection = try? QMPConnection(address: socket)
            if connection == nil { Thread.sleep(forTimeInterval: 0.05) }
        }
        let client = try #require(connection, "tern did not open \(socket): \(tern.standardError)")
        _ = try client.receiveMessage()
        _ = try client.execute("qmp_capabilities", arguments: nil)
        let listed = try client.execute("query-commands", arguments: nil).objectValue?["return"]
        var items: [JSONValue] = []
        if case let .array(values)? = listed { items = values }
        let names = Set(items.compactMap { $0.objectValue?["name"]?.stringValue })
        #expect(names.count > 15)
        #expect(names.isSuperset(of: ["qmp_capabilities", "query-version", "query-commands", "query-status", "stop",
                                      "cont", "quit", "system_reset", "query-name", "query-kvm", "query-cpus-fast",
                                      "pmemsave", "getfd", "closefd", "human-monitor-command", "x-query-memory-digest"]))
        // Listed → handled: every listed command is found (it may still refuse its arguments).
        for name in names.subtracting(Self.disruptive).sorted() {
            let reply = try client.execute(name, arguments: nil)
            let errorClass = reply.objectValue?["error"]?.objectValue?["class"]?.stringValue
            if name == "qmp_capabilities" { continue } // refused after negotiation, by design
            #expect(errorClass != "CommandNotFound", "\(name) is listed but has no handler: \(reply.serialized)")
        }
        // Handled → listed: a name that is not listed is not found.
        for name in ["migrate-bogus", "query-nothing"] {
            let reply = try client.execute(name, arguments: nil)
            #expect(reply.objectValue?["error"]?.objectValue?["class"] == "CommandNotFound")
        }
        let quit = try client.execute("quit", arguments: nil)
        #expect(quit.objectValue?["return"] == .object([:]))
        #expect(tern.waitForExit(timeout: 10) == 0)
    }
}
