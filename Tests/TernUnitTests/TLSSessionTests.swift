import Foundation
import Testing
@testable import Migration

/// TLS sessions over a real socket pair with certificates from tests/tls_certs.py: both
/// directions at once from two threads each (as the stream and the return path use one
/// connection), the bytes checked end to end; and the objects' checks of their files.
@Suite struct TLSSessionTests {
    /// A fresh test CA with QEMU-style directories, or nil (with the reason) when Python's
    /// `cryptography` package is missing.
    static func makePKI() throws -> [String: String] {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("tern-tls-\(UUID().uuidString)")
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("tests/tls_certs.py")
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["python3", script.path, directory.path]
        let output = Pipe()
        process.standardOutput = output
        try process.run()
        let text = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        try #require(process.terminationStatus == 0, "tests/tls_certs.py failed (is python3's cryptography installed?)")
        var paths: [String: String] = [:]
        for line in text.split(separator: "\n") {
            let parts = line.split(separator: " ", omittingEmptySubsequences: true)
            if parts.count == 2 { paths[String(parts[0])] = String(parts[1]) }
        }
        return paths
    }

    /// A connected pair: the client's session made on one thread while the server's is made
    /// on another (each handshake waits for the other side).
    static func connectedPair(server: TLSServerSettings, client: TLSClientSettings) throws -> (TLSSession, TLSSession) {
        var fds: [Int32] = [0, 0]
        try #require(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0)
        let serverResult = LockedBox<Result<TLSSession, MigrationStreamError>?>(nil)
        let serverFD = fds[0]
        let thread = Thread {
            do throws(MigrationStreamError) {
                serverResult.set(.success(try TLSSession.server(descriptor: serverFD, settings: server)))
            } catch {
                serverResult.set(.failure(error))
            }
        }
        thread.start()
        let clientSession = try TLSSession.client(descriptor: fds[1], settings: client)
        while serverResult.get() == nil { usleep(1000) }
        return (try serverResult.get()!.get(), clientSession)
    }

    @Test func bothDirectionsAtOnceKeepEveryByte() throws {
        let pki = try Self.makePKI()
        let server = TLSServerSettings(credentials: try TLSCredentials(id: "s", directory: pki["server"]!, endpoint: .server),
                                       authorization: nil)
        let client = TLSClientSettings(credentials: try TLSCredentials(id: "c", directory: pki["client"]!, endpoint: .client),
                                       hostname: "localhost")
        let (destination, source) = try Self.connectedPair(server: server, client: client)
        #expect(destination.peerSubject == "CN=source.tern.test,O=tern tests")
        // 16 MiB source -> destination (the stream) while 2000 small messages go back (the
        // return path), each direction written and read on threads of its own.
        let total = 16 << 20
        let pattern = (0..<total).map { UInt8(truncatingIfNeeded: $0 &* 2654435761 >> 13) }
        let replies = (0..<2000).map { UInt32($0) }
        let failures = LockedBox<[String]>([])
        let group = DispatchGroup()
        group.enter()
        Thread {
            pattern.withUnsafeBytes { raw in
                var offset = 0
                while offset < total {
                    let chunk = min(1 << 20, total - offset)
                    do throws(MigrationStreamError) { try source.sendAll(raw.baseAddress! + offset, count: chunk) } catch {
                        failures.update { $0.append("stream send: \(error)") }
                        break
                    }
                    offset += chunk
                }
            }
            group.leave()
        }.start()
        group.enter()
        Thread {
            for var value in replies {
                do throws(MigrationStreamError) { try destination.sendAll(&value, count: 4) } catch {
                    failures.update { $0.append("reply send: \(error)") }
                    break
                }
            }
            group.leave()
        }.start()
        group.enter()
        Thread {
            var received = [UInt8](repeating: 0, count: total)
            var got = 0
            received.withUnsafeMutableBytes { raw in
                while got < total {
                    do throws(MigrationStreamError) {
                        let n = try destination.receive(into: raw.baseAddress! + got, count: total - got)
                        if n == 0 { failures.update { $0.append("stream ended at \(got)") }; break }
                        got += n
                    } catch {
                        failures.update { $0.append("stream receive: \(error)") }
                        break
                    }
                }
            }
            if received != pattern { failures.update { $0.append("the stream's bytes differ") } }
            group.leave()
        }.start()
        var back: [UInt32] = []
        var word: UInt32 = 0
        var filled = 0
        while back.count < replies.count {
            let n = try withUnsafeMutableBytes(of: &word) { raw in try source.receive(into: raw.baseAddress! + filled, count: 4 - filled) }
            #expect(n > 0)
            if n == 0 { break }
            filled += n
            if filled == 4 { back.append(word); filled = 0 }
        }
        #expect(group.wait(timeout: .now() + 60) == .success)
        #expect(failures.get() == [])
        #expect(back == replies)
        source.finish()
        var byte: UInt8 = 0
        #expect(try destination.receive(into: &byte, count: 1) == 0, "close_notify reads as the end of the stream")
    }

