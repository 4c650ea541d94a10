import Migration

/// `object-add` and `object-del` for the objects a migration's TLS uses (`tls-creds-x509`,
/// `authz-simple`), as libvirt sends them before it sets `tls-creds`. Both QEMU spellings are
/// taken: properties beside `qom-type` and `id` (QEMU 6.0 and later), or inside `props`.
extension QMPStandardCommands {
    static let objectProperties = ["dir", "endpoint", "verify-peer", "sanity-check", "loaded", "priority", "passwordid", "identity"]

    static func objectCommands(_ migration: MigrationController) -> [QMPCommand] {
        [
            QMPCommand("object-add", arguments: [.required("qom-type", .string), .required("id", .string), .optional("props", .object)]
                       + objectProperties.map { .optional($0, .any) }) { call throws(QMPError) in
                var properties: [String: String] = [:]
                var given: [(String, JSONValue)] = objectProperties.compactMap { name in call.arguments[name].map { (name, $0) } }
                if let legacy = call.arguments["props"]?.objectValue { given += legacy.members.map { ($0.key, $0.value) } }
                for (name, value) in given {
                    switch value {
                    case let .string(text): properties[name] = text
                    case let .bool(flag): properties[name] = flag ? "on" : "off"
                    default: throw .generic("Invalid parameter type for '\(name)', expected: string or boolean")
                    }
                }
                do throws(TLSCredentialsError) {
                    try migration.tlsObjects.create(type: call.arguments.string("qom-type")!, id: call.arguments.string("id")!,
                                                    properties: properties)
                } catch { throw .generic(error.message) }
                return .object([:])
            },
            QMPCommand("object-del", arguments: [.required("id", .string)]) { call throws(QMPError) in
                let id = call.arguments.string("id")!
                guard migration.tlsObjects.remove(id) else { throw .generic("object '\(id)' not found") }
                return .object([:])
            },
        ]
    }
}
