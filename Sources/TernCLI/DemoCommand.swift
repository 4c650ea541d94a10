import CSocket
import Foundation
import QMP

/// `tern demo`: the whole job in one command. Starts a source VM and a destination, migrates
/// the running guest over loopback TCP with progress, verifies the result and summarises.
public enum DemoCommand {
    public static let usage = """
    Usage: tern demo [-m SIZE] [-smp N] [-append TEXT] [--speed BYTES|unlimited] [--report FILE]
                     [-kernel FILE [-initrd FILE]]

    Starts a source VM (the built-in guest, dirtying memory as -append says; default
    -m 512M -append "wss=256M rate=64M") and a paused destination, live-migrates the running
    guest over loopback TCP with a progress line, then verifies:
      1. memory: SHA-256 of all guest RAM on the stopped source and the paused destination match;
      2. the guest: resumed on the destination, its own self-check keeps passing.
    Then prints the summary (total time, downtime, bytes, passes), writes a picture of the
    migration (SVG: remaining bytes per pass, bandwidth, dirty rate, forecast) to FILE
    (default ./tern-demo-report.svg) and says where, and stops both VMs.
    With -kernel it migrates that Linux kernel instead (memory is verified; the guest's
    self-check is the built-in guest's only).

    """

    struct DemoError: Error, CustomStringConvertible {
        let description: String
    }

    public static func main(arguments: [String]) -> Int32 {
        var memory = "512M"
        var cpus = "1"
        var append = "wss=256M rate=64M"
        var speed = "unlimited"
        var kernel: [String] = []
        var report = FileManager.default.currentDirectoryPath + "/tern-demo-report.svg"
        var index = 0
        while index < arguments.count {
            let option = arguments[index]
            guard index + 1 < arguments.count || option == "-h" || option == "--help" else {
                printError("demo: option '\(option)' needs a value (see tern demo --help)")
                return 2
            }
            let value = index + 1 < arguments.count ? arguments[index + 1] : ""
            index += 2
            switch option {
            case "-h", "--help": print(usage, terminator: ""); return 0
            case "-m": memory = value
            case "-smp": cpus = value
            case "-append": append = value
            case "--speed": speed = value
            case "--report": report = value
            case "-kernel", "-initrd": kernel += [option, value]
            default:
                printError("demo: unknown option '\(option)' (see tern demo --help)")
                return 2
            }
        }
        do {
            return try run(memory: memory, cpus: cpus, append: append, speed: speed, kernel: kernel, report: report)
        } catch {
            printError("demo: \(error)")
            return 1
        }
    }

    /// The picture of the migration; where the path cannot be written, a temporary file.
    static func writeReport(_ recorder: MigrationRecorder, _ info: JSONObject, to path: String) {
        let summary = MigrateCommand.summaryLines(info)
        for candidate in [path, NSTemporaryDirectory() + "tern-demo-report-\(getpid()).svg"] {
            if (try? MigrationReport.write(recorder, summary: summary, to: candidate)) != nil {
                say("wrote a picture of the migration to \(candidate)")
                return
            }
        }
        say("could not write the migration report to \(path)")
    }

    static func say(_ text: String) {
        print("demo: \(text)")
        fflush(nil)
    }

