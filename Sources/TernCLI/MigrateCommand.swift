import Foundation
import QMP

/// `tern migrate --qmp SOCKET URI`: drives a migration over QMP with a live progress line.
public enum MigrateCommand {
    public static let usage = """
    Usage: tern migrate --qmp SOCKET [--speed BYTES|unlimited] [--downtime MS]
                        [--capability NAME]... [--slo-downtime MS] [--slo-total-time MS]
                        [--blk | --inc] [--tls-creds ID [--tls-hostname NAME]] [--report FILE] URI

    Starts a live migration on the tern (or QEMU) behind the QMP socket SOCKET, to URI
    (tcp:HOST:PORT, unix:PATH, exec:COMMAND, fd:NAME), shows its progress (pass, transferred
    and remaining, throughput, dirty rate, the forecast's ETA and predicted stop, escalation
    steps) and a summary at the end. Exits 0 when the migration completes, 1 when it fails or
    is cancelled.

      --speed BYTES    maximum bandwidth in bytes/s (K/M/G suffixes), or 'unlimited'
                       (default: what the source has, 32M unless changed)
      --downtime MS    the downtime limit in milliseconds (default 300)
      --capability NAME  turn a migration capability on at the source first (xbzrle,
                       auto-converge, compress, events; repeatable). compress must also be
                       on at the destination (see docs/qmp.md)
      --slo-downtime MS  the stop the switchover may take (tern's x-slo-downtime)
      --slo-total-time MS  the budget for the whole migration (x-slo-total-time): tern
                       escalates (XBZRLE, compression, throttle, postcopy if allowed) when
                       its forecast says the budget will be missed, and cancels in time
                       when nothing can meet it; the source guest runs on
      --blk            copy the disks whole with the guest (QEMU's migrate blk: true); the
                       destination has its own image of the same size
      --inc            copy only what was written to the disks since the source opened
                       them (inc: true); the destination holds the same base image
                       Without either, the disks are shared storage (the same path).
      --tls-creds ID   over TLS, with the source's tls-creds-x509 object ID (created with
                       -object or QMP object-add; the destination needs its own, endpoint=server,
                       and tls-creds set before migrate-incoming; see docs/qmp.md)
      --tls-hostname NAME  the name the destination's certificate must carry (default: the
                       host in a tcp: URI)
      --report FILE    write an SVG picture of the migration (remaining bytes per pass,
                       bandwidth, dirty rate, throttle, switchover, forecast) to FILE

    """

    /// The numbers a finished migration reports, for the demo's summary.
    struct Outcome {
        var info: JSONObject
        var succeeded: Bool
    }

    public static func main(arguments: [String]) -> Int32 {
        var socket: String?
        var speed: Int64?
        var downtime: Double?
        var uri: String?
        var capabilities: [String] = []
        var parameters: JSONObject = [:]
        var reportPath: String?
        var blockFlag: String?
        var index = 0
        while index < arguments.count {
            let argument = arguments[index]
            index += 1
            func value() -> String? {
                guard index < arguments.count else { return nil }
                index += 1
                return arguments[index - 1]
            }
            switch argument {
            case "-h", "--help":
                print(usage, terminator: "")
                return 0
            case "--qmp":
                socket = value()
            case "--speed":
                guard let text = value() else { printError("migrate: --speed needs a value"); return 2 }
                if text == "unlimited" { speed = Int64.max / 2 } else if let bytes = SizeParser.parse(text) { speed = Int64(clamping: bytes) } else {
                    printError("migrate: --speed \(text): expected bytes per second (e.g. 1G) or 'unlimited'")
                    return 2
                }
            case "--capability":
                guard let name = value() else { printError("migrate: --capability needs a name, e.g. --capability xbzrle"); return 2 }
                capabilities.append(name)
            case "--slo-downtime", "--slo-total-time":
                guard let text = value(), let milliseconds = Int64(text), milliseconds >= 0 else {
                    printError("migrate: \(argument) needs milliseconds, e.g. \(argument) 5000")
                    return 2
                }
                parameters[argument == "--slo-downtime" ? "x-slo-downtime" : "x-slo-total-time"] = .int(milliseconds)
            case "--blk", "--inc":
                blockFlag = String(argument.dropFirst(2))
            case "--tls-creds", "--tls-hostname":
                guard let text = value(), !text.isEmpty else {
                    printError("migrate: \(argument) needs a value, e.g. \(argument == "--tls-creds" ? "--tls-creds tls0" : "--tls-hostname dst.example.com")")
                    return 2
                }
                parameters[String(argument.dropFirst(2))] = .string(text)
            case "--report":
                guard let path = value() else { printError("migrate: --report needs a file name, e.g. --report migration.svg"); return 2 }
                reportPath = path
            case "--downtime":
                guard let text = value(), let milliseconds = Double(text), milliseconds >= 0 else {
                    printError("migrate: --downtime needs milliseconds, e.g. --downtime 300")
                    return 2
                }
                downtime = milliseconds / 1000
            default:
                if argument.hasPrefix("-") {
                    printError("migrate: unknown option '\(argument)' (see tern migrate --help)")
                    return 2
                }
                guard uri == nil else { printError("migrate: more than one URI given"); return 2 }
                uri = argument
            }
        }
        guard let socket, let uri else {
            printError("migrate: needs --qmp SOCKET and a URI (see tern migrate --help)")
            return 2
        }
        do {
            let connection = try QMPConnection(address: socket)
            _ = try connection.receiveMessage()
            _ = try connection.execute("qmp_capabilities", arguments: nil)
            if !capabilities.isEmpty {
                let list: [JSONValue] = capabilities.map { ["capability": .string($0), "state": .bool(true)] }
                try check(connection.execute("migrate-set-capabilities", arguments: ["capabilities": .array(list)]))
            }
            if !parameters.keys.isEmpty { try check(connection.execute("migrate-set-parameters", arguments: parameters)) }
            let recorder = reportPath.map { _ in MigrationRecorder() }
            let outcome = try run(connection, uri: uri, speed: speed, downtime: downtime, blockFlag: blockFlag,
                                  recorder: recorder)
            printSummary(outcome.info)
            if let reportPath, let recorder {
                try MigrationReport.write(recorder, summary: summaryLines(outcome.info), to: reportPath)
                print("report written to \(reportPath)")
            }
            return outcome.succeeded ? 0 : 1
        } catch {
            printError("migrate: \(error)")
            return 1
        }
    }

