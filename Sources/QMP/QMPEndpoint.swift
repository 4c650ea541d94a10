/// Where a QMP server listens, parsed from QEMU's `-qmp` syntax:
/// `unix:PATH,server=on,wait=off`, `tcp:HOST:PORT,server=on,wait=off`, and the older
/// `server,nowait` spelling.
public struct QMPEndpoint: Equatable, Sendable {
    public enum Address: Equatable, Sendable {
        case unix(path: String)
        case tcp(host: String, port: String)
        /// A socket already listening, inherited from the parent (`-chardev socket,fd=N`, as
        /// libvirt passes the monitor).
        case inherited(descriptor: Int32)
    }

    public var address: Address
    /// `wait=on` (QEMU's default for a server): tern does not start the guest until a client
    /// has connected.
    public var waitForClient: Bool
    /// The chardev's id in `query-chardev` (`-mon chardev=ID`); `-qmp` monitors are
    /// `compat_monitorN`, as in QEMU.
    public var label: String?

    public init(address: Address, waitForClient: Bool, label: String? = nil) {
        self.address = address
        self.waitForClient = waitForClient
        self.label = label
    }

    /// Parses the text after `-qmp`; the error says what is accepted.
    public init(parsing text: String) throws(QMPEndpointError) {
        var parts = text.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        let location = parts.removeFirst()
        var server = false
        var wait = true
        for option in parts {
            switch option {
            case "server", "server=on", "server=yes", "server=true": server = true
            case "server=off", "server=no", "server=false": server = false
            case "nowait", "wait=off", "wait=no", "wait=false": wait = false
            case "wait", "wait=on", "wait=yes", "wait=true": wait = true
            default: throw QMPEndpointError("-qmp \(text): unknown option '\(option)'")
            }
        }
        guard server else {
            throw QMPEndpointError("-qmp \(text): tern's monitor only listens; add server=on (and wait=off to start at once)")
        }
        if location.hasPrefix("unix:") {
            let path = String(location.dropFirst(5))
            guard !path.isEmpty else { throw QMPEndpointError("-qmp \(text): the unix socket needs a path") }
            self.address = .unix(path: path)
        } else if location.hasPrefix("tcp:") {
            let hostPort = location.dropFirst(4)
            guard let colon = hostPort.lastIndex(of: ":"), !hostPort[hostPort.index(after: colon)...].isEmpty else {
                throw QMPEndpointError("-qmp \(text): expected tcp:HOST:PORT")
            }
            var host = String(hostPort[..<colon])
            if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
            self.address = .tcp(host: host, port: String(hostPort[hostPort.index(after: colon)...]))
        } else {
            throw QMPEndpointError("-qmp \(text): expected unix:PATH,server=on,wait=off or tcp:HOST:PORT,server=on,wait=off")
        }
        self.waitForClient = wait
    }

    public var description: String {
        switch address {
        case let .unix(path): "unix:\(path)"
        case let .tcp(host, port): "tcp:\(host):\(port)"
        case let .inherited(descriptor): "fd:\(descriptor)"
        }
    }
}

/// A `-qmp` argument tern cannot use.
public struct QMPEndpointError: Error, Equatable, CustomStringConvertible {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}
