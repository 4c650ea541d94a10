import Foundation
import Testing

/// The committed guest image must be exactly what guest/build.sh makes from guest/tern-guest.S.
@Suite("Built-in guest build")
struct BuiltinGuestBuildTests {
    static let packageRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent()
    static let hasBinutils = ["/usr/bin/as", "/usr/bin/ld", "/usr/bin/objcopy"].allSatisfy {
        FileManager.default.isExecutableFile(atPath: $0)
    }

    @Test("rebuilding from source gives the committed image and Swift array",
          .enabled(if: hasBinutils, "needs GNU binutils (as, ld, objcopy) to rebuild the guest"))
    func rebuildMatches() throws {
        let scratch = FileManager.default.temporaryDirectory.appendingPathComponent("tern-guest-\(getpid())")
        defer { try? FileManager.default.removeItem(at: scratch) }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/bash")
        process.arguments = [Self.packageRoot.appendingPathComponent("guest/build.sh").path, scratch.path, scratch.path]
        process.standardError = FileHandle.nullDevice
        try process.run()
        process.waitUntilExit()
        #expect(process.terminationStatus == 0)
        let committedImage = try Data(contentsOf: Self.packageRoot.appendingPathComponent("guest/tern-guest.bin"))
        let rebuiltImage = try Data(contentsOf: scratch.appendingPathComponent("tern-guest.bin"))
        #expect(committedImage == rebuiltImage, "guest/tern-guest.bin is stale: run guest/build.sh")
        let committedSwift = try String(contentsOf: Self.packageRoot.appendingPathComponent("Sources/Machine/BuiltinGuestImage.swift"), encoding: .utf8)
        let rebuiltSwift = try String(contentsOf: scratch.appendingPathComponent("BuiltinGuestImage.swift"), encoding: .utf8)
        #expect(committedSwift == rebuiltSwift, "Sources/Machine/BuiltinGuestImage.swift is stale: run guest/build.sh")
    }
}
