import Foundation
import Machine

/// The destination's side of `MigrationController`: `-incoming` and `migrate-incoming`, the
/// load on its own thread, postcopy's `migrate-recover`, and starting the guest once the
/// stream is in. (The outgoing side, capabilities and parameters are in MigrationController.swift.)
extension MigrationController {
    /// `migrate-recover URI` on a destination whose postcopy is paused: listens on `uri` and
    /// hands the source's new connection to the paused load.
    public func recover(uri: String) throws(MigrationError) {
        try state.withLock { (state) throws(MigrationError) in
            guard state.incoming.status == .postcopyPaused else {
                throw MigrationError("Migrate recover can only be run when postcopy is paused.")
            }
            guard !state.recoveryPending else { throw MigrationError("Migrate recovery is triggered already") }
            state.recoveryPending = true
        }
        let listener: IncomingListener
        let tls: TLSServerSettings?
        do {
            tls = try incomingTLS()
            let parsed = try MigrationURI(parsing: uri)
            switch parsed {
            case .tcp, .unix: listener = try IncomingListener(uri: parsed)
            default: throw MigrationStreamError("migrate-recover needs a tcp: or unix: URI (postcopy needs a return path)")
            }
        } catch {
            state.withLock { $0.recoveryPending = false }
            throw MigrationError((error as? MigrationStreamError)?.message ?? "unknown migration protocol: \(uri)")
        }
        log("incoming: waiting for the source to resume on \(uri)")
        let thread = Thread { [self] in
            let connection = try? listener.accept(tls: tls, log: { [log] in log("incoming: \($0)") })
            state.withLock { $0.recoveryPending = false }
            guard let connection else { return }
            logIncomingTLS(connection)
            setIncomingStatus(.postcopyRecover)
            recoveryHandoff.offer(connection)
        }
        thread.name = "migration-recover"
        thread.start()
    }

    /// The TLS the destination's connections use, from `tls-creds` and `tls-authz` (nil: none).
    private func incomingTLS() throws(MigrationStreamError) -> TLSServerSettings? {
        let parameters = state.withLock { $0.parameters }
        return try tlsObjects.serverSettings(credentials: parameters.tlsCreds, authorization: parameters.tlsAuthz)
    }

    /// Says who connected over TLS, and how (nothing for a plain connection).
    fileprivate func logIncomingTLS(_ connection: MigrationConnection) {
        guard let session = connection.io as? TLSSession else { return }
        let who = session.peerSubject.map { "the source is authenticated as '\($0)'" } ?? "the source has no certificate (verify-peer=off)"
        log("incoming: TLS: \(who) (\(session.agreement))")
    }

    fileprivate func setIncomingStatus(_ status: MigrationStatus, error: String? = nil) {
        let old = state.withLock { state -> MigrationStatus in
            let old = state.incoming.status
            state.incoming.status = status
            if let error { state.incoming.errorDescription = error }
            return old
        }
        log("incoming: \(old.rawValue) -> \(status.rawValue)")
        if capability(.events) { observer(.statusChanged(status)) }
    }

    // MARK: incoming

    /// `-incoming URI` at start-up, or `migrate-incoming` after `-incoming defer`.
    public func startIncoming(uri: String, autostart: Bool) throws(MigrationError) {
        if uri == "defer" {
            try state.withLock { (state) throws(MigrationError) in
                if state.incomingDeferred { throw MigrationError("Incoming migration already deferred") }
                state.incomingDeferred = true
                state.incomingRequested = true
                state.autostart = autostart
            }
            return
        }
        let parsed: MigrationURI
        do { parsed = try MigrationURI(parsing: uri) } catch {
            throw MigrationError("unknown migration protocol: \(uri)")
        }
        var listener: IncomingListener?
        var connection: MigrationConnection?
        var handedOver: Int32?
        let tls: TLSServerSettings?
        do throws(MigrationStreamError) {
            tls = try incomingTLS()
            if tls != nil, case .exec = parsed {
                throw MigrationStreamError("TLS needs a socket: use a tcp:, unix: or fd: URI, not exec:")
            }
            switch parsed {
            case .tcp, .unix:
                listener = try IncomingListener(uri: parsed)
            case let .exec(command):
                connection = try MigrationConnection.spawn(command, sourceWrites: false)
            case let .descriptor(name):
                if let number = Int32(name), number >= 0, fcntl(number, F_GETFD) >= 0 {
                    handedOver = number
                } else if let named = descriptorNamed(name) {
                    handedOver = named
                } else {
                    throw MigrationStreamError("File descriptor named '\(name)' has not been found")
                }
            }
        } catch {
            throw MigrationError(error.message)
        }
        state.withLock { state in
            state.incomingRequested = true
            state.incomingStarted = true
            if !state.incomingDeferred { state.autostart = autostart }
            state.incoming = IncomingStatistics()
            state.incoming.status = .setup
        }
        log("incoming: waiting on \(uri)")
        if capability(.events) { observer(.statusChanged(.setup)) }
        let ready = connection
        let socket = handedOver
        let waiting = listener
        let thread = Thread { [self] in
            do throws(MigrationStreamError) {
                let channel: MigrationConnection
                if let ready {
                    channel = ready // exec:
                } else if let socket {
                    channel = try MigrationConnection.accepted(socket, tls: tls) // fd: its one peer
                } else {
                    channel = try waiting!.accept(tls: tls, log: { [log] in log("incoming: \($0)") })
                }
                logIncomingTLS(channel)
                runIncoming(channel, listener: waiting, tls: tls)
                waiting?.close()
            } catch {
                incomingFailure(error.message)
            }
        }
        thread.name = "migration-incoming"
        thread.start()
    }