    /// Starts the migration and follows it to its end, printing progress on standard error.
    /// `blockFlag` is `blk` or `inc` (QEMU's migrate flags), or nil for shared storage.
    static func run(_ connection: QMPConnection, uri: String, speed: Int64?, downtime: Double?,
                    blockFlag: String? = nil, recorder: MigrationRecorder? = nil) throws -> Outcome {
        if let speed { try check(connection.execute("migrate_set_speed", arguments: ["value": .int(speed)])) }
        if let downtime { try check(connection.execute("migrate_set_downtime", arguments: ["value": .double(downtime)])) }
        var migrateArguments: JSONObject = ["uri": .string(uri)]
        if let blockFlag { migrateArguments[blockFlag] = .bool(true) }
        try check(connection.execute("migrate", arguments: migrateArguments))
        let interactive = isatty(STDERR_FILENO) == 1
        var lastLine = 0.0
        while true {
            let reply = try connection.execute("query-migrate", arguments: nil)
            let info = reply.objectValue?["return"]?.objectValue ?? [:]
            let status = info["status"]?.stringValue ?? "none"
            recorder?.record(info)
            let now = Date().timeIntervalSince1970
            let inProgress = ["setup", "active", "cancelling", "postcopy-active", "postcopy-paused", "postcopy-recover"]
            if inProgress.contains(status) {
                if interactive || now - lastLine >= 1 {
                    let line = progressLine(info)
                    if interactive {
                        FileHandle.standardError.write(Data("\r\u{1b}[K\(line)".utf8))
                    } else {
                        FileHandle.standardError.write(Data("\(line)\n".utf8))
                    }
                    lastLine = now
                }
            } else if status != "none" {
                if interactive { FileHandle.standardError.write(Data("\r\u{1b}[K".utf8)) }
                return Outcome(info: info, succeeded: status == "completed")
            }
            usleep(50_000)
        }
    }

    static func check(_ reply: JSONValue) throws {
        if let error = reply.objectValue?["error"]?.objectValue {
            throw QMPConnection.ConnectionError(description: error["desc"]?.stringValue ?? reply.serialized)
        }
    }

    static func mebibytes(_ value: JSONValue?) -> String {
        String(format: "%.1f MiB", Double(value?.int64Value ?? 0) / 1_048_576)
    }

    static func progressLine(_ info: JSONObject) -> String {
        let ram = info["ram"]?.objectValue ?? [:]
        let mbps: Double = if case let .double(value)? = ram["mbps"] { value } else { Double(ram["mbps"]?.int64Value ?? 0) }
        return "migrate: \(info["status"]?.stringValue ?? "?") pass \(ram["dirty-sync-count"]?.int64Value ?? 0)"
            + "  transferred \(mebibytes(ram["transferred"]))  remaining \(mebibytes(ram["remaining"]))"
            + String(format: "  %.0f MiB/s", mbps * 1_000_000 / 8 / 1_048_576)
            + "  dirty \(ram["dirty-pages-rate"]?.int64Value ?? 0) pages/s"
            + (info["status"]?.stringValue?.hasPrefix("postcopy") == true
                ? "  page requests \(ram["postcopy-requests"]?.int64Value ?? 0)"
                : forecastProgress(info))
            + encodingProgress(info)
            + (info["disk"]?.objectValue.map { "  disk \(mebibytes($0["transferred"])) of \(mebibytes($0["total"]))" } ?? "")
    }

