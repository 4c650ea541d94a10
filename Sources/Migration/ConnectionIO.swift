import CSocket
import Foundation

/// How a migration connection's bytes cross: straight through its descriptor, or through a TLS
/// session on it. The stream writer and reader and the return path use only this, so TLS is a
/// property of the connection, not an `if` in the migration loop.
protocol ConnectionIO: AnyObject, Sendable {
    /// Writes some of `count` bytes, blocking until at least one is accepted; returns how many.
    func send(_ bytes: UnsafeRawPointer, count: Int) throws(MigrationStreamError) -> Int
    /// Reads up to `count` bytes, blocking until some arrive; 0 at the end of the stream.
    func receive(into buffer: UnsafeMutableRawPointer, count: Int) throws(MigrationStreamError) -> Int
    /// Says goodbye before the descriptor closes (TLS's close_notify); nothing for plain I/O.
    func finish()
}

extension ConnectionIO {
    /// Writes all `count` bytes.
    func sendAll(_ bytes: UnsafeRawPointer, count: Int) throws(MigrationStreamError) {
        var offset = 0
        while offset < count { offset += try send(bytes + offset, count: count - offset) }
    }
}

/// Plain descriptor I/O: a socket (sends never raise SIGPIPE), or a pipe or file for `exec:`.
final class PlainConnectionIO: ConnectionIO {
    let descriptor: Int32

    init(descriptor: Int32) { self.descriptor = descriptor }

    func send(_ bytes: UnsafeRawPointer, count: Int) throws(MigrationStreamError) -> Int {
        while true {
            var sent = csocket_send(descriptor, bytes, count, -1)
            if sent == -Int(ENOTSOCK) {
                sent = write(descriptor, bytes, count) // a pipe (exec:) or file
                if sent < 0 { sent = -Int(errno) }
            }
            if sent == -Int(EINTR) { continue }
            guard sent > 0 else {
                throw MigrationStreamError("write to the migration stream failed: \(String(cString: strerror(Int32(-sent))))")
            }
            return sent
        }
    }

    func receive(into buffer: UnsafeMutableRawPointer, count: Int) throws(MigrationStreamError) -> Int {
        while true {
            let n = read(descriptor, buffer, count)
            if n < 0 && errno == EINTR { continue }
            if n < 0 { throw MigrationStreamError("read from the migration stream failed: \(String(cString: strerror(errno)))") }
            return n
        }
    }

    func finish() {}
}
