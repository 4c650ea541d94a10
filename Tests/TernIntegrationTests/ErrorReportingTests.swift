import Foundation
import Testing

@Suite("Errors on the command line", .serialized, .timeLimit(.minutes(1)))
struct ErrorReportingTests {
    func run(_ arguments: [String]) throws -> (status: Int32, stderr: String) {
        let tern = try ChildProcess.tern(arguments)
        let status = tern.waitForExit(timeout: 20)
        if status == nil { tern.stop() }
        return (status ?? -1, tern.standardError)
    }

    @Test("an unknown option is named, status 2")
    func unknownOption() throws {
        let result = try run(["run", "-bogus"])
        #expect(result.status == 2)
        #expect(result.stderr.contains("unknown option '-bogus'"))
    }

    @Test("a bad -m is refused, status 2")
    func badMemory() throws {
        let result = try run(["run", "-m", "lots"])
        #expect(result.status == 2)
        #expect(result.stderr.contains("-m lots: not a memory size"))
    }

    @Test("a missing kernel is named, status 1", .enabled(if: kvmAvailable, kvmMissingReason))
    func missingKernel() throws {
        let result = try run(["run", "-kernel", "/nonexistent/bzImage"])
        #expect(result.status == 1)
        #expect(result.stderr.contains("cannot read kernel '/nonexistent/bzImage': No such file or directory"))
    }

    @Test("a file that is not a bzImage is named, status 1", .enabled(if: kvmAvailable, kvmMissingReason))
    func notABzImage() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("not-a-kernel-\(getpid())").path
        _ = FileManager.default.createFile(atPath: path, contents: Data(repeating: 0x41, count: 8192))
        defer { try? FileManager.default.removeItem(atPath: path) }
        let result = try run(["run", "-kernel", path])
        #expect(result.status == 1)
        #expect(result.stderr.contains("'\(path)' is not a Linux bzImage"))
    }

    @Test("a missing /dev/kvm is reported plainly")
    func missingKVM() throws {
        // The hidden TERN_KVM_DEVICE variable points tern at another device path for this test.
        let tern = try ChildProcess("/usr/bin/env", ["TERN_KVM_DEVICE=/nonexistent/kvm", ternBinary, "run"])
        let status = tern.waitForExit(timeout: 20)
        #expect(status == 1)
        #expect(tern.standardError.contains("tern: KVM is not available: /nonexistent/kvm: No such file or directory"))
    }
}
