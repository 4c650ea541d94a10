import Machine
import QMP

/// A `-chardev`: a named backend that a monitor (`-mon chardev=ID`) or the serial port
/// (`-device isa-serial,chardev=ID`, `-serial chardev:ID`) connects to. tern has the backends
/// libvirt and QEMU users pass for those two: a listening socket (a path, a TCP port, or an
/// inherited descriptor), a pseudo-terminal, a file, standard I/O and null.
struct Chardev: Equatable {
    enum Backend: Equatable {
        /// `socket,fd=N,server=on`: a socket the parent already bound and listens on.
        case inheritedListener(descriptor: Int32)
        case unixServer(path: String, wait: Bool)
        case tcpServer(host: String, port: String, wait: Bool)
        case pty
        case file(path: String)
        case stdio
        case null
    }

    var id: String
    var backend: Backend

    init(parsing text: String) throws(CommandLineError) {
        let list = try QEMUOptionList(parsing: text, option: "chardev", impliedKey: "backend")
        guard let id = list["id"], !id.isEmpty else {
            throw CommandLineError("tern run: -chardev \(text): every chardev needs an id=NAME")
        }
        self.id = id
        let context = "tern run: -chardev \(text)"
        switch list.implied {
        case "socket":
            try list.check(known: ["id", "fd", "path", "host", "port", "server", "wait", "nowait", "telnet", "logfile", "logappend"],
                           option: "chardev", text: text)
            guard QEMUOptionList.isOn(list["server"]) == true else {
                throw CommandLineError("\(context): tern only listens; add server=on")
            }
            let wait = list["nowait"] == nil && QEMUOptionList.isOn(list["wait"]) != false
            if let fd = list["fd"] {
                guard let descriptor = Int32(fd), descriptor > 2 else {
                    throw CommandLineError("\(context): fd=\(fd) is not an inherited descriptor number")
                }
                backend = .inheritedListener(descriptor: descriptor)
            } else if let path = list["path"], !path.isEmpty {
                backend = .unixServer(path: path, wait: wait)
            } else if let port = list["port"] {
                backend = .tcpServer(host: list["host"] ?? "0.0.0.0", port: port, wait: wait)
            } else {
                throw CommandLineError("\(context): a socket chardev needs fd=N, path=PATH or port=PORT")
            }
        case "pty":
            try list.check(known: ["id", "logfile", "logappend"], option: "chardev", text: text)
            backend = .pty
        case "file":
            try list.check(known: ["id", "path", "append"], option: "chardev", text: text)
            guard let path = list["path"], !path.isEmpty else { throw CommandLineError("\(context): a file chardev needs path=PATH") }
            backend = .file(path: path)
        case "stdio":
            try list.check(known: ["id", "signal", "mux"], option: "chardev", text: text)
            backend = .stdio
        case "null":
            try list.check(known: ["id"], option: "chardev", text: text)
            backend = .null
        case let other:
            throw CommandLineError("\(context): tern has no '\(other ?? "")' chardev backend (it has socket, pty, file, stdio and null)")
        }
    }

    /// The serial port's backend, when this chardev can be one.
    func serialBackend(context: String) throws(CommandLineError) -> SerialBackend {
        switch backend {
        case .pty: return .pty
        case let .file(path): return .file(path: path)
        case .stdio: return .stdio
        case .null: return .none
        case .inheritedListener, .unixServer, .tcpServer:
            throw CommandLineError("\(context): tern connects the serial port to a pty, file, stdio or null chardev, not a socket")
        }
    }

    /// The QMP endpoint, when this chardev can carry a monitor.
    func monitorEndpoint(context: String) throws(CommandLineError) -> QMPEndpoint {
        var endpoint: QMPEndpoint
        switch backend {
        case let .inheritedListener(descriptor): endpoint = QMPEndpoint(address: .inherited(descriptor: descriptor), waitForClient: false)
        case let .unixServer(path, wait): endpoint = QMPEndpoint(address: .unix(path: path), waitForClient: wait)
        case let .tcpServer(host, port, wait): endpoint = QMPEndpoint(address: .tcp(host: host, port: port), waitForClient: wait)
        case .pty, .file, .stdio, .null:
            throw CommandLineError("\(context): tern's monitor listens on a socket chardev (socket,...,server=on)")
        }
        endpoint.label = id
        return endpoint
    }
}
