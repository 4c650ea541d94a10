import Machine
import Migration

/// The migration commands, with QEMU's names, arguments and error texts.
extension QMPStandardCommands {
    static func migrationCommands(_ migration: MigrationController) -> [QMPCommand] {
        [
            QMPCommand("migrate", arguments: [.required("uri", .string), .optional("blk", .boolean),
                                              .optional("inc", .boolean), .optional("detach", .boolean),
                                              .optional("resume", .boolean)]) { call throws(QMPError) in
                let resume = call.arguments["resume"]?.boolValue ?? false
                let blk = call.arguments["blk"]?.boolValue ?? false
                let inc = call.arguments["inc"]?.boolValue ?? false
                do throws(MigrationError) {
                    try migration.migrate(uri: call.arguments.string("uri")!, blk: blk, inc: inc, resume: resume)
                } catch { throw .generic(error.message) }
                return .object([:])
            },
            QMPCommand("migrate_cancel") { _ throws(QMPError) in
                do throws(MigrationError) { try migration.cancel() } catch { throw .generic(error.message) }
                return .object([:])
            },
            QMPCommand("migrate-start-postcopy") { _ throws(QMPError) in
                do throws(MigrationError) { try migration.startPostcopy() } catch { throw .generic(error.message) }
                return .object([:])
            },
            QMPCommand("migrate-recover", arguments: [.required("uri", .string)]) { call throws(QMPError) in
                do throws(MigrationError) { try migration.recover(uri: call.arguments.string("uri")!) } catch { throw .generic(error.message) }
                return .object([:])
            },
            QMPCommand("migrate-pause") { _ throws(QMPError) in
                do throws(MigrationError) { try migration.pausePostcopy() } catch { throw .generic(error.message) }
                return .object([:])
            },
            QMPCommand("migrate-incoming", arguments: [.required("uri", .string)]) { call throws(QMPError) in
                do throws(MigrationError) { try migration.startDeferredIncoming(uri: call.arguments.string("uri")!) } catch { throw .generic(error.message) }
                return .object([:])
            },
            QMPCommand("query-migrate") { _ throws(QMPError) in
                migrationInfo(migration)
            },
            QMPCommand("migrate-set-capabilities", arguments: [.required("capabilities", .any)]) { call throws(QMPError) in
                guard case let .array(items)? = call.arguments["capabilities"] else {
                    throw .generic("Invalid parameter type for 'capabilities', expected: array")
                }
                var changes: [(MigrationCapability, Bool)] = []
                for item in items {
                    guard let object = item.objectValue, let name = object["capability"]?.stringValue,
                          let enabled = object["state"]?.boolValue else {
                        throw .generic("Invalid parameter type for 'capabilities', expected: array of {capability, state}")
                    }
                    guard let capability = MigrationCapability(rawValue: name) else { throw .generic("Invalid parameter '\(name)'") }
                    changes.append((capability, enabled))
                }
                do throws(MigrationError) { try migration.setCapabilities(changes) } catch { throw .generic(error.message) }
                return .object([:])
            },
            QMPCommand("query-migrate-capabilities") { _ throws(QMPError) in
                .array(migration.capabilities.map { ["capability": .string($0.0.rawValue), "state": .bool($0.1)] })
            },
            QMPCommand("migrate-set-parameters",
                       arguments: MigrationParameters.names.map { .optional($0, parameterType($0)) }) { call throws(QMPError) in
                var values: [(String, MigrationParameterValue)] = []
                for name in MigrationParameters.names {
                    guard let value = call.arguments[name] else { continue }
                    switch MigrationParameters.kind(of: name) {
                    case .integer:
                        guard let integer = value.int64Value else {
                            throw .generic("Parameter '\(name)' expects an integer in the range of 0 to \(Int64.max)")
                        }
                        values.append((name, .integer(integer)))
                    case .boolean: values.append((name, .boolean(value.boolValue ?? false)))
                    case .string:
                        // tls-creds and tls-hostname are QEMU's StrOrNull: null means "" (off).
                        if case .null = value { values.append((name, .string(""))); continue }
                        guard let text = value.stringValue else { throw .generic("Invalid parameter type for '\(name)', expected: string") }
                        values.append((name, .string(text)))
                    }
                }
                do throws(MigrationError) { try migration.setParameters(values) } catch { throw .generic(error.message) }
                return .object([:])
            },
            QMPCommand("query-migrate-parameters") { _ throws(QMPError) in
                let parameters = migration.parameters
                return .object(JSONObject(MigrationParameters.names.map { name in
                    if name == "xbzrle-cache-size" { return (key: name, value: .int(Int64(clamping: migration.xbzrleCacheSize))) }
                    let value: JSONValue = switch parameters.value(of: name) {
                    case let .integer(number): .int(number)
                    case let .boolean(flag): .bool(flag)
                    case let .string(text): .string(text)
                    }
                    return (key: name, value: value)
                }))
            },
            QMPCommand("migrate-set-cache-size", arguments: [.required("value", .integer)]) { call throws(QMPError) in
                do throws(MigrationError) { try migration.setCacheSize(call.arguments.int64("value") ?? -1) } catch { throw .generic(error.message) }
                return .object([:])
            },
            QMPCommand("query-migrate-cache-size") { _ throws(QMPError) in
                .int(Int64(clamping: migration.xbzrleCacheSize))
            },
            QMPCommand("migrate_set_speed", arguments: [.required("value", .integer)]) { call throws(QMPError) in
                migration.setSpeed(call.arguments.int64("value") ?? Int64.max)
                return .object([:])
            },
            QMPCommand("migrate_set_downtime", arguments: [.required("value", .number)]) { call throws(QMPError) in
                let seconds: Double = switch call.arguments["value"] {
                case let .double(value)?: value
                case let .int(value)?: Double(value)
                case let .uint(value)?: Double(value)
                default: 0
                }
                migration.setDowntime(seconds: seconds)
                return .object([:])
            },
        ]
    }

