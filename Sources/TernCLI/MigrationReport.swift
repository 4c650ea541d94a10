import Foundation
import QMP

/// What `tern migrate` saw of a migration, one sample per poll of `query-migrate`, for the
/// report (`--report FILE`).
final class MigrationRecorder {
    struct Sample {
        var milliseconds: Double
        var status: String
        var remaining: Double
        var transferred: Double
        /// MiB/s on the wire and dirtied by the guest.
        var bandwidth: Double
        var dirtyRate: Double
        var throttle: Double
        var passes: Int
        /// The forecast's completion time (ms since start), when it converges.
        var forecastEnd: Double?
        var converges: Bool?
    }
    private(set) var samples: [Sample] = []
    private(set) var escalations: [(milliseconds: Double, text: String)] = []
    private let start = Date()

    func record(_ info: JSONObject) {
        let now = Date().timeIntervalSince(start) * 1000
        let ram = info["ram"]?.objectValue ?? [:]
        let mbps: Double = if case let .double(value)? = ram["mbps"] { value } else { Double(ram["mbps"]?.int64Value ?? 0) }
        let forecast = info["x-forecast"]?.objectValue
        var sample = Sample(milliseconds: now, status: info["status"]?.stringValue ?? "?",
                            remaining: Double(ram["remaining"]?.int64Value ?? 0) / 1_048_576,
                            transferred: Double(ram["transferred"]?.int64Value ?? 0) / 1_048_576,
                            bandwidth: mbps * 1_000_000 / 8 / 1_048_576,
                            dirtyRate: Double(ram["dirty-pages-rate"]?.int64Value ?? 0) * 4096 / 1_048_576,
                            throttle: Double(info["cpu-throttle-percentage"]?.int64Value ?? 0),
                            passes: Int(ram["dirty-sync-count"]?.int64Value ?? 0))
        if let forecast, let converges = forecast["converges"]?.boolValue {
            sample.converges = converges
            if converges, let eta = forecast["eta-ms"]?.int64Value { sample.forecastEnd = now + Double(eta) }
        }
        samples.append(sample)
        if case let .array(list)? = info["x-escalations"], list.count > escalations.count {
            for item in list.dropFirst(escalations.count) {
                let object = item.objectValue ?? [:]
                escalations.append((now, "\(object["step"]?.stringValue ?? "?"): \(object["detail"]?.stringValue ?? "")"))
            }
        }
    }
}

