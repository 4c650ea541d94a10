import Foundation
import Synchronization
import Testing

/// Whether this host can run guests; tests that boot one are skipped, with this reason, if not.
let kvmAvailable = access("/dev/kvm", R_OK | W_OK) == 0
let kvmMissingReason: Comment = "SKIPPED: /dev/kvm is missing or not accessible; this test boots a guest and needs KVM"

let packageRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent()

/// The `tern` binary `swift test` built alongside the tests.
let ternBinary: String = {
    if let override = ProcessInfo.processInfo.environment["TERN_BINARY"] { return override }
    let candidates = [".build/debug/tern", ".build/release/tern"].map { packageRoot.appendingPathComponent($0).path }
    return candidates.first { FileManager.default.isExecutableFile(atPath: $0) } ?? candidates[0]
}()

/// Runs a program and collects its output as it comes, so a test can wait for a line.
final class ChildProcess: @unchecked Sendable {
    // Sendable: `process` is only started and signalled; output goes through the mutex.
    let process = Process()
    private let output = OutputBuffer()
    private let errors = OutputBuffer()

    init(_ executable: String, _ arguments: [String]) throws {
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        let stdout = Pipe()
        let stderr = Pipe()
        process.standardOutput = stdout
        process.standardError = stderr
        process.standardInput = FileHandle.nullDevice
        stdout.fileHandleForReading.readabilityHandler = { [output] handle in
            let data = handle.availableData
            output.data.withLock { $0.append(data) }
        }
        stderr.fileHandleForReading.readabilityHandler = { [errors] handle in
            let data = handle.availableData
            errors.data.withLock { $0.append(data) }
        }
        try process.run()
    }

    static func tern(_ arguments: [String]) throws -> ChildProcess {
        try ChildProcess(ternBinary, arguments)
    }

    var standardOutput: String { String(decoding: output.data.withLock { $0 }, as: UTF8.self) }
    var standardError: String { String(decoding: errors.data.withLock { $0 }, as: UTF8.self) }

    /// Waits until `condition` holds for standard output, the process exits, or time runs out.
    @discardableResult
    func waitForOutput(timeout: TimeInterval, _ condition: (String) -> Bool) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if condition(standardOutput) { return true }
            if !process.isRunning {
                Thread.sleep(forTimeInterval: 0.1) // let the pipe drain
                return condition(standardOutput)
            }
            Thread.sleep(forTimeInterval: 0.05)
        }
        return condition(standardOutput)
    }

    /// Waits for the process to exit by itself; nil if it is still running after `timeout`.
    func waitForExit(timeout: TimeInterval) -> Int32? {
        let deadline = Date().addingTimeInterval(timeout)
        while process.isRunning && Date() < deadline { Thread.sleep(forTimeInterval: 0.05) }
        if process.isRunning { return nil }
        Thread.sleep(forTimeInterval: 0.1)
        return process.terminationStatus
    }

    /// Ends the process (SIGTERM, then SIGKILL) and returns its status.
    @discardableResult
    func stop() -> Int32 {
        if process.isRunning {
            process.terminate()
            if waitForExit(timeout: 5) == nil { kill(process.processIdentifier, SIGKILL) }
        }
        process.waitUntilExit()
        return process.terminationStatus
    }

    deinit {
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
    }
}

/// Bytes a pipe delivered so far.
final class OutputBuffer: Sendable {
    let data = Mutex(Data())
}

/// The built-in guest's pass lines, parsed: (pass number, "ok" or "FAIL").
func passLines(_ output: String) -> [(pass: Int, status: String)] {
    output.split(separator: "\n").compactMap { line in
        let words = line.split(separator: " ")
        guard words.count >= 6, words[0] == "tern-guest:", words[1] == "pass", let number = Int(words[2]) else { return nil }
        return (number, String(words[5]))
    }
}

/// Whether the guest printed at least `count` pass lines, all "ok", and no CORRUPT line.
func guestHealthy(_ output: String, passes count: Int) -> Bool {
    let lines = passLines(output)
    return lines.count >= count && lines.allSatisfy { $0.status == "ok" } && !output.contains("CORRUPT")
}
