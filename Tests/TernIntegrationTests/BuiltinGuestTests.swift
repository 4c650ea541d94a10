import Foundation
import Testing

@Suite("Built-in guest on KVM", .serialized, .enabled(if: kvmAvailable, kvmMissingReason), .timeLimit(.minutes(2)))
struct BuiltinGuestTests {
    @Test("prints its lines and passes its self-check", arguments: [1, 2])
    func selfCheck(cpus: Int) throws {
        let tern = try ChildProcess.tern(["run", "-m", "256M", "-smp", "\(cpus)", "-append", "wss=64M rate=64M"])
        defer { tern.stop() }
        let healthy = tern.waitForOutput(timeout: 20) { guestHealthy($0, passes: 3) }
        #expect(healthy, "stdout: \(tern.standardOutput)\nstderr: \(tern.standardError)")
        #expect(tern.standardOutput.contains("tern-guest: start cpus \(cpus) wss 64 MiB rate 64 MiB/s pattern random"))
        let rates = tern.standardOutput.split(separator: "\n").filter { $0.contains(" pass ") }.compactMap { line in
            line.split(separator: " ").dropFirst(4).first.flatMap { Int($0.replacingOccurrences(of: "MiB/s", with: "")) }
        }
        #expect(rates.contains { (60...68).contains($0) }, "the guest did not reach its dirty rate: \(rates)")
    }

    @Test("reboot in the guest ends tern with status 0")
    func rebootExitsCleanly() throws {
        let tern = try ChildProcess.tern(["run", "-m", "128M", "-append", "wss=16M rate=8M reboot=2"])
        let status = tern.waitForExit(timeout: 20)
        #expect(status == 0, "stderr: \(tern.standardError)")
        #expect(tern.standardOutput.contains("tern-guest: reboot"))
        #expect(tern.standardError.contains("guest reset"))
    }

    @Test("-S starts paused: the guest prints nothing")
    func startsPaused() throws {
        let tern = try ChildProcess.tern(["run", "-m", "128M", "-S", "-append", "wss=16M"])
        defer { tern.stop() }
        Thread.sleep(forTimeInterval: 1.5)
        #expect(tern.process.isRunning)
        #expect(tern.standardOutput.isEmpty)
    }

    @Test("a large -m starts with a small resident size")
    func lazyMemory() throws {
        let tern = try ChildProcess.tern(["run", "-m", "16G", "-append", "wss=16M"])
        defer { tern.stop() }
        #expect(tern.waitForOutput(timeout: 20) { guestHealthy($0, passes: 1) }, "stderr: \(tern.standardError)")
        let status = try String(contentsOfFile: "/proc/\(tern.process.processIdentifier)/status", encoding: .utf8)
        let resident = status.split(separator: "\n").first { $0.hasPrefix("VmRSS:") }
        let kilobytes = resident.flatMap { Int($0.split(separator: " ").dropFirst().first ?? "") } ?? Int.max
        #expect(kilobytes < 256 * 1024, "resident \(kilobytes) KiB for a 16 GiB guest")
    }
}
