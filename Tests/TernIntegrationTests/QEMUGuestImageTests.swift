import Foundation
import Testing

let qemuPath = "/usr/bin/qemu-system-x86_64"

@Suite("The built-in guest under QEMU", .timeLimit(.minutes(1)))
struct QEMUGuestImageTests {
    @Test("tern guest-image writes an image QEMU's -kernel boots (TCG), printing the same lines",
          .enabled(if: FileManager.default.isExecutableFile(atPath: qemuPath), "SKIPPED: qemu-system-x86 is not installed"))
    func bootsUnderQEMU() throws {
        let image = FileManager.default.temporaryDirectory.appendingPathComponent("tern-guest-\(getpid()).bin").path
        defer { try? FileManager.default.removeItem(atPath: image) }
        let writer = try ChildProcess.tern(["guest-image", image])
        #expect(writer.waitForExit(timeout: 20) == 0)
        let qemu = try ChildProcess(qemuPath, ["-kernel", image, "-append", "wss=16M rate=8M", "-m", "128",
                                               "-display", "none", "-serial", "stdio", "-no-reboot", "-nodefaults"])
        defer { qemu.stop() }
        let healthy = qemu.waitForOutput(timeout: 30) { guestHealthy($0, passes: 2) }
        #expect(healthy, "stdout: \(qemu.standardOutput)\nstderr: \(qemu.standardError)")
        #expect(qemu.standardOutput.contains("tern-guest: start cpus 1 wss 16 MiB rate 8 MiB/s pattern random"))
    }
}
