import CTLS
import Foundation

/// One TLS connection of a migration (the main stream with its return path, or a multifd
/// channel), over OpenSSL on a non-blocking socket.
///
/// A connection is read and written by two threads at once (the source's stream writer and
/// its return-path reader; the destination's loader and its return-path sender). OpenSSL does
/// not allow two threads in one session at the same time, so each OpenSSL call runs under a
/// lock, and a call that would block returns instead: the thread then waits for the socket in
/// `poll` with the lock released, and the other direction goes on meanwhile.
///
/// After the handshake the destination sends one byte, its verdict: `Y` (this source may go
/// on) or `N` (its certificate passed but `tls-authz` does not list it). A source reads the
/// verdict before it reports the connection open, so every refusal is an error at `migrate`,
/// not a failed write later (under TLS 1.3 a client finishes its handshake before the server
/// has checked the client's certificate).
final class TLSSession: ConnectionIO, @unchecked Sendable {
    // Sendable: `ssl` and `failed` are touched only under `lock`.
    private let ssl: OpaquePointer
    let descriptor: Int32
    private let lock = NSLock()
    private var failed = false
    private var finished = false

    /// How long a handshake, and the verdict after it, may take.
    static let handshakeSeconds: Double = 10
    static let accepted: UInt8 = 0x59 // "Y"
    static let refused: UInt8 = 0x4e // "N"
    /// The first byte a TLS client sends: the type of a handshake record.
    static let handshakeRecordType: UInt8 = 22

    private init(descriptor: Int32, context: OpaquePointer) throws(MigrationStreamError) {
        guard let ssl = SSL_new(context) else {
            throw MigrationStreamError("OpenSSL could not start a TLS session: \(TLSError.takeText())")
        }
        self.ssl = ssl
        self.descriptor = descriptor
        SSL_set_fd(ssl, descriptor)
        tern_tls_set_partial_writes(ssl)
        // Read whole bursts of records per system call, not a header and then a body.
        SSL_set_read_ahead(ssl, 1)
        SSL_set_default_read_buffer_len(ssl, 256 << 10)
        let flags = fcntl(descriptor, F_GETFL)
        if flags >= 0 { _ = fcntl(descriptor, F_SETFL, flags | O_NONBLOCK) }
    }

    deinit { SSL_free(ssl) }

    // MARK: handshakes

