import CSocket
import Foundation
import Synchronization

/// Where a migration goes or comes from, parsed from QEMU's URI syntax.
public enum MigrationURI: Equatable, Sendable {
    case tcp(host: String, port: String)
    case unix(path: String)
    /// A shell command: the source writes into its standard input, the destination reads its
    /// standard output (so `exec:cat > FILE` and `exec:cat FILE` save and restore a VM).
    case exec(command: String)
    /// A descriptor passed with QMP `getfd` (by name), or inherited (by number, destination).
    case descriptor(name: String)

    /// Parses a URI; the error text is QEMU's for an unknown scheme.
    public init(parsing uri: String) throws(MigrationStreamError) {
        if uri.hasPrefix("tcp:") {
            let rest = uri.dropFirst(4)
            guard let colon = rest.lastIndex(of: ":"), !rest[rest.index(after: colon)...].isEmpty else {
                throw MigrationStreamError("address resolution failed for \(rest): expected HOST:PORT")
            }
            var host = String(rest[..<colon])
            if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
            self = .tcp(host: host, port: String(rest[rest.index(after: colon)...]))
        } else if uri.hasPrefix("unix:"), uri.count > 5 {
            self = .unix(path: String(uri.dropFirst(5)))
        } else if uri.hasPrefix("exec:"), uri.count > 5 {
            self = .exec(command: String(uri.dropFirst(5)))
        } else if uri.hasPrefix("fd:"), uri.count > 3 {
            self = .descriptor(name: String(uri.dropFirst(3)))
        } else {
            throw MigrationStreamError("unknown migration protocol: \(uri)")
        }
    }
}

/// An open migration channel: the descriptor to read or write, the I/O over it (plain or TLS),
/// and the child process behind an `exec:` URI, reaped when the channel closes.
final class MigrationConnection: @unchecked Sendable {
    // Sendable: `descriptor` is fixed; whether it is still open is guarded by `open`, so a
    // canceller's `shutdownIO` never reaches a number that `close` gave back to the kernel
    // (and that may by now be a QMP client's socket).
    let descriptor: Int32
    /// How bytes cross it: the stream and the return path read and write only through this.
    let io: ConnectionIO
    private let child: Process?
    private let open = Mutex(true)

    init(descriptor: Int32, io: ConnectionIO? = nil, child: Process? = nil) {
        self.descriptor = descriptor
        self.io = io ?? PlainConnectionIO(descriptor: descriptor)
        self.child = child
        // The stream's threads block on reads and writes. A descriptor handed over by a client
        // (getfd, -incoming fd:) may be non-blocking, as a Python socket with a timeout is:
        // make it blocking, as QEMU's channel does.
        // (A TLS session sets its own descriptor non-blocking, after this.)
        if io == nil {
            let flags = fcntl(descriptor, F_GETFL)
            if flags >= 0 && flags & O_NONBLOCK != 0 { _ = fcntl(descriptor, F_SETFL, flags & ~O_NONBLOCK) }
        }
    }

    /// Waits, up to `timeout` seconds, until a socket's send queue (bytes the peer has not yet
    /// taken) is below `bytes`. A migration calls it before stopping the guest, so that the
    /// backlog in the kernel drains while the guest still runs instead of during the downtime.
    /// Returns at once for a descriptor that is not a socket.
    func waitForSendQueue(below bytes: Int32, timeout: Double) {
        let deadline = Date().addingTimeInterval(timeout)
        while sendQueueBytes >= bytes, Date() < deadline { usleep(200) }
    }

    /// Bytes in a socket's send queue that the peer has not yet taken (0 for other descriptors).
    var sendQueueBytes: Int32 {
        var queued: Int32 = 0
        return ioctl(descriptor, UInt(0x5411) /* SIOCOUTQ */, &queued) == 0 ? queued : 0
    }

    /// Unblocks a read or write stuck on a dead or slow peer (used by migrate_cancel).
    /// Does nothing once the channel is closed.
    func shutdownIO() {
        open.withLock { isOpen in
            if isOpen { _ = Foundation.shutdown(descriptor, Int32(SHUT_RDWR)) }
        }
    }

    /// Closes the channel; for `exec:`, waits for the command and reports a failure exit.
    /// Only the first call closes; later ones return nil.
    func close() -> MigrationStreamError? {
        let closed = open.withLock { isOpen -> Bool in
            guard isOpen else { return false }
            isOpen = false
            io.finish()
            Foundation.close(descriptor)
            return true
        }
        guard closed, let child else { return nil }
        child.waitUntilExit()
        if child.terminationStatus != 0 {
            return MigrationStreamError("the migration command exited with status \(child.terminationStatus)")
        }
        return nil
    }

