/// A command-line mistake, with a message that names the option and says what is accepted.
public struct CommandLineError: Error, CustomStringConvertible, Equatable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}
