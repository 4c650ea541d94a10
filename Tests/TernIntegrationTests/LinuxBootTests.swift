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

/// A Linux guest and tern's virtio-blk disk.
@Suite("Linux and the virtio-blk disk", .serialized, .enabled(if: kvmAvailable, kvmMissingReason), .timeLimit(.minutes(3)))
struct LinuxDiskTests {
    static func image(_ text: String) throws -> String {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("tern-vda-\(getpid()).img").path
        var bytes = Array(text.utf8)
        bytes += [UInt8](repeating: 0, count: (8 << 20) - bytes.count)
        FileManager.default.createFile(atPath: path, contents: Data(bytes))
        return path
    }

    @Test("the kernel is told where the disk is (virtio_mmio.device= on its command line)",
          .enabled(if: debianKernel != nil, "SKIPPED: no /boot/vmlinuz-* (.ci/run installs linux-image-amd64)"))
    func commandLineAnnouncesTheDisk() throws {
        let kernel = try #require(debianKernel)
        let disk = try Self.image("TERN-DISK")
        defer { unlink(disk) }
        let tern = try ChildProcess.tern(["run", "-m", "512M", "-kernel", kernel, "-append", "tern.test=disk",
                                          "-drive", "file=\(disk),format=raw,if=virtio"])
        defer { tern.stop() }
        let seen = tern.waitForOutput(timeout: 120) { $0.contains("virtio_mmio.device=4K@0xd0000000:5") }
        #expect(seen, "stdout: \(tern.standardOutput.suffix(2000))\nstderr: \(tern.standardError)")
    }

    @Test("a busybox guest reads /dev/vda: the image's first bytes",
          .enabled(if: hardwareKVM, "SKIPPED: needs a VMX/SVM host; on kvm_pvm Linux stops after its early boot, before any driver"),
          .enabled(if: debianKernel != nil, "SKIPPED: no /boot/vmlinuz-*"),
          .enabled(if: FileManager.default.fileExists(atPath: "/bin/busybox"), "SKIPPED: busybox-static is not installed"))
    func busyboxReadsTheDisk() throws {
        let kernel = try #require(debianKernel)
        let disk = try Self.image("TERN-VDA-MAGIC-42")
        defer { unlink(disk) }
        // Debian builds virtio_mmio and virtio_blk as modules: the initramfs carries the kernel's
        // own, and insmod (unlike modprobe) does not read /proc/cmdline, so the device is given
        // to virtio_mmio as its parameter, exactly as tern puts it on the command line.
        let version = String(kernel.dropFirst("/boot/vmlinuz-".count))
        let modules = "/lib/modules/\(version)/kernel/drivers"
        let initramfs = try BusyboxInitramfs.build(initScript: """
        #!/bin/busybox sh
        /bin/busybox mount -t proc proc /proc
        /bin/busybox mount -t devtmpfs dev /dev
        /bin/busybox insmod /modules/virtio.ko
        /bin/busybox insmod /modules/virtio_ring.ko
        /bin/busybox insmod /modules/virtio_mmio.ko device=4K@0xd0000000:5
        /bin/busybox insmod /modules/virtio_blk.ko
        /bin/busybox sleep 1
        echo "VDA: $(/bin/busybox head -c 17 /dev/vda)"
        /bin/busybox reboot -f
        """, files: [
            "modules/virtio.ko": "\(modules)/virtio/virtio.ko", "modules/virtio_ring.ko": "\(modules)/virtio/virtio_ring.ko",
            "modules/virtio_mmio.ko": "\(modules)/virtio/virtio_mmio.ko", "modules/virtio_blk.ko": "\(modules)/block/virtio_blk.ko",
        ])
        let tern = try ChildProcess.tern(["run", "-m", "512M", "-kernel", kernel, "-initrd", initramfs, "-append", "quiet",
                                          "-drive", "file=\(disk),format=raw,if=virtio"])
        defer { tern.stop() }
        #expect(tern.waitForExit(timeout: 150) == 0, "stderr: \(tern.standardError)")
        #expect(tern.standardOutput.contains("VDA: TERN-VDA-MAGIC-42"), "\(tern.standardOutput.suffix(3000))")
    }
}

/// Builds a gzip'd cpio initramfs holding busybox and an /init script.
enum BusyboxInitramfs {
    /// `files` maps paths inside the initramfs to host files to copy there.
    static func build(initScript: String, files: [String: String] = [:]) throws -> String {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("tern-initramfs-\(getpid())")
        try? FileManager.default.removeItem(at: root)
        for directory in ["bin", "proc", "dev", "modules"] {
            try FileManager.default.createDirectory(at: root.appendingPathComponent(directory), withIntermediateDirectories: true)
        }
        for (inside, host) in files {
            try FileManager.default.copyItem(atPath: host, toPath: root.appendingPathComponent(inside).path)
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