/// Draws a recorded migration as an SVG: remaining bytes with the passes, the switchover and
/// every escalation marked; bandwidth, dirty rate and throttle; the forecast's completion
/// time as it evolved against the actual end; and the summary numbers.
enum MigrationReport {
    static func svg(_ recorder: MigrationRecorder, summary: [String]) -> String {
        let samples = recorder.samples
        let width = 960.0, panelHeight = 150.0, left = 70.0, right = 60.0, top = 50.0, gap = 40.0
        let plotWidth = width - left - right
        let end = max(samples.last?.milliseconds ?? 1, 1)
        let height = top + 3 * (panelHeight + gap) + 20 + Double(summary.count) * 16
        func x(_ ms: Double) -> Double { left + plotWidth * ms / end }
        var out = """
        <svg xmlns="http://www.w3.org/2000/svg" width="\(Int(width))" height="\(Int(height))" font-family="sans-serif" font-size="11">
        <rect width="100%" height="100%" fill="white"/>
        <text x="\(left)" y="24" font-size="15" font-weight="bold">tern: \(escape(summary.first ?? "migration"))</text>

        """
        // Panels: (title, series [(label, colour, values)], unit maximum)
        let panels: [(String, [(String, String, [Double?])])] = [
            ("remaining (MiB)", [("remaining", "#1f77b4", samples.map { $0.remaining })]),
            ("MiB/s; throttle %", [("bandwidth", "#2ca02c", samples.map { $0.bandwidth }),
                                   ("guest dirty rate", "#d62728", samples.map { $0.dirtyRate }),
                                   ("throttle %", "#ff7f0e", samples.map { $0.throttle })]),
            ("forecast completion (s since start)", [("forecast", "#9467bd", samples.map { $0.forecastEnd.map { $0 / 1000 } }),
                                                     ("actual end", "#555555", samples.map { _ in end / 1000 })]),
        ]
        for (index, panel) in panels.enumerated() {
            let y0 = top + Double(index) * (panelHeight + gap)
            let maximum = max(panel.1.flatMap { $0.2.compactMap { $0 } }.max() ?? 1, 1) * 1.1
            func y(_ value: Double) -> Double { y0 + panelHeight - panelHeight * min(value, maximum) / maximum }
            out += "<text x=\"\(left)\" y=\"\(y0 - 6)\" font-weight=\"bold\">\(escape(panel.0))</text>\n"
            out += "<rect x=\"\(left)\" y=\"\(y0)\" width=\"\(plotWidth)\" height=\"\(panelHeight)\" fill=\"none\" stroke=\"#999\"/>\n"
            out += "<text x=\"\(left - 6)\" y=\"\(y0 + 10)\" text-anchor=\"end\">\(format(maximum))</text>\n"
            out += "<text x=\"\(left - 6)\" y=\"\(y0 + panelHeight)\" text-anchor=\"end\">0</text>\n"
            for (seriesIndex, series) in panel.1.enumerated() {
                var path = ""
                var pen = false
                for (sample, value) in zip(samples, series.2) {
                    guard let value else { pen = false; continue }
                    path += "\(pen ? "L" : "M")\(format(x(sample.milliseconds))),\(format(y(value))) "
                    pen = true
                }
                if !path.isEmpty {
                    out += "<path d=\"\(path)\" fill=\"none\" stroke=\"\(series.1)\" stroke-width=\"1.6\"/>\n"
                }
                out += "<text x=\"\(left + plotWidth - 4)\" y=\"\(y0 + 14 + Double(seriesIndex) * 13)\" text-anchor=\"end\" fill=\"\(series.1)\">\(escape(series.0))</text>\n"
            }
            // Passes (thin), the switchover (red) and escalations (orange) on every panel.
            var lastPasses = 0
            var lastStatus = samples.first?.status ?? ""
            for sample in samples {
                if sample.passes > lastPasses {
                    out += "<line x1=\"\(format(x(sample.milliseconds)))\" x2=\"\(format(x(sample.milliseconds)))\" y1=\"\(y0)\" y2=\"\(y0 + panelHeight)\" stroke=\"#ccc\"/>\n"
                    if index == 0 { out += "<text x=\"\(format(x(sample.milliseconds) + 2))\" y=\"\(y0 + panelHeight - 3)\" fill=\"#888\" font-size=\"9\">\(sample.passes)</text>\n" }
                    lastPasses = sample.passes
                }
                if sample.status != lastStatus, sample.status == "postcopy-active" || sample.status == "completed" {
                    out += "<line x1=\"\(format(x(sample.milliseconds)))\" x2=\"\(format(x(sample.milliseconds)))\" y1=\"\(y0)\" y2=\"\(y0 + panelHeight)\" stroke=\"#d62728\" stroke-dasharray=\"4 2\"/>\n"
                    if index == 0 { out += "<text x=\"\(format(x(sample.milliseconds) + 3))\" y=\"\(y0 + 12)\" fill=\"#d62728\">\(escape(sample.status))</text>\n" }
                }
                lastStatus = sample.status
            }
            for (number, escalation) in recorder.escalations.enumerated() {
                out += "<line x1=\"\(format(x(escalation.milliseconds)))\" x2=\"\(format(x(escalation.milliseconds)))\" y1=\"\(y0)\" y2=\"\(y0 + panelHeight)\" stroke=\"#ff7f0e\" stroke-dasharray=\"2 2\"/>\n"
                if index == 0 {
                    out += "<text x=\"\(format(x(escalation.milliseconds) + 3))\" y=\"\(y0 + 26 + Double(number % 6) * 12)\" fill=\"#ff7f0e\">\(escape(String(escalation.text.prefix(70))))</text>\n"
                }
            }
        }
        let axisY = top + 3 * (panelHeight + gap) - gap + 14
        out += "<text x=\"\(left)\" y=\"\(axisY)\">0 s</text><text x=\"\(left + plotWidth)\" y=\"\(axisY)\" text-anchor=\"end\">\(format(end / 1000)) s</text>\n"
        for (index, line) in summary.dropFirst().enumerated() {
            out += "<text x=\"\(left)\" y=\"\(axisY + 22 + Double(index) * 16)\" font-family=\"monospace\" xml:space=\"preserve\">\(escape(line))</text>\n"
        }
        out += "</svg>\n"
        return out
    }

    static func write(_ recorder: MigrationRecorder, summary: [String], to path: String) throws {
        try svg(recorder, summary: summary).write(toFile: path, atomically: true, encoding: .utf8)
    }

    private static func format(_ value: Double) -> String { String(format: "%.1f", value) }

    private static func escape(_ text: String) -> String {
        text.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;").replacingOccurrences(of: ">", with: "&gt;")
    }
}
