import Synchronization

/// The TLS objects a tern process has (`-object` at start-up, QMP `object-add` later), by id,
/// and their resolution into what a migration's connections use when `tls-creds` (and
/// `tls-hostname`, `tls-authz`) name them.
public final class TLSObjectRegistry: Sendable {
    private enum Object {
        case credentials(TLSCredentials)
        case authorization(TLSAuthorization)
    }
    private let objects = Mutex<[String: Object]>([:])

    public init() {}

    public func add(_ credentials: TLSCredentials) throws(TLSCredentialsError) {
        try insert(credentials.id, .credentials(credentials))
    }

    public func add(_ authorization: TLSAuthorization) throws(TLSCredentialsError) {
        try insert(authorization.id, .authorization(authorization))
    }

    private func insert(_ id: String, _ object: Object) throws(TLSCredentialsError) {
        let added = objects.withLock { objects -> Bool in
            guard objects[id] == nil else { return false }
            objects[id] = object
            return true
        }
        if !added { throw TLSCredentialsError("attempt to add duplicate property '\(id)' to object (type 'container')") }
    }

    /// `object-del`; false if there is no such object.
    public func remove(_ id: String) -> Bool {
        objects.withLock { $0.removeValue(forKey: id) != nil }
    }

    private func credentials(_ id: String, for endpoint: TLSEndpoint) throws(MigrationStreamError) -> TLSCredentials {
        guard case let .credentials(credentials)? = objects.withLock({ $0[id] }) else {
            throw MigrationStreamError("No TLS credentials with id '\(id)'")
        }
        guard credentials.endpoint == endpoint else {
            throw MigrationStreamError("Expecting TLS credentials with a \(endpoint.rawValue) endpoint")
        }
        return credentials
    }

    /// What the source's connections use, or nil when `tls-creds` is empty (no TLS). The
    /// hostname its certificate must carry is `tls-hostname`, else the URI's host.
    func clientSettings(credentials id: String, hostname: String, uri: MigrationURI) throws(MigrationStreamError) -> TLSClientSettings? {
        guard !id.isEmpty else { return nil }
        let credentials = try credentials(id, for: .client)
        var name: String? = hostname.isEmpty ? nil : hostname
        switch uri {
        case let .tcp(host, _): if name == nil, !host.isEmpty { name = host }
        case .unix, .descriptor: break
        case .exec: throw MigrationStreamError("TLS needs a socket: use a tcp:, unix: or fd: URI, not exec:")
        }
        if credentials.verifyPeer && name == nil {
            throw MigrationStreamError("No hostname available for TLS: set tls-hostname to the name in the destination's certificate")
        }
        return TLSClientSettings(credentials: credentials, hostname: name)
    }

    /// What the destination's connections use, or nil when `tls-creds` is empty.
    func serverSettings(credentials id: String, authorization authzID: String) throws(MigrationStreamError) -> TLSServerSettings? {
        guard !id.isEmpty else {
            if !authzID.isEmpty { throw MigrationStreamError("tls-authz '\(authzID)' needs tls-creds: set both, or neither") }
            return nil
        }
        let credentials = try credentials(id, for: .server)
        var authorization: TLSAuthorization?
        if !authzID.isEmpty {
            guard case let .authorization(found)? = objects.withLock({ $0[authzID] }) else {
                throw MigrationStreamError("No authorization object with id '\(authzID)' (tls-authz names an authz-simple object)")
            }
            guard credentials.verifyPeer else {
                throw MigrationStreamError("tls-authz '\(authzID)' needs client certificates: create '\(id)' with verify-peer=on")
            }
            authorization = found
        }
        return TLSServerSettings(credentials: credentials, authorization: authorization)
    }
}

/// A source connection's TLS: its credentials and the name the destination's certificate
/// must carry (nil only when the credentials do not verify the peer).
struct TLSClientSettings: Sendable {
    let credentials: TLSCredentials
    let hostname: String?
}

/// A destination connection's TLS: its credentials and, with `tls-authz`, who may connect.
struct TLSServerSettings: Sendable {
    let credentials: TLSCredentials
    let authorization: TLSAuthorization?
}

extension TLSObjectRegistry {
    /// The QOM types this registry creates.
    public static let types = ["tls-creds-x509", "authz-simple"]

    /// Creates and adds one object from QEMU's property spelling, as `-object` and QMP
    /// `object-add` give it (booleans as on/off, yes/no, true/false).
    public func create(type: String, id: String, properties: [String: String]) throws(TLSCredentialsError) {
        func flag(_ name: String, default value: Bool) throws(TLSCredentialsError) -> Bool {
            guard let text = properties[name] else { return value }
            switch text {
            case "on", "yes", "true": return true
            case "off", "no", "false": return false
            default: throw TLSCredentialsError("Parameter '\(name)' expects 'on' or 'off'")
            }
        }
        func check(_ known: Set<String>) throws(TLSCredentialsError) {
            if let unknown = properties.keys.sorted().first(where: { !known.contains($0) }) {
                let hint = switch unknown {
                case "priority": ": tern uses OpenSSL's TLS 1.2/1.3 defaults, not GnuTLS priority strings"
                case "passwordid": ": tern reads unencrypted PEM keys only"
                default: ""
                }
                throw TLSCredentialsError("Property '\(type).\(unknown)' not found\(hint)")
            }
        }
        guard !id.isEmpty else { throw TLSCredentialsError("Parameter 'id' is missing") }
        switch type {
        case "tls-creds-x509":
            try check(["dir", "endpoint", "verify-peer", "sanity-check", "loaded"])
            guard let directory = properties["dir"], !directory.isEmpty else {
                throw TLSCredentialsError("tls-creds-x509 '\(id)' needs dir=DIRECTORY (with ca-cert.pem and the endpoint's certificate and key)")
            }
            let endpointText = properties["endpoint"] ?? "client"
            guard let endpoint = TLSEndpoint(rawValue: endpointText) else {
                throw TLSCredentialsError("Parameter 'endpoint' does not accept value '\(endpointText)' (client or server)")
            }
            try add(TLSCredentials(id: id, directory: directory, endpoint: endpoint,
                                   verifyPeer: try flag("verify-peer", default: true),
                                   sanityCheck: try flag("sanity-check", default: true)))
        case "authz-simple":
            try check(["identity"])
            guard let identity = properties["identity"], !identity.isEmpty else {
                throw TLSCredentialsError("authz-simple '\(id)' needs identity=NAME (the source certificate's distinguished name)")
            }
            try add(TLSAuthorization(id: id, identity: identity))
        case "tls-creds-anon", "tls-creds-psk":
            throw TLSCredentialsError("tern has no '\(type)' credentials: use tls-creds-x509 (certificates, mutual authentication)")
        default:
            throw TLSCredentialsError("Invalid object type '\(type)' (tern creates \(Self.types.joined(separator: " and ")) objects)")
        }
    }
}
