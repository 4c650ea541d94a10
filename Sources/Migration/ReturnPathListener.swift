import CSocket
import Foundation
import Synchronization

/// The source's end of the return path: a thread that reads the destination's messages and
/// keeps what the migration thread needs (a PONG arrived, the verdict, page requests, the
/// resume handshake). Every message is checked before it is kept: a page request must be
/// page-aligned, at most `maximumRequestLength` and inside guest RAM; anything else ends the
/// return path with the reason (QEMU's "mark_source_rp_bad"), and the source never crashes.
final class ReturnPathListener: @unchecked Sendable {
    // Sendable: shared fields live in `state`, under its mutex.
    struct State {
        var pongs = 0
        var lastPong: UInt32?
        var verdict: ReturnPathMessage?
        var closed = false
        var error: String?
        var requests: [(offset: UInt64, length: UInt32)] = []
        var lacking: [ReturnPathMessage.PageRun] = []
        var resumeReady: UInt64?
    }
    private let state = Mutex(State())
    private let condition = NSCondition()
    private let io: ConnectionIO
    private let ramSize: UInt64
    private let log: @Sendable (String) -> Void

    init(io: ConnectionIO, ramSize: UInt64, log: @escaping @Sendable (String) -> Void) {
        self.io = io
        self.ramSize = ramSize
        self.log = log
    }

    func start() {
        let thread = Thread { [self] in run() }
        thread.name = "return-path"
        thread.start()
    }

    private func run() {
        let reader = MigrationStreamReader(io: io)
        while true {
            do {
                let message = try ReturnPathMessage.read(from: reader)
                try accept(message)
            } catch {
                // EOF is how a destination ends the return path; anything else is a bad peer.
                let ended = error.message.contains("ended early")
                if !ended { log("return path: \(error.message)") }
                state.withLock { $0.closed = true; if !ended { $0.error = error.message } }
                signal()
                return
            }
        }
    }

    private func accept(_ message: ReturnPathMessage) throws(MigrationStreamError) {
        switch message {
        case let .pong(value):
            state.withLock { $0.pongs += 1; $0.lastPong = value }
        case .loaded, .failed:
            state.withLock { $0.verdict = message }
        case let .requestPages(offset, length):
            try check(offset: offset, length: length)
            state.withLock { $0.requests.append((offset, length)) }
        case let .lacking(runs):
            for run in runs {
                let (bytes, overflow) = UInt64(run.pages).multipliedReportingOverflow(by: MigrationStreamFormat.pageSize)
                guard !overflow, run.pages > 0, run.offset % MigrationStreamFormat.pageSize == 0,
                      run.offset <= ramSize, bytes <= ramSize - run.offset else {
                    throw MigrationStreamError("RP: a LACKING run at 0x\(String(run.offset, radix: 16)) of \(run.pages) pages lies outside guest RAM")
                }
            }
            state.withLock { $0.lacking += runs }
        case let .resumeReady(total):
            state.withLock { $0.resumeReady = total }
        }
        signal()
    }

    /// QEMU's checks on a page request, with its text for a misaligned one.
    private func check(offset: UInt64, length: UInt32) throws(MigrationStreamError) {
        let pageSize = MigrationStreamFormat.pageSize
        guard offset % pageSize == 0, UInt64(length) % pageSize == 0 else {
            throw MigrationStreamError("RP: Misaligned page request, start: 0x\(String(offset, radix: 16)) len: \(length)")
        }
        guard length > 0 else { throw MigrationStreamError("RP: an empty page request at 0x\(String(offset, radix: 16))") }
        guard length <= ReturnPathMessage.maximumRequestLength else {
            throw MigrationStreamError("RP: a page request of \(length) bytes is too long (at most \(ReturnPathMessage.maximumRequestLength))")
        }
        guard offset < ramSize, UInt64(length) <= ramSize - offset else {
            throw MigrationStreamError("RP: a page request at 0x\(String(offset, radix: 16)) (\(length) bytes) lies outside guest RAM (\(ramSize >> 20) MiB)")
        }
    }