    /// The source's side: handshake, check the destination's certificate against the CA and
    /// the hostname, then wait for the destination's verdict on this source.
    static func client(descriptor: Int32, settings: TLSClientSettings) throws(MigrationStreamError) -> TLSSession {
        let session = try TLSSession(descriptor: descriptor, context: settings.credentials.context)
        if let hostname = settings.hostname {
            if isIPAddress(hostname) {
                _ = X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(session.ssl), hostname)
            } else {
                _ = SSL_set1_host(session.ssl, hostname)
                _ = tern_tls_set_server_name(session.ssl, hostname)
            }
        }
        let deadline = Date().addingTimeInterval(handshakeSeconds)
        do {
            try session.handshake(deadline: deadline) { SSL_connect($0) }
        } catch {
            var reason = session.describe(error, peer: "destination", settings.hostname)
            if reason == "the peer closed the connection" || reason.contains("reset by peer") {
                reason += " (a destination without tls-creds reads the handshake as a broken stream: set tls-creds on both sides)"
            }
            throw MigrationStreamError("TLS handshake with the destination failed: \(reason)")
        }
        var verdict: UInt8 = 0
        let count: Int
        do {
            count = try session.receive(into: &verdict, count: 1, deadline: deadline)
        } catch {
            throw MigrationStreamError("the destination refused this source's TLS certificate: \(error.message) "
                                       + "(it checks the source's client-cert.pem against its ca-cert.pem)")
        }
        guard count == 1 else {
            throw MigrationStreamError("the destination closed the TLS connection without accepting this source")
        }
        guard verdict == accepted else {
            throw MigrationStreamError("the destination's tls-authz does not accept this source's certificate"
                                       + (session.ownSubject.map { " (identity '\($0)')" } ?? ""))
        }
        return session
    }

    /// The destination's side: handshake (demanding and checking the source's certificate
    /// when the credentials verify peers), check `tls-authz`, and send the verdict.
    static func server(descriptor: Int32, settings: TLSServerSettings) throws(MigrationStreamError) -> TLSSession {
        let session = try TLSSession(descriptor: descriptor, context: settings.credentials.context)
        let deadline = Date().addingTimeInterval(handshakeSeconds)
        try session.refusePlaintextPeer(deadline: deadline)
        do {
            try session.handshake(deadline: deadline) { SSL_accept($0) }
        } catch {
            throw MigrationStreamError("TLS handshake with the source failed: \(session.describe(error, peer: "source", nil))")
        }
        var verdict = accepted
        var refusal: MigrationStreamError?
        if let authorization = settings.authorization {
            let subject = session.peerSubject ?? ""
            if !authorization.allows(subject) {
                verdict = refused
                refusal = MigrationStreamError("the source's identity '\(subject)' is not allowed by tls-authz '\(authorization.id)'")
            }
        }
        do {
            try session.sendAll(&verdict, count: 1)
        } catch {
            throw MigrationStreamError("the source went away after the TLS handshake: \(error.message)")
        }
        if let refusal { throw refusal }
        return session
    }

    /// A TLS client's first byte is a handshake record's type. A peer that starts with
    /// anything else is not speaking TLS: most likely a tern source without `tls-creds`, which
    /// would otherwise only see its connection reset. It gets the return path's FAILED message
    /// with what to do, in the clear (it reads its return path in the clear), and is refused.
    private func refusePlaintextPeer(deadline: Date) throws(MigrationStreamError) {
        var waiting = pollfd(fd: descriptor, events: Int16(POLLIN), revents: 0)
        while poll(&waiting, 1, Int32(max(0, deadline.timeIntervalSinceNow) * 1000)) < 0 && errno == EINTR {}
        var first: UInt8 = 0
        guard recv(descriptor, &first, 1, Int32(MSG_PEEK)) == 1, first != Self.handshakeRecordType else { return }
        let reason = "this destination takes migrations over TLS only: set tls-creds on the source "
            + "(a tls-creds-x509 object with endpoint=client)"
        let message = ReturnPathMessage.failed(reason).encoded()
        _ = message.withUnsafeBytes { Glibc.send(descriptor, $0.baseAddress!, $0.count, Int32(MSG_NOSIGNAL)) }
        // Let the message go before the close: drain what the source already sent (a close with
        // unread bytes would reset the connection, and the message with it).
        _ = shutdown(descriptor, Int32(SHUT_WR))
        var scratch = [UInt8](repeating: 0, count: 64 << 10)
        let until = Date().addingTimeInterval(0.5)
        while Date() < until {
            var ready = pollfd(fd: descriptor, events: Int16(POLLIN), revents: 0)
            guard poll(&ready, 1, 50) >= 0 else { break }
            if ready.revents == 0 { continue }
            if recv(descriptor, &scratch, scratch.count, 0) <= 0 { break }
        }
        throw MigrationStreamError("the source does not speak TLS (its first byte is \(first), not a TLS record); told it to set tls-creds")
    }

    private func handshake(deadline: Date, _ call: (OpaquePointer) -> Int32) throws(MigrationStreamError) {
        while true {
            let outcome = step { call($0) == 1 }
            if outcome.done { return }
            try wait(outcome, deadline: deadline)
        }
    }

    /// A handshake's failure in words: a certificate that did not verify says why, naming
    /// the hostname it was checked against.
    private func describe(_ error: MigrationStreamError, peer: String, _ hostname: String?) -> String {
        let result = lock.withLock { SSL_get_verify_result(ssl) }
        if result != Int(X509_V_OK) {
            let reason = String(cString: X509_verify_cert_error_string(result))
            let checked = hostname.map { " (checked against the CA certificate and the name '\($0)')" } ?? " (checked against the CA certificate)"
            return "the \(peer)'s certificate is not valid: \(reason)\(checked)"
        }
        return error.message
    }

    /// The protocol version and suite agreed, for the log ("TLSv1.3 TLS_AES_128_GCM_SHA256").
    var agreement: String {
        lock.withLock {
            let version = String(cString: SSL_get_version(ssl))
            let suite = SSL_get_current_cipher(ssl).flatMap { SSL_CIPHER_get_name($0) }.map { String(cString: $0) } ?? "?"
            return "\(version) \(suite)"
        }
    }

    /// The peer certificate's subject, RFC 4514 form.
    var peerSubject: String? { subject(peer: true) }

    /// This side's certificate subject, for a message.
    private var ownSubject: String? { subject(peer: false) }

    private func subject(peer: Bool) -> String? {
        var buffer = [CChar](repeating: 0, count: 1024)
        let length = lock.withLock { tern_tls_subject(ssl, peer ? 1 : 0, &buffer, buffer.count) }
        guard length >= 0 else { return nil }
        return String(decoding: buffer.prefix(Int(length)).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    // MARK: I/O

    func send(_ bytes: UnsafeRawPointer, count: Int) throws(MigrationStreamError) -> Int {
        while true {
            var written = 0
            let outcome = step { SSL_write_ex($0, bytes, count, &written) == 1 }
            if outcome.done { return written }
            do {
                try wait(outcome, deadline: nil)
            } catch {
                throw MigrationStreamError("write to the migration stream failed: \(error.message)")
            }
        }
    }

    func receive(into buffer: UnsafeMutableRawPointer, count: Int) throws(MigrationStreamError) -> Int {
        do {
            return try receive(into: buffer, count: count, deadline: nil)
        } catch {
            throw MigrationStreamError("read from the migration stream failed: \(error.message)")
        }
    }

    private func receive(into buffer: UnsafeMutableRawPointer, count: Int, deadline: Date?) throws(MigrationStreamError) -> Int {
        while true {
            var read = 0
            let outcome = step { SSL_read_ex($0, buffer, count, &read) == 1 }
            if outcome.done { return read }
            if outcome.code == SSL_ERROR_ZERO_RETURN { return 0 }
            if outcome.code == SSL_ERROR_SYSCALL && outcome.errorNumber == 0 { return 0 }
            try wait(outcome, deadline: deadline)
        }
    }

    /// Sends close_notify once, if the session is still sound; never blocks.
    func finish() {
        lock.withLock {
            guard !finished, !failed else { return }
            finished = true
            _ = SSL_shutdown(ssl)
        }
    }

    // MARK: one OpenSSL call at a time

    private struct Outcome {
        var done: Bool
        var code: Int32 = SSL_ERROR_NONE
        var errorNumber: Int32 = 0
        var text = ""
    }

    /// Runs one OpenSSL call under the lock; when it did not complete, says why.
    private func step(_ call: (OpaquePointer) -> Bool) -> Outcome {
        lock.lock()
        defer { lock.unlock() }
        ERR_clear_error()
        errno = 0
        let result: Int32 = call(ssl) ? 1 : 0
        if result == 1 { return Outcome(done: true) }
        let savedErrno = errno
        let code = SSL_get_error(ssl, result)
        var outcome = Outcome(done: false, code: code, errorNumber: savedErrno)
        if code == SSL_ERROR_SSL || code == SSL_ERROR_SYSCALL {
            outcome.text = TLSError.takeText()
            failed = true
        }
        return outcome
    }

    /// Waits for the socket as OpenSSL asked (lock released), or throws the call's error.
    private func wait(_ outcome: Outcome, deadline: Date?) throws(MigrationStreamError) {
        let events: Int16
        switch outcome.code {
        case SSL_ERROR_WANT_READ: events = Int16(POLLIN)
        case SSL_ERROR_WANT_WRITE: events = Int16(POLLOUT)
        case SSL_ERROR_SYSCALL:
            if outcome.errorNumber != 0 { throw MigrationStreamError(String(cString: strerror(outcome.errorNumber))) }
            throw MigrationStreamError(outcome.text.isEmpty ? "the peer closed the connection" : outcome.text)
        case SSL_ERROR_ZERO_RETURN:
            throw MigrationStreamError("the peer closed the connection")
        default:
            throw MigrationStreamError(outcome.text.isEmpty ? "TLS error \(outcome.code)" : outcome.text)
        }
        var waiting = pollfd(fd: descriptor, events: events, revents: 0)
        while true {
            var timeout: Int32 = -1
            if let deadline {
                let left = deadline.timeIntervalSinceNow
                if left <= 0 { throw MigrationStreamError("no answer within \(Int(Self.handshakeSeconds)) s") }
                timeout = Int32(min(left * 1000 + 1, 60_000))
            }
            let ready = poll(&waiting, 1, timeout)
            if ready > 0 { return }
            if ready < 0 && errno != EINTR { throw MigrationStreamError("poll: \(String(cString: strerror(errno)))") }
        }
    }

    private static func isIPAddress(_ text: String) -> Bool {
        var v4 = in_addr()
        var v6 = in6_addr()
        return inet_pton(AF_INET, text, &v4) == 1 || inet_pton(AF_INET6, text, &v6) == 1
    }
}
