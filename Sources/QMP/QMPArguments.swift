/// The type a command argument must have, named as QEMU's error messages name it.
public enum QMPArgumentType: String, Sendable {
    case string
    case integer
    case boolean
    case number
    case object
    case any

    func accepts(_ value: JSONValue) -> Bool {
        switch (self, value) {
        case (.any, _): true
        case (.string, .string), (.boolean, .bool), (.object, .object): true
        case (.integer, .int), (.integer, .uint): true
        case (.number, .int), (.number, .uint), (.number, .double): true
        default: false
        }
    }
}

/// One argument of a command.
public struct QMPArgument: Sendable {
    public let name: String
    public let type: QMPArgumentType
    public let isOptional: Bool

    public static func required(_ name: String, _ type: QMPArgumentType) -> QMPArgument {
        QMPArgument(name: name, type: type, isOptional: false)
    }

    public static func optional(_ name: String, _ type: QMPArgumentType) -> QMPArgument {
        QMPArgument(name: name, type: type, isOptional: true)
    }
}

/// A command's arguments after validation against its declaration: every required one is
/// there, nothing undeclared is, and each has its declared type.
public struct QMPArguments: Sendable {
    public let values: JSONObject

    /// Checks `given` against `declared`, failing with QEMU's messages.
    public init(validating given: JSONObject, against declared: [QMPArgument]) throws(QMPError) {
        for key in given.keys where !declared.contains(where: { $0.name == key }) {
            throw .generic("Parameter '\(key)' is unexpected")
        }
        for argument in declared {
            guard let value = given[argument.name] else {
                if argument.isOptional { continue }
                throw .generic("Parameter '\(argument.name)' is missing")
            }
            guard argument.type.accepts(value) else {
                throw .generic("Invalid parameter type for '\(argument.name)', expected: \(argument.type.rawValue)")
            }
        }
        self.values = given
    }

    public func string(_ name: String) -> String? { values[name]?.stringValue }
    public func bool(_ name: String) -> Bool? { values[name]?.boolValue }
    public func int64(_ name: String) -> Int64? { values[name]?.int64Value }
    public func uint64(_ name: String) -> UInt64? { values[name]?.uint64Value }
    public subscript(name: String) -> JSONValue? { values[name] }
}
