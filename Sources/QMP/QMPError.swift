/// A QMP error reply: `{"error": {"class": CLASS, "desc": TEXT}}`, with QEMU's classes.
public struct QMPError: Error, Equatable, CustomStringConvertible {
    public enum ErrorClass: String, Sendable {
        case genericError = "GenericError"
        case commandNotFound = "CommandNotFound"
        case deviceNotActive = "DeviceNotActive"
        case deviceNotFound = "DeviceNotFound"
        case kvmMissingCapability = "KVMMissingCap"
    }

    public let errorClass: ErrorClass
    public let desc: String

    public init(_ errorClass: ErrorClass, _ desc: String) {
        self.errorClass = errorClass
        self.desc = desc
    }

    public static func generic(_ desc: String) -> QMPError { QMPError(.genericError, desc) }

    public var description: String { "\(errorClass.rawValue): \(desc)" }

    var json: JSONValue {
        ["class": .string(errorClass.rawValue), "desc": .string(desc)]
    }
}
