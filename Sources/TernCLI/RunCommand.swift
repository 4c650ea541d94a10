import Dispatch
import Foundation
import KVM
import Machine
import Migration
import QMP
import CProcess

/// `tern run`: build the machine, start it, wait for it to end.
public enum RunCommand {
    public static func main(arguments: [String]) -> Int32 {
        var options: RunOptions
        do {
            options = try RunOptions(arguments: arguments)
        } catch {
            printError(error.message)
            return 2
        }
        if options.showHelp {
            print(HelpText.run, terminator: "")
            return 0
        }
        // For tests and unusual hosts: use another KVM device node.
        if let device = ProcessInfo.processInfo.environment["TERN_KVM_DEVICE"] {
            options.configuration.kvmDevicePath = device
        }
        if let advisory = KVMHostFlavor.detect().advisory, case let .linux(kernel, _, _) = options.configuration.boot, !options.daemonize,
           !BuiltinGuestLoader.isImageFile(at: kernel) {
            printError("note: \(advisory)")
        }
        // -daemonize forks now, before any thread exists; the parent exits once the monitor
        // listens (or with 1 if this process fails first, having said why on standard error).
        var daemonReady: Int32 = -1
        if options.daemonize {
            daemonReady = cprocess_daemonize()
            guard daemonReady >= 0 else {
                printError("-daemonize: \(String(cString: strerror(-daemonReady)))")
                return 1
            }
        }
        var pidFile: Int32 = -1
        if let path = options.pidFile {
            pidFile = cprocess_write_pidfile(path)
            guard pidFile >= 0 else {
                printError(pidFile == -EAGAIN ? "-pidfile \(path): another process holds it (is a tern or QEMU already running with it?)"
                           : "-pidfile \(path): \(String(cString: strerror(-pidFile)))")
                return 1
            }
        }
        defer {
            if pidFile >= 0, let path = options.pidFile {
                unlink(path)
                close(pidFile)
            }
        }
        let machine: Machine
        do {
            machine = try Machine(configuration: options.configuration)
        } catch {
            printError(error.description)
            return 1
        }
        let descriptors = NamedDescriptors()
        let migration = MigrationController(machine: machine) { descriptors.take(named: $0) }
        migration.incomingFailed = { reason in
            printError("load of migration failed: \(reason)")
            exit(1)
        }
        for object in options.objects {
            do { try migration.tlsObjects.create(type: object.type, id: object.id, properties: object.properties) } catch {
                printError("-object \(object.type),id=\(object.id): \(error.message)")
                return 1
            }
        }
        var monitor: QMPServer?
        if !options.monitors.isEmpty {
            do {
                monitor = try QMPServer(machine: machine, endpoints: options.monitors, descriptors: descriptors,
                                        migration: migration)
            } catch {
                printError(error.description)
                return 1
            }
        }
        // `-incoming` must be registered (defer) or listening (a URI) before any client can see
        // the monitor: a client may send migrate-incoming, or point a source at us, at once.
        // The loader itself waits until the vCPU threads exist.
        if let uri = options.incoming {
            do { try migration.startIncoming(uri: uri, autostart: !options.configuration.startPaused) } catch {
                printError("-incoming \(uri): \(error.message)")
                return 1
            }
        }
        let signalSources = installTerminationHandlers(machine)
        if let monitor {
            monitor.start()
            cprocess_daemon_ready(daemonReady)
            monitor.waitForFirstClientIfRequested { printError($0) }
        } else {
            cprocess_daemon_ready(daemonReady)
        }
        // The `none` machine never runs a vCPU: it only answers the monitor until it is told to quit.
        if !options.configuration.hasNoGuest { machine.start() }
        let ending = machine.waitUntilEnded()
        signalSources.forEach { $0.cancel() }
        monitor?.stop()
        switch ending {
        case let .internalError(message):
            printError("the guest stopped: \(message)")
        case let .guestReset(reason):
            printError("guest reset: \(reason); exiting")
        case let .guestShutdown(reason), let .hostQuit(_, reason):
            printError("exiting: \(reason)")
        }
        return ending.exitStatus
    }

    /// SIGINT and SIGTERM end the machine cleanly (terminal restored, status 0).
    static func installTerminationHandlers(_ machine: Machine) -> [any DispatchSourceSignal] {
        [SIGINT, SIGTERM, SIGHUP].map { number in
            signal(number, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: number, queue: .global())
            source.setEventHandler {
                machine.end(.hostQuit(cause: .signal, reason: "received signal \(number)"))
            }
            source.resume()
            return source
        }
    }
}

/// Prints `tern: MESSAGE` on standard error.
func printError(_ message: String) {
    FileHandle.standardError.write(Data("tern: \(message)\n".utf8))
}