    /// `query-migrate`, with the members QEMU shows in each state (docs/migration-reference.md §4).
    /// On a destination with no outgoing migration it reports the incoming one, with tern's
    /// `x-guest-downtime` (source vCPU stop to destination vCPU start, ms) once completed.
    static func migrationInfo(_ migration: MigrationController) -> JSONValue {
        let stats = migration.statistics
        if stats.status == .none {
            guard migration.isIncoming else { return .object([:]) }
            let incoming = migration.incomingStatistics
            var info: JSONObject = ["status": .string(incoming.status.rawValue)]
            if let downtime = incoming.guestDowntime { info["x-guest-downtime"] = .int(Int64(downtime)) }
            if let faults = incoming.postcopyFaults {
                info["x-postcopy-faults"] = [
                    "count": .int(Int64(clamping: faults.count)), "p50-us": .int(Int64(clamping: faults.p50Microseconds)),
                    "p99-us": .int(Int64(clamping: faults.p99Microseconds)), "max-us": .int(Int64(clamping: faults.maxMicroseconds)),
                ]
            }
            if incoming.status == .active || incoming.status == .completed || incoming.status.isPostcopy {
                info["x-bytes-read"] = .int(Int64(incoming.bytesRead))
            }
            if let error = incoming.errorDescription { info["error-desc"] = .string(error) }
            return .object(info)
        }
        var info: JSONObject = ["status": .string(stats.status.rawValue)]
        var ram: JSONObject = [
            "transferred": .int(Int64(stats.transferred)),
            "remaining": .int(Int64(stats.remaining)),
            "total": .int(Int64(stats.total)),
            "duplicate": .int(Int64(stats.duplicate)),
            "skipped": .int(Int64(stats.skipped)),
            "normal": .int(Int64(stats.normal)),
            "normal-bytes": .int(Int64(stats.normalBytes)),
            "dirty-pages-rate": .int(Int64(stats.dirtyPagesRate)),
            "mbps": .double(stats.mbps),
            "dirty-sync-count": .int(Int64(stats.dirtySyncCount)),
        ]
        if let multifdBytes = stats.multifdBytes { ram["multifd-bytes"] = .int(Int64(clamping: multifdBytes)) }
        if stats.enteredPostcopy || migration.capability(.postcopyRAM) {
            ram["postcopy-requests"] = .int(Int64(clamping: stats.postcopyRequests))
            ram["postcopy-bytes"] = .int(Int64(clamping: stats.postcopyBytes))
        }
        // The capability's state at query time decides, as in QEMU.
        // SLO escalation may turn an encoder on without its capability: then its figures show too.
        let xbzrle: JSONValue? = migration.capability(.xbzrle) || stats.xbzrle != nil
            ? xbzrleInfo(stats.xbzrle, cacheSize: migration.xbzrleCacheSize) : nil
        let compression: JSONValue? = migration.capability(.compress) || stats.compression != nil ? compressionInfo(stats.compression) : nil
        if !stats.escalations.isEmpty {
            info["x-escalations"] = .array(stats.escalations.map {
                ["step": .string($0.step.rawValue), "detail": .string($0.detail), "at-ms": .int(Int64(clamping: $0.at))]
            })
        }
        switch stats.status {
        case .active, .cancelling, .postcopyActive, .postcopyPaused, .postcopyRecover:
            info["total-time"] = .int(Int64(WallClock.now - stats.startMilliseconds))
            info["expected-downtime"] = .int(Int64(stats.expectedDowntime ?? 0))
            info["setup-time"] = .int(Int64(stats.setupTime ?? 0))
            if stats.status.isPostcopy, let downtime = stats.downtime { info["downtime"] = .int(Int64(downtime)) }
            if stats.status == .active, let forecast = stats.forecast { info["x-forecast"] = forecastInfo(forecast) }
            if stats.status == .postcopyPaused, let error = stats.errorDescription { info["error-desc"] = .string(error) }
            info["ram"] = .object(ram)
            if let disk = stats.disk { info["disk"] = diskInfo(disk) }
            if let xbzrle { info["xbzrle-cache"] = xbzrle }
            if let compression { info["compression"] = compression }
            if stats.cpuThrottlePercentage > 0 && stats.status != .postcopyActive {
                // The 2015 name and QEMU 2.x's later one.
                info["x-cpu-throttle-percentage"] = .int(Int64(stats.cpuThrottlePercentage))
                info["cpu-throttle-percentage"] = .int(Int64(stats.cpuThrottlePercentage))
            }
        case .completed:
            info["total-time"] = .int(Int64(stats.totalTime ?? 0))
            info["downtime"] = .int(Int64(stats.downtime ?? 0))
            info["setup-time"] = .int(Int64(stats.setupTime ?? 0))
            info["ram"] = .object(ram)
            if let disk = stats.disk { info["disk"] = diskInfo(disk) }
            if let xbzrle { info["xbzrle-cache"] = xbzrle }
            if let compression { info["compression"] = compression }
            if stats.cpuThrottleMaximum > 0 { info["x-cpu-throttle-maximum"] = .int(Int64(stats.cpuThrottleMaximum)) }
        case .failed, .cancelled:
            // tern gives a cancel's reason too when SLO escalation cancelled.
            if let error = stats.errorDescription { info["error-desc"] = .string(error) }
        default:
            break
        }
        return .object(info)
    }

