import Foundation
import Machine
import Testing

@Suite("Pause and resume", .enabled(if: kvmAvailable, kvmMissingReason), .timeLimit(.minutes(1)))
struct PauseResumeTests {
    @Test("a paused guest prints nothing; resumed, its self-check still passes", arguments: [1, 2])
    func pauseAndResume(cpus: Int) throws {
        let log = FileManager.default.temporaryDirectory.appendingPathComponent("tern-pause-\(getpid())-\(cpus).log").path
        defer { try? FileManager.default.removeItem(atPath: log) }
        var configuration = MachineConfiguration()
        configuration.memorySize = 256 << 20
        configuration.cpuCount = cpus
        configuration.boot = .builtinGuest(arguments: "wss=32M rate=32M")
        configuration.serial = .file(path: log)
        let machine = try Machine(configuration: configuration)
        defer { machine.end(.hostQuit(cause: .signal, reason: "test over")); _ = machine.waitUntilEnded() }
        machine.start()
        func output() -> String { (try? String(contentsOfFile: log, encoding: .utf8)) ?? "" }
        func wait(_ condition: () -> Bool) -> Bool {
            let deadline = Date().addingTimeInterval(15)
            while !condition() && Date() < deadline { Thread.sleep(forTimeInterval: 0.05) }
            return condition()
        }
        #expect(wait { passLines(output()).count >= 2 })
        machine.pause()
        #expect(machine.runState == .paused)
        let frozen = output()
        Thread.sleep(forTimeInterval: 2.5)
        #expect(output() == frozen, "the guest printed while paused")
        machine.resume()
        #expect(machine.runState == .running)
        let before = passLines(frozen).count
        #expect(wait { passLines(output()).count >= before + 3 })
        #expect(guestHealthy(output(), passes: before + 3), "\(output())")
    }
}
