import Foundation
import KVM
import Testing

let debianKernel: String? = {
    let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/boot")) ?? []
    return entries.filter { $0.hasPrefix("vmlinuz-") }.sorted().last.map { "/boot/" + $0 }
}()
let hardwareKVM: Bool = if case .hardware = KVMHostFlavor.detect() { true } else { false }

@Suite("Linux boot", .serialized, .enabled(if: kvmAvailable, kvmMissingReason), .timeLimit(.minutes(3)))
struct LinuxBootTests {
    @Test("a Debian kernel prints its banner, tern's command line and tern's e820 map",
          .enabled(if: debianKernel != nil, "SKIPPED: no /boot/vmlinuz-* (.ci/run installs linux-image-amd64)"))
    func bannerCommandLineAndMemoryMap() throws {
        let kernel = try #require(debianKernel)
        let tern = try ChildProcess.tern(["run", "-m", "512M", "-kernel", kernel, "-append", "tern.test=banner"])
        defer { tern.stop() }
        let expected = [
            "Linux version ",
            "Command line: console=ttyS0 ",
            " tern.test=banner",
            "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
            "BIOS-e820: [mem 0x000000000009fc00-0x000000000009ffff] reserved",
            "BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable",
            "found SMP MP-table at [mem 0x0009fc00-0x0009fc0f]",
        ]
        let seen = tern.waitForOutput(timeout: 120) { output in expected.allSatisfy { output.contains($0) } }
        #expect(seen, "missing: \(expected.filter { !tern.standardOutput.contains($0) })\nstderr: \(tern.standardError)")
    }

    @Test("a busybox initramfs reaches its init and reboots to status 0",
          .enabled(if: hardwareKVM, "SKIPPED: needs a VMX/SVM host; on kvm_pvm Linux stops after its early boot"),
          .enabled(if: debianKernel != nil, "SKIPPED: no /boot/vmlinuz-*"),
          .enabled(if: FileManager.default.fileExists(atPath: "/bin/busybox"), "SKIPPED: busybox-static is not installed"))
    func busyboxInit() throws {
        let kernel = try #require(debianKernel)
        let initramfs = try BusyboxInitramfs.build(initScript: """
        #!/bin/busybox sh
        /bin/busybox mount -t proc proc /proc
        echo TERN-INIT-OK
        /bin/busybox reboot -f
        """)
        let tern = try ChildProcess.tern(["run", "-m", "512M", "-kernel", kernel, "-initrd", initramfs, "-append", "quiet"])
        defer { tern.stop() }
        #expect(tern.waitForExit(timeout: 150) == 0, "stderr: \(tern.standardError)")
        #expect(tern.standardOutput.contains("TERN-INIT-OK"))
    }
}

/// Builds a gzip'd cpio initramfs holding busybox and an /init script.
enum BusyboxInitramfs {
    static func build(initScript: String) throws -> String {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("tern-initramfs-\(getpid())")
        try? FileManager.default.removeItem(at: root)
        for directory in ["bin", "proc", "dev"] {
            try FileManager.default.createDirectory(at: root.appendingPathComponent(directory), withIntermediateDirectories: true)
        }
        try FileManager.default.copyItem(atPath: "/bin/busybox", toPath: root.appendingPathComponent("bin/busybox").path)
        let initPath = root.appendingPathComponent("init").path
        try initScript.write(toFile: initPath, atomically: true, encoding: .utf8)
        chmod(initPath, 0o755)
        let output = root.path + ".cpio.gz"
        let shell = Process()
        shell.executableURL = URL(fileURLWithPath: "/bin/sh")
        shell.arguments = ["-c", "cd '\(root.path)' && find . | cpio -o -H newc 2>/dev/null | gzip > '\(output)'"]
        try shell.run()
        shell.waitUntilExit()
        return output
    }
}
