import Foundation
import QMP
import Testing
@testable import TernCLI

@Suite("Linux guest across a migration", .enabled(if: kvmAvailable, kvmMissingReason), .timeLimit(.minutes(3)))
struct LinuxMigrationTests {
    /// The numbers the guest printed as "tern-counter N" lines.
    static func counters(_ text: String) -> [Int] {
        text.split(separator: "\n").compactMap { line in
            guard let range = line.range(of: "tern-counter ") else { return nil }
            return Int(line[range.upperBound...].prefix { $0.isNumber })
        }
    }

    @Test("a busybox Linux guest keeps printing increasing counters across a live migration",
          .enabled(if: hardwareKVM, "SKIPPED: needs a VMX/SVM host; on kvm_pvm Linux does not reach user space"),
          .enabled(if: debianKernel != nil, "SKIPPED: no /boot/vmlinuz-*"),
          .enabled(if: FileManager.default.fileExists(atPath: "/bin/busybox"), "SKIPPED: busybox-static is not installed"))
    func countersContinue() throws {
        let kernel = try #require(debianKernel)
        let initramfs = try BusyboxInitramfs.build(initScript: """
        #!/bin/busybox sh
        n=0
        while true; do n=$((n+1)); echo "tern-counter $n"; /bin/busybox usleep 200000; done
        """)
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("tern-linux-mig-\(getpid())")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let sourceSocket = directory.appendingPathComponent("src.sock").path
        let port = try DemoCommand.freePort()
        let common = ["run", "-m", "512M", "-kernel", kernel, "-initrd", initramfs, "-append", "quiet"]
        let source = try ChildProcess.tern(common + ["-qmp", "unix:\(sourceSocket),server=on,wait=off"])
        defer { source.stop() }
        let destination = try ChildProcess.tern(common + ["-incoming", "tcp:127.0.0.1:\(port)"])
        defer { destination.stop() }
        #expect(source.waitForOutput(timeout: 90) { Self.counters($0).count >= 5 }, "stderr: \(source.standardError)")

        var monitor: QMPConnection?
        for _ in 0..<100 where monitor == nil {
            monitor = try? QMPConnection(address: sourceSocket)
            if monitor == nil { Thread.sleep(forTimeInterval: 0.05) }
        }
        let client = try #require(monitor)
        _ = try client.receiveMessage()
        _ = try client.execute("qmp_capabilities", arguments: nil)
        _ = try client.execute("migrate_set_speed", arguments: ["value": .int(Int64.max / 2)])
        let reply = try client.execute("migrate", arguments: ["uri": .string("tcp:127.0.0.1:\(port)")])
        #expect(reply.objectValue?["error"] == nil, "\(reply.serialized)")
        var status = ""
        for _ in 0..<600 where status != "completed" && status != "failed" {
            Thread.sleep(forTimeInterval: 0.05)
            status = try client.execute("query-migrate", arguments: nil).objectValue?["return"]?.objectValue?["status"]?.stringValue ?? ""
        }
        #expect(status == "completed")
        let lastOnSource = Self.counters(source.standardOutput).last ?? 0
        let continued = destination.waitForOutput(timeout: 30) { text in
            let numbers = Self.counters(text)
            return numbers.count >= 5 && numbers.allSatisfy { $0 > lastOnSource }
        }
        #expect(continued, "destination printed \(Self.counters(destination.standardOutput)) after source's \(lastOnSource)")
        let numbers = Self.counters(destination.standardOutput)
        #expect(numbers == numbers.sorted(), "counters went backwards: \(numbers)")
    }
}