    static func run(memory: String, cpus: String, append: String, speed: String, kernel: [String], report: String) throws -> Int32 {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("tern-demo-\(getpid())")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let executable = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().path
        let port = try freePort()
        let common = ["run", "-m", memory, "-smp", cpus, "-append", append] + kernel
        let sourceLog = directory.appendingPathComponent("source.log").path
        let destinationLog = directory.appendingPathComponent("destination.log").path
        let sourceSocket = directory.appendingPathComponent("source.sock").path
        let destinationSocket = directory.appendingPathComponent("destination.sock").path

        say("starting the source VM: tern \((common + ["-serial", "file:\(sourceLog)"]).joined(separator: " "))")
        let source = try spawn(executable, common + ["-serial", "file:\(sourceLog)", "-qmp", "unix:\(sourceSocket),server=on,wait=off"])
        defer { stop(source) }
        say("starting the destination, waiting on tcp:127.0.0.1:\(port), paused for verification (-S)")
        let destination = try spawn(executable, common + ["-serial", "file:\(destinationLog)", "-S",
                                                          "-qmp", "unix:\(destinationSocket),server=on,wait=off",
                                                          "-incoming", "tcp:127.0.0.1:\(port)"])
        defer { stop(destination) }
        let sourceMonitor = try connect(sourceSocket, process: source)
        let destinationMonitor = try connect(destinationSocket, process: destination)
        let builtin = kernel.isEmpty
        if builtin {
            say("waiting for the guest to fill its working set and pass its self-check...")
            let lines = try waitForPassLines(sourceLog, count: 2, after: 0, process: source)
            lines.forEach { say("  source guest | \($0)") }
        } else {
            say("letting the Linux guest boot for 3 seconds...")
            Thread.sleep(forTimeInterval: 3)
        }

        say("live-migrating to tcp:127.0.0.1:\(port) (bandwidth: \(speed))")
        let speedValue: Int64 = speed == "unlimited" ? Int64.max / 2 : Int64(clamping: SizeParser.parse(speed) ?? 32 << 20)
        let recorder = MigrationRecorder()
        let outcome = try MigrateCommand.run(sourceMonitor, uri: "tcp:127.0.0.1:\(port)", speed: speedValue, downtime: nil,
                                             recorder: recorder)
        writeReport(recorder, outcome.info, to: report)
        guard outcome.succeeded else {
            MigrateCommand.printSummary(outcome.info)
            throw DemoError(description: "the migration did not complete")
        }
        let incoming = try waitForIncoming(destinationMonitor)

        let sourceDigest = try digest(sourceMonitor)
        let destinationDigest = try digest(destinationMonitor)
        let memoryMatches = sourceDigest == destinationDigest
        say("verify 1, memory: source \(sourceDigest.prefix(16))…, destination \(destinationDigest.prefix(16))… "
            + (memoryMatches ? "EQUAL" : "DIFFERENT"))

        try MigrateCommand.check(destinationMonitor.execute("cont", arguments: nil))
        var guestOK = true
        if builtin {
            let already = passLineCount(destinationLog)
            let lines = try waitForPassLines(destinationLog, count: 3, after: already, process: destination)
            lines.forEach { say("  destination guest | \($0)") }
            let log = (try? String(contentsOfFile: destinationLog, encoding: .utf8)) ?? ""
            guestOK = lines.allSatisfy { $0.contains(" ok") } && !log.contains("CORRUPT")
            say("verify 2, guest self-check on the destination: " + (guestOK ? "PASSING" : "FAILING"))
        }

        print("")
        MigrateCommand.printSummary(outcome.info)
        if let ready = incoming["x-guest-downtime"]?.int64Value {
            print("  guest stopped   \(ready) ms (source vCPUs stopped until the destination was ready to run)")
        }
        print("  verified        memory \(memoryMatches ? "identical" : "DIFFERENT")"
              + (builtin ? ", guest self-check \(guestOK ? "passing" : "FAILING")" : ""))
        _ = try? sourceMonitor.execute("quit", arguments: nil)
        _ = try? destinationMonitor.execute("quit", arguments: nil)
        return memoryMatches && guestOK ? 0 : 1
    }

    static func spawn(_ executable: String, _ arguments: [String]) throws -> Process {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        process.standardInput = FileHandle.nullDevice
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        return process
    }

    static func stop(_ process: Process) {
        guard process.isRunning else { return }
        process.terminate()
        for _ in 0..<50 where process.isRunning { usleep(20_000) }
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
    }

    static func connect(_ socket: String, process: Process) throws -> QMPConnection {
        for _ in 0..<200 {
            if let connection = try? QMPConnection(address: socket) {
                _ = try connection.receiveMessage()
                _ = try connection.execute("qmp_capabilities", arguments: nil)
                return connection
            }
            guard process.isRunning else { throw DemoError(description: "a tern VM exited at start-up (try the same options with tern run)") }
            usleep(25_000)
        }
        throw DemoError(description: "no QMP socket at \(socket)")
    }

    static func freePort() throws -> Int32 { // also used by tests
        var port: Int32 = 0
        let fd = csocket_listen_tcp("127.0.0.1", "0", 1, &port)
        guard fd >= 0 else { throw DemoError(description: "cannot find a free TCP port") }
        close(fd)
        return port
    }

    static func passLines(_ path: String) -> [String] {
        let text = (try? String(contentsOfFile: path, encoding: .utf8)) ?? ""
        // Whole lines only: the guest may be half-way through printing the last one.
        let complete = text.hasSuffix("\n") ? Substring(text) : text[..<(text.lastIndex(of: "\n") ?? text.startIndex)]
        return complete.split(separator: "\n").map(String.init).filter { $0.hasPrefix("tern-guest: pass ") }
    }

    static func passLineCount(_ path: String) -> Int { passLines(path).count }

    static func waitForPassLines(_ path: String, count: Int, after: Int, process: Process) throws -> [String] {
        let deadline = Date().addingTimeInterval(Double(count) * 2 + 30)
        while Date() < deadline {
            let lines = passLines(path)
            if lines.count >= after + count { return Array(lines[after..<(after + count)]) }
            guard process.isRunning else { throw DemoError(description: "a tern VM exited unexpectedly") }
            usleep(100_000)
        }
        throw DemoError(description: "the guest printed no pass lines in time (see \(path))")
    }

    static func waitForIncoming(_ monitor: QMPConnection) throws -> JSONObject {
        for _ in 0..<600 {
            let info = try monitor.execute("query-migrate", arguments: nil).objectValue?["return"]?.objectValue ?? [:]
            switch info["status"]?.stringValue {
            case "completed": return info
            case "failed": throw DemoError(description: "the destination failed to load: \(info["error-desc"]?.stringValue ?? "?")")
            default: usleep(20_000)
            }
        }
        throw DemoError(description: "the destination did not finish loading")
    }

    static func digest(_ monitor: QMPConnection) throws -> String {
        let reply = try monitor.execute("x-query-memory-digest", arguments: nil)
        try MigrateCommand.check(reply)
        return reply.objectValue?["return"]?.objectValue?["sha256"]?.stringValue ?? ""
    }
}