    /// `migrate-incoming`: only after `-incoming defer`, and only once.
    public func startDeferredIncoming(uri: String) throws(MigrationError) {
        let (deferred, started) = state.withLock { ($0.incomingDeferred, $0.incomingStarted) }
        guard deferred else { throw MigrationError("For use with '-incoming defer'") }
        guard !started else { throw MigrationError("The incoming migration has already been started") }
        if uri == "defer" { throw MigrationError("Incoming migration already deferred") }
        try startIncoming(uri: uri, autostart: state.withLock { $0.autostart })
    }

    /// `cont` while waiting for an incoming migration: run once it has loaded (QEMU's autostart).
    public func requestAutostart() -> Bool {
        guard machine.runState == .inmigrate else { return false }
        state.withLock { $0.autostart = true }
        return true
    }

    fileprivate func runIncoming(_ connection: MigrationConnection, listener: IncomingListener?, tls: TLSServerSettings?) {
        state.withLock { $0.incoming.status = .active }
        log("incoming: loading")
        if capability(.events) { observer(.statusChanged(.active)) }
        let settings = state.withLock { state in
            IncomingSettings(capabilities: MigrationCapability.allCases.filter { state.capabilities[$0] == true }.map(\.rawValue),
                             decompressThreads: Int(state.parameters.decompressThreads),
                             multifdChannels: Int(state.parameters.multifdChannels))
        }
        let incoming = IncomingMigration(machine: machine, connection: connection, settings: settings)
        if let listener {
            incoming.acceptChannel = { () throws(MigrationStreamError) -> MigrationConnection in try listener.acceptChannel(tls: tls) }
        }
        state.withLock { $0.incomingConnection = connection }
        incoming.log = { [log] in log("incoming: \($0)") }
        var started: UInt64?
        incoming.hooks.started = { [self, unowned incoming] recorded in
            state.withLock { $0.incomingPostcopy = incoming.postcopyDestination }
            startGuest(recorded)
            started = WallClock.nanoseconds()
            setIncomingStatus(.postcopyActive)
        }
        incoming.hooks.paused = { [self] reason in
            _ = state.withLock { $0.incomingConnection }?.close()
            state.withLock { $0.incomingConnection = nil }
            setIncomingStatus(.postcopyPaused, error: "the connection to the source was lost during postcopy (\(reason)); "
                              + "the guest keeps running and waits for its missing pages: resume with migrate-recover")
            let fresh = recoveryHandoff.wait()
            state.withLock { $0.incomingConnection = fresh }
            return fresh
        }
        incoming.hooks.resumed = { [self] in
            state.withLock { $0.incoming.errorDescription = nil }
            setIncomingStatus(.postcopyActive)
        }
        let recorded: RunState
        do {
            recorded = try incoming.load { progress in
                self.state.withLock { $0.incoming.pagesLoaded = progress.pagesLoaded; $0.incoming.bytesRead = progress.bytesRead }
            }
        } catch {
            _ = state.withLock { $0.incomingConnection }?.close()
            incomingFailure(error.message)
            return
        }
        let postcopyFaults = incoming.postcopyFaults
        _ = state.withLock { $0.incomingConnection }?.close()
        if started == nil {
            startGuest(recorded)
            started = WallClock.nanoseconds()
        }
        state.withLock { state in
            state.incomingConnection = nil
            state.incomingPostcopy = nil
            state.incoming = incoming.statistics
            state.incoming.postcopyFaults = postcopyFaults
            state.incoming.status = .completed
            if let stopped = incoming.sourceStoppedAt, let started, started >= stopped {
                state.incoming.guestDowntime = (started - stopped) / 1_000_000
            }
        }
        log("incoming: completed, guest \(machine.runState.rawValue)")
        if capability(.events) { observer(.statusChanged(.completed)) }
    }

    /// Runs the loaded guest if the source ran it and autostart allows (QEMU's rule).
    fileprivate func startGuest(_ recorded: RunState) {
        let autostart = state.withLock { $0.autostart }
        if recorded == .running && autostart {
            do {
                try machine.activateDisks()
                machine.resume(fromIncomingMigration: true)
            } catch {
                log("incoming: the guest stays paused: \(error)")
                machine.setStoppedState(.paused)
            }
        } else {
            machine.setStoppedState(.paused)
        }
    }

    fileprivate func incomingFailure(_ reason: String) {
        state.withLock { state in
            state.incoming.status = .failed
            state.incoming.errorDescription = reason
        }
        if capability(.events) { observer(.statusChanged(.failed)) }
        incomingFailed(reason)
    }

    /// Whether this process is, or was, the destination of a migration.
    public var isIncoming: Bool { state.withLock { $0.incomingRequested } }
}