    /// The forecast's ETA and predicted stop (tern), or QEMU's expected downtime.
    static func forecastProgress(_ info: JSONObject) -> String {
        guard let forecast = info["x-forecast"]?.objectValue else {
            return "  expected downtime \(info["expected-downtime"]?.int64Value ?? 0) ms"
        }
        var text = forecast["converges"]?.boolValue == false ? "  forecast: does not converge"
            : String(format: "  ETA %.1f s, stop ~%lld ms", Double(forecast["eta-ms"]?.int64Value ?? 0) / 1000,
                     forecast["expected-downtime-ms"]?.int64Value ?? 0)
        if case let .array(steps)? = info["x-escalations"], !steps.isEmpty {
            text += "  escalated: " + steps.compactMap { $0.objectValue?["step"]?.stringValue }.joined(separator: ", ")
        }
        return text
    }

    /// What the capabilities in use did, for the progress line.
    static func encodingProgress(_ info: JSONObject) -> String {
        var parts = ""
        if let xbzrle = info["xbzrle-cache"]?.objectValue {
            parts += "  xbzrle \(xbzrle["pages"]?.int64Value ?? 0) pages (\(xbzrle["cache-miss"]?.int64Value ?? 0) misses)"
        }
        if let compression = info["compression"]?.objectValue {
            let rate: Double = if case let .double(value)? = compression["compression-rate"] { value } else { 0 }
            parts += String(format: "  compressed %lld pages %.1f:1", compression["pages"]?.int64Value ?? 0, rate)
        }
        if let throttle = info["cpu-throttle-percentage"]?.int64Value { parts += "  throttle \(throttle)%" }
        return parts
    }

    static func printSummary(_ info: JSONObject) {
        print(summaryLines(info).joined(separator: "\n"))
    }

    static func summaryLines(_ info: JSONObject) -> [String] {
        let status = info["status"]?.stringValue ?? "?"
        var lines = ["migration \(status)"]
        if let error = info["error-desc"]?.stringValue { lines.append("  error: \(error)") }
        if let ram = info["ram"]?.objectValue {
            lines.append("  total time      \(info["total-time"]?.int64Value ?? 0) ms (setup \(info["setup-time"]?.int64Value ?? 0) ms)")
            lines.append("  downtime        \(info["downtime"]?.int64Value ?? 0) ms (source vCPUs stopped until the last byte was sent)")
            lines.append("  transferred     \(mebibytes(ram["transferred"])) of \(mebibytes(ram["total"])) RAM")
            lines.append("  pages           \(ram["normal"]?.int64Value ?? 0) sent, \(ram["duplicate"]?.int64Value ?? 0) zero")
            lines.append("  passes          \(ram["dirty-sync-count"]?.int64Value ?? 0) dirty-log syncs")
            if let disk = info["disk"]?.objectValue {
                lines.append("  disk            \(mebibytes(disk["transferred"])) of \(mebibytes(disk["total"])) copied")
            }
            let mbps: Double = if case let .double(value)? = ram["mbps"] { value } else { 0 }
            lines.append(String(format: "  throughput      %.0f Mbit/s", mbps))
            if let xbzrle = info["xbzrle-cache"]?.objectValue {
                lines.append("  xbzrle          \(xbzrle["pages"]?.int64Value ?? 0) pages as deltas (\(mebibytes(xbzrle["bytes"]))), "
                             + "\(xbzrle["cache-miss"]?.int64Value ?? 0) cache misses, \(xbzrle["overflow"]?.int64Value ?? 0) overflows")
            }
            if let compression = info["compression"]?.objectValue {
                let rate: Double = if case let .double(value)? = compression["compression-rate"] { value } else { 0 }
                lines.append("  compressed      \(compression["pages"]?.int64Value ?? 0) pages into \(mebibytes(compression["compressed-size"])), "
                             + String(format: "%.2f:1", rate))
            }
            if let throttle = info["x-cpu-throttle-maximum"]?.int64Value { lines.append("  vCPU throttle   up to \(throttle)%") }
            if let requests = ram["postcopy-requests"]?.int64Value, info["downtime"] != nil, requests > 0 {
                lines.append("  postcopy        \(requests) page requests, \(mebibytes(ram["postcopy-bytes"])) after the switchover")
            }
        }
        if case let .array(steps)? = info["x-escalations"] {
            for step in steps {
                let object = step.objectValue ?? [:]
                lines.append("  escalation      at \(object["at-ms"]?.int64Value ?? 0) ms: \(object["step"]?.stringValue ?? "?"): \(object["detail"]?.stringValue ?? "")")
            }
        }
        return lines
    }
}