    private func signal() {
        condition.lock()
        condition.broadcast()
        condition.unlock()
    }

    /// Waits up to `seconds` until `answer` has one (nil: not yet) or the path closes; then
    /// returns the last answer. Every wait below is this one.
    private func wait<T: Sendable>(seconds: Double, _ answer: (State) -> T?) -> T? {
        let deadline = Date().addingTimeInterval(seconds)
        condition.lock()
        defer { condition.unlock() }
        while true {
            let (result, closed) = state.withLock { (answer($0), $0.closed) }
            if let result { return result }
            if closed || !condition.wait(until: deadline) { return state.withLock { answer($0) } }
        }
    }

    /// Waits until the reading thread has ended (after the caller shut the socket down), so the
    /// descriptor can be closed without a reader still on it.
    func waitUntilClosed() {
        while wait(seconds: 0.1, { $0.closed ? true : nil }) == nil {}
    }

    /// Waits up to `seconds` for the PONG to PING `value`; false if it did not come.
    func waitForPong(_ value: UInt32, seconds: Double) -> Bool {
        wait(seconds: seconds) { $0.lastPong == value ? true : nil } ?? false
    }

    /// Whether the destination has answered a PING, i.e. it speaks the return path.
    var isAlive: Bool { state.withLock { $0.pongs > 0 } }

    /// Whether the return path has ended (the peer closed it, or sent something bad).
    var isClosed: Bool { state.withLock { $0.closed } }

    /// Why the return path ended, when the peer broke the protocol.
    var protocolError: String? { state.withLock { $0.error } }

    /// A FAILED verdict that arrived during the migration (a destination refusing the stream).
    var earlyFailure: String? {
        state.withLock { if case let .failed(reason)? = $0.verdict { return reason } else { return nil } }
    }

    /// Takes the page requests that arrived since the last call, oldest first.
    func takeRequests() -> [(offset: UInt64, length: UInt32)] {
        state.withLock { state in
            defer { state.requests.removeAll(keepingCapacity: true) }
            return state.requests
        }
    }

    /// Sleeps until a request or the verdict arrives, the path closes, or `seconds` pass.
    func waitForMessage(seconds: Double) {
        _ = wait(seconds: seconds) { !$0.requests.isEmpty || $0.verdict != nil ? true : nil }
    }

    /// Resuming postcopy: waits for RESUME_READY and returns the runs the destination lacks
    /// (nil if the path closed or `seconds` passed first, or the runs do not add up).
    func waitForLacking(seconds: Double) -> [ReturnPathMessage.PageRun]? {
        guard let (runs, total) = wait(seconds: seconds, { state in state.resumeReady.map { (state.lacking, $0) } }) else { return nil }
        return runs.reduce(0) { $0 + UInt64($1.pages) } == total ? runs : nil
    }

    /// Waits up to `seconds` for the verdict; nil if none came (closed or timed out).
    func waitForVerdict(seconds: Double) -> ReturnPathMessage? {
        wait(seconds: seconds) { $0.verdict }
    }
}

/// The destination's end: writes messages on the incoming connection. The stream reader and
/// postcopy's fault thread both send, so whole messages go out under a lock.
final class ReturnPathSender: Sendable {
    let io: ConnectionIO
    private let lock = Mutex(())

    init(io: ConnectionIO) { self.io = io }

    /// Sends one message; false if the source has gone.
    @discardableResult
    func send(_ message: ReturnPathMessage) -> Bool {
        let bytes = message.encoded()
        return lock.withLock { _ in
            bytes.withUnsafeBytes { raw in
                do throws(MigrationStreamError) {
                    try io.sendAll(raw.baseAddress!, count: raw.count)
                    return true
                } catch {
                    return false
                }
            }
        }
    }
}