    /// Connects the source side; with `tls`, the TLS handshake is done (and the destination
    /// has accepted this source) before it returns.
    static func connect(_ uri: MigrationURI, tls: TLSClientSettings? = nil,
                        descriptorNamed: (String) -> Int32?) throws(MigrationStreamError) -> MigrationConnection {
        let fd: Int32
        switch uri {
        case let .tcp(host, port):
            fd = csocket_connect_tcp(host, port)
            guard fd >= 0 else { throw MigrationStreamError("Failed to connect socket: \(String(cString: strerror(-fd)))") }
        case let .unix(path):
            fd = csocket_connect_unix(path)
            guard fd >= 0 else { throw MigrationStreamError("Failed to connect socket \(path): \(String(cString: strerror(-fd)))") }
        case let .exec(command):
            if tls != nil { throw MigrationStreamError("TLS needs a socket: use a tcp:, unix: or fd: URI, not exec:") }
            return try spawn(command, sourceWrites: true)
        case let .descriptor(name):
            guard let named = descriptorNamed(name) else {
                throw MigrationStreamError("File descriptor named '\(name)' has not been found")
            }
            fd = named
        }
        guard let tls else { return MigrationConnection(descriptor: fd) }
        do {
            let session = try TLSSession.client(descriptor: fd, settings: tls)
            return MigrationConnection(descriptor: fd, io: session)
        } catch {
            Foundation.close(fd)
            throw error
        }
    }

    /// The destination's side of a connected socket (accepted, or handed over with `fd:`):
    /// plain, or, with `tls`, once its peer has passed the handshake. A refused socket is closed.
    static func accepted(_ fd: Int32, tls: TLSServerSettings?) throws(MigrationStreamError) -> MigrationConnection {
        guard let tls else { return MigrationConnection(descriptor: fd) }
        do {
            return MigrationConnection(descriptor: fd, io: try TLSSession.server(descriptor: fd, settings: tls))
        } catch {
            Foundation.close(fd)
            throw error
        }
    }

    /// Starts `/bin/sh -c command` with a pipe on its standard input (source) or output
    /// (destination).
    static func spawn(_ command: String, sourceWrites: Bool) throws(MigrationStreamError) -> MigrationConnection {
        let pipe = Pipe()
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/sh")
        process.arguments = ["-c", command]
        if sourceWrites { process.standardInput = pipe } else { process.standardOutput = pipe }
        do {
            try process.run()
        } catch {
            throw MigrationStreamError("cannot run migration command '\(command)': \(error.localizedDescription)")
        }
        let handle = sourceWrites ? pipe.fileHandleForWriting : pipe.fileHandleForReading
        let fd = dup(handle.fileDescriptor)
        try? pipe.fileHandleForWriting.close()
        try? pipe.fileHandleForReading.close()
        return MigrationConnection(descriptor: fd, child: process)
    }
}

/// The destination's listening end for `-incoming tcp:` and `unix:`: bound at once (so errors
/// show at start-up), accepting the main connection and then, with multifd, its channels.
final class IncomingListener: @unchecked Sendable {
    // Sendable: the descriptor is fixed; `closed` guards the one close.
    let descriptor: Int32
    let uri: MigrationURI
    private let closed = Mutex(false)

    init(uri: MigrationURI) throws(MigrationStreamError) {
        self.uri = uri
        switch uri {
        case let .tcp(host, port):
            let fd = csocket_listen_tcp(host == "0" ? "" : host, port, 16, nil)
            guard fd >= 0 else { throw MigrationStreamError("Failed to bind socket: \(String(cString: strerror(-fd)))") }
            descriptor = fd
        case let .unix(path):
            let fd = csocket_listen_unix(path, 16)
            guard fd >= 0 else { throw MigrationStreamError("Failed to bind socket to \(path): \(String(cString: strerror(-fd)))") }
            descriptor = fd
        default:
            throw MigrationStreamError("internal: no listener for this URI")
        }
    }

    /// The main connection (waits as long as it takes). With `tls`, a peer that fails the
    /// handshake or the authorization is refused and logged, and the wait goes on: a stray or
    /// hostile client never reaches the loader, and the real source can still come.
    func accept(tls: TLSServerSettings? = nil, log: (String) -> Void = { _ in }) throws(MigrationStreamError) -> MigrationConnection {
        while true {
            let fd = csocket_accept(descriptor)
            guard fd >= 0 else {
                close()
                throw MigrationStreamError("accepting the migration connection failed: \(String(cString: strerror(-fd)))")
            }
            do {
                return try MigrationConnection.accepted(fd, tls: tls)
            } catch {
                log("refused a migration connection: \(error.message)")
            }
        }
    }

    /// A multifd channel: it must connect within `timeout` seconds (and, with `tls`, pass the
    /// handshake).
    func acceptChannel(tls: TLSServerSettings? = nil,
                       timeout: Int32 = MultifdReceiver.connectTimeoutSeconds) throws(MigrationStreamError) -> MigrationConnection {
        var waiting = pollfd(fd: descriptor, events: Int16(POLLIN), revents: 0)
        let ready = poll(&waiting, 1, timeout * 1000)
        guard ready > 0 else {
            throw MigrationStreamError("a multifd channel did not connect within \(timeout) s")
        }
        let fd = csocket_accept(descriptor)
        guard fd >= 0 else { throw MigrationStreamError("accepting a multifd channel failed: \(String(cString: strerror(-fd)))") }
        do {
            return try MigrationConnection.accepted(fd, tls: tls)
        } catch {
            throw MigrationStreamError("multifd channel: \(error.message)")
        }
    }

    /// Stops listening (and removes a unix socket's file). Once only.
    func close() {
        guard !closed.withLock({ let was = $0; $0 = true; return was }) else { return }
        Foundation.close(descriptor)
        if case let .unix(path) = uri { unlink(path) }
    }
}
