import CTLS
import Foundation

/// Which end of a TLS connection a set of credentials is for (QEMU's `endpoint`).
public enum TLSEndpoint: String, Sendable {
    /// The migration source: it connects, checks the destination's certificate.
    case client
    /// The migration destination: it listens, shows its certificate, checks the source's.
    case server
}

/// Why a TLS object could not be created: the message names the file and what is wrong.
public struct TLSCredentialsError: Error, CustomStringConvertible, Equatable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// QEMU's `tls-creds-x509` object: X.509 files laid out as QEMU lays them out in one directory
/// (`ca-cert.pem`, optional `ca-crl.pem`, `server-cert.pem` and `server-key.pem` for a server,
/// optional `client-cert.pem` and `client-key.pem` for a client), loaded once, when the object
/// is created, into an OpenSSL context that every connection of a migration shares. With
/// `verify-peer` (the default) a server demands and checks the client's certificate and a
/// client checks the server's; with `sanity-check` (the default) its own certificate must be
/// valid today.
public final class TLSCredentials: @unchecked Sendable {
    // Sendable: the OpenSSL context is configured here and only read afterwards (SSL_new),
    // which OpenSSL allows from any thread.
    public let id: String
    public let endpoint: TLSEndpoint
    public let directory: String
    public let verifyPeer: Bool
    let context: OpaquePointer

    public init(id: String, directory: String, endpoint: TLSEndpoint, verifyPeer: Bool = true,
                sanityCheck: Bool = true) throws(TLSCredentialsError) {
        self.id = id
        self.directory = directory
        self.endpoint = endpoint
        self.verifyPeer = verifyPeer
        func path(_ name: String) -> String { (directory as NSString).appendingPathComponent(name) }
        func require(_ name: String) throws(TLSCredentialsError) -> String {
            let file = path(name)
            if access(file, R_OK) != 0 {
                throw TLSCredentialsError("Unable to access credentials \(file): \(String(cString: strerror(errno)))")
            }
            return file
        }
        func optional(_ name: String) -> String? {
            let file = path(name)
            return access(file, F_OK) == 0 ? file : nil
        }
        let caCertificate = try require("ca-cert.pem")
        let certificate: String?
        let key: String?
        switch endpoint {
        case .server:
            certificate = try require("server-cert.pem")
            key = try require("server-key.pem")
        case .client:
            certificate = optional("client-cert.pem")
            key = certificate == nil ? nil : try require("client-key.pem")
        }
        guard let context = SSL_CTX_new(endpoint == .server ? TLS_server_method() : TLS_client_method()) else {
            throw TLSCredentialsError("OpenSSL could not create a TLS context: \(TLSError.takeText())")
        }
        self.context = context
        guard tern_tls_configure_context(context) == 0 else {
            throw TLSCredentialsError("OpenSSL refused TLS 1.2 as the minimum version: \(TLSError.takeText())")
        }
        guard SSL_CTX_load_verify_locations(context, caCertificate, nil) == 1 else {
            throw TLSCredentialsError("Unable to load CA certificate \(caCertificate): \(TLSError.takeText())")
        }
        if let crl = optional("ca-crl.pem"), tern_tls_load_crl(context, crl) != 0 {
            throw TLSCredentialsError("Unable to load CA revocation list \(crl): \(TLSError.takeText())")
        }
        if let certificate, let key {
            guard SSL_CTX_use_certificate_chain_file(context, certificate) == 1 else {
                throw TLSCredentialsError("Unable to load certificate \(certificate): \(TLSError.takeText())")
            }
            guard SSL_CTX_use_PrivateKey_file(context, key, SSL_FILETYPE_PEM) == 1 else {
                let reason = TLSError.takeText()
                if reason == "key values mismatch" {
                    throw TLSCredentialsError("The private key \(key) does not belong to the certificate \(certificate)")
                }
                throw TLSCredentialsError("Unable to load private key \(key) (tern reads unencrypted PEM keys): \(reason)")
            }
            guard SSL_CTX_check_private_key(context) == 1 else {
                throw TLSCredentialsError("The private key \(key) does not belong to the certificate \(certificate)")
            }
            if sanityCheck, let own = SSL_CTX_get0_certificate(context) {
                if X509_cmp_current_time(X509_get0_notAfter(own)) < 0 {
                    throw TLSCredentialsError("The certificate \(certificate) has expired")
                }
                if X509_cmp_current_time(X509_get0_notBefore(own)) > 0 {
                    throw TLSCredentialsError("The certificate \(certificate) is not yet active")
                }
            }
        }
        let mode: Int32 = switch (endpoint, verifyPeer) {
        case (_, false): SSL_VERIFY_NONE
        case (.server, true): SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT
        case (.client, true): SSL_VERIFY_PEER
        }
        SSL_CTX_set_verify(context, mode, nil)
    }

    deinit { SSL_CTX_free(context) }
}

/// QEMU's `authz-simple` object: the one client identity (the certificate's distinguished
/// name, RFC 4514, as `CN=source.example.com,O=Example,C=GB`) a destination lets in when its
/// `tls-authz` parameter names this object.
public struct TLSAuthorization: Sendable, Equatable {
    public let id: String
    public let identity: String

    public init(id: String, identity: String) {
        self.id = id
        self.identity = identity
    }

    public func allows(_ subject: String) -> Bool { subject == identity }
}

/// OpenSSL's thread-local error queue, read as text.
enum TLSError {
    /// The oldest queued error's reason ("" when none), clearing the queue.
    static func takeText() -> String {
        var buffer = [CChar](repeating: 0, count: 256)
        tern_tls_take_error(&buffer, buffer.count)
        return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