    static func diskInfo(_ disk: DiskMigrationStatistics) -> JSONValue {
        ["transferred": .int(Int64(clamping: disk.transferred)), "remaining": .int(Int64(clamping: disk.remaining)),
         "total": .int(Int64(clamping: disk.total)), "x-stream-bytes": .int(Int64(clamping: disk.streamBytes))]
    }

    static func forecastInfo(_ forecast: MigrationForecast) -> JSONValue {
        [
            "converges": .bool(forecast.converges),
            "passes": .int(Int64(forecast.remainingPasses)),
            "eta-ms": .int(Int64(clamping: forecast.etaMilliseconds)),
            "expected-downtime-ms": .int(Int64(clamping: forecast.expectedDowntimeMilliseconds)),
            "bandwidth": .int(Int64(clamping: forecast.bandwidth)),
            "dirty-rate": .int(Int64(clamping: forecast.dirtyRate)),
            "dirty-set": .int(Int64(clamping: forecast.dirtySet)),
            "basis": .string(forecast.basis),
        ]
    }

    static func parameterType(_ name: String) -> QMPArgumentType {
        switch MigrationParameters.kind(of: name) {
        case .integer: .integer
        case .boolean: .boolean
        case .string: name.hasPrefix("tls-") ? .any : .string
        }
    }

    static func xbzrleInfo(_ stats: XBZRLEStatistics?, cacheSize: UInt64) -> JSONValue {
        [
            "cache-size": .int(Int64(clamping: stats?.cacheSize ?? cacheSize)),
            "bytes": .int(Int64(clamping: stats?.bytes ?? 0)),
            "pages": .int(Int64(clamping: stats?.pages ?? 0)),
            "cache-miss": .int(Int64(clamping: stats?.cacheMiss ?? 0)),
            "cache-miss-rate": .double(stats?.cacheMissRate ?? 0),
            "overflow": .int(Int64(clamping: stats?.overflow ?? 0)),
        ]
    }

    static func compressionInfo(_ stats: CompressionStatistics?) -> JSONValue {
        [
            "pages": .int(Int64(clamping: stats?.pages ?? 0)),
            "busy": .int(Int64(clamping: stats?.busy ?? 0)),
            "busy-rate": .double(stats?.busyRate ?? 0),
            "compressed-size": .int(Int64(clamping: stats?.compressedSize ?? 0)),
            "compression-rate": .double(stats?.compressionRate ?? 0),
        ]
    }
}