    @Test func authorizationRefusesAnotherIdentity() throws {
        let pki = try Self.makePKI()
        let server = TLSServerSettings(credentials: try TLSCredentials(id: "s", directory: pki["server"]!, endpoint: .server),
                                       authorization: TLSAuthorization(id: "a", identity: "CN=someone.else,O=tern tests"))
        let client = TLSClientSettings(credentials: try TLSCredentials(id: "c", directory: pki["client"]!, endpoint: .client),
                                       hostname: "127.0.0.1")
        #expect(throws: MigrationStreamError.self) { _ = try Self.connectedPair(server: server, client: client) }
    }

    @Test func objectsCheckTheirFilesAndProperties() throws {
        let pki = try Self.makePKI()
        let registry = TLSObjectRegistry()
        let empty = FileManager.default.temporaryDirectory.path
        func refusal(_ type: String, _ properties: [String: String]) -> String {
            do throws(TLSCredentialsError) {
                try registry.create(type: type, id: "x\(properties.count)\(type.count)", properties: properties)
                return ""
            } catch { return error.message }
        }
        #expect(refusal("tls-creds-x509", ["dir": "/nonexistent"]).hasPrefix("Unable to access credentials /nonexistent/ca-cert.pem"))
        #expect(refusal("tls-creds-x509", ["dir": pki["client-nocert"]!, "endpoint": "server"])
            .contains("server-cert.pem"))
        #expect(refusal("tls-creds-x509", ["dir": pki["client"]!, "endpoint": "both"]).contains("does not accept value 'both'"))
        #expect(refusal("tls-creds-x509", ["dir": pki["client"]!, "priority": "NORMAL"]).contains("GnuTLS priority"))
        #expect(refusal("tls-creds-x509", ["dir": pki["client-expired"]!]).contains("has expired"))
        #expect(refusal("tls-creds-x509", ["dir": pki["client-expired"]!, "sanity-check": "off"]) == "")
        #expect(refusal("authz-simple", [:]).contains("needs identity="))
        #expect(refusal("memory-backend-ram", ["size": "1G"]).contains("Invalid object type"))
        _ = empty
        // A key that is not the certificate's.
        let mixed = FileManager.default.temporaryDirectory.appendingPathComponent("tern-tls-mixed-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: mixed, withIntermediateDirectories: true)
        for (from, name) in [(pki["client"]!, "ca-cert.pem"), (pki["client"]!, "client-cert.pem"), (pki["client-intruder"]!, "client-key.pem")] {
            try FileManager.default.copyItem(atPath: "\(from)/\(name)", toPath: "\(mixed)/\(name)")
        }
        #expect(refusal("tls-creds-x509", ["dir": mixed]).contains("does not belong to the certificate"))
        // Resolution at migrate time.
        try registry.create(type: "tls-creds-x509", id: "client0", properties: ["dir": pki["client"]!])
        #expect(throws: MigrationStreamError.self) {
            _ = try registry.serverSettings(credentials: "client0", authorization: "")
        }
        let settings = try registry.clientSettings(credentials: "client0", hostname: "", uri: .tcp(host: "127.0.0.1", port: "1"))
        #expect(settings?.hostname == "127.0.0.1")
        #expect(try registry.clientSettings(credentials: "", hostname: "", uri: .unix(path: "/x")) == nil)
    }
}

/// A value shared between test threads.
final class LockedBox<Value>: @unchecked Sendable {
    private var value: Value
    private let lock = NSLock()
    init(_ value: Value) { self.value = value }
    func get() -> Value { lock.withLock { value } }
    func set(_ newValue: Value) { lock.withLock { value = newValue } }
    func update(_ change: (inout Value) -> Void) { lock.withLock { change(&value) } }
}
