import CGuestMemory
import Foundation
import KVM
import Machine

/// The source side: one thread that sends RAM in passes and then the device state.
///
/// The loop follows QEMU's migration thread: send pages within each 100 ms window's allowance;
/// measure the bandwidth per window; at the end of each pass sync the dirty log and apply the
/// downtime test — the pending bytes must be below bandwidth × downtime limit — before
/// stopping the vCPUs, sending the rest and the device state, and completing. Unlike QEMU,
/// tern finishes a pass before testing and keeps going while passes still halve the dirty set
/// (`anotherPassPays`), which makes the final copy, and so the downtime, much smaller.
/// Pages that read as zero go as a flag (counted as `duplicate`).
final class OutgoingMigration: @unchecked Sendable {
    // Sendable: run entirely on its own thread; shared results go through the controller.
    private let machine: Machine
    private let controller: MigrationController
    private let connection: MigrationConnection
    private let writer: MigrationStreamWriter
    private let tracker: DirtyPageTracker
    private let pageSize = MigrationStreamFormat.pageSize
    /// Pages per batch before looking at the clock, cancellation and the window again.
    private let batchPages = 256

    private var bitmap: DirtyBitmap
    private var cursor = 0
    private var remainingPages = 0
    private var stats = MigrationStatistics()
    private var lastRateSync = WallClock.monotonicMilliseconds()
    private var pagesDirtiedSinceRateSync = 0
    private var dirtyBytesRate: UInt64 = 0
    private var pagesSent: UInt64 = 0

    init(machine: Machine, controller: MigrationController, connection: MigrationConnection) {
        self.machine = machine
        self.controller = controller
        self.connection = connection
        self.writer = MigrationStreamWriter(descriptor: connection.descriptor)
        self.tracker = DirtyPageTracker(machine: machine)
        self.bitmap = DirtyBitmap(pageCount: tracker.pageCount)
    }

    private var ram: GuestMemory { machine.memory }

    /// The thread body.
    func run() {
        machine.waitUntilStarted() // a monitor may ask before the vCPU threads exist
        let setupStart = WallClock.monotonicMilliseconds()
        stats = controller.statistics
        stats.total = ram.size
        var vmWasRunning = false
        var stoppedForCompletion = false
        var failure: String?

        defer {
            try? tracker.stop()
            flushStatistics()
        }

        do {
            try tracker.start()
        } catch {
            finish(failure: "cannot start dirty page tracking: \(error)", resumeIfStopped: false, wasRunning: false)
            return
        }
        writer.append(bytes: MigrationStreamFormat.magic)
        writer.append(MigrationStreamFormat.version)
        writer.append(MigrationStreamFormat.RecordType.ramLayout.rawValue)
        writer.append(ram.size)
        writer.append(UInt32(pageSize))
        sendUntouchedAsZero()
        stats.setupTime = WallClock.monotonicMilliseconds() - setupStart
        stats.expectedDowntime = controller.parameters.downtimeLimit
        flushStatistics()
        guard controller.transition(from: .setup, to: .active) else {
            finish(failure: nil, resumeIfStopped: false, wasRunning: false)
            return
        }

        var limiter = RateLimiter(bandwidth: controller.parameters.maxBandwidth,
                                  now: WallClock.monotonicMilliseconds(), position: writer.position)
        var maxSize: UInt64 = 0
        var windowClosed = false
        let activeStart = WallClock.monotonicMilliseconds()
        var previousPassBytes = UInt64(remainingPages) * pageSize
        loop: while controller.status == .active {
            if !limiter.isExhausted(position: writer.position) {
                var pending = UInt64(remainingPages) * pageSize
                var converged = false
                if remainingPages == 0 {
                    // A pass is done: sync, then apply the downtime test to what is left.
                    if let error = syncDirtyLog() { failure = error; break loop }
                    if !windowClosed {
                        // No 100 ms window has closed yet: estimate the bandwidth from the
                        // stream so far, so a small guest neither waits nor spins on syncs.
                        let elapsed = max(WallClock.monotonicMilliseconds() - activeStart, 1)
                        maxSize = writer.position / elapsed * controller.parameters.downtimeLimitNanoseconds / 1_000_000
                    }
                    pending = UInt64(remainingPages) * pageSize
                    converged = !Self.anotherPassPays(pending: pending, previous: previousPassBytes,
                                                      passes: Int(stats.dirtySyncCount))
                    previousPassBytes = pending
                }
                if pending > 0 && (pending >= maxSize || !converged) {
                    sendBatch(limit: limiter.allowance(position: writer.position))
                } else {
                    stoppedForCompletion = true
                    vmWasRunning = machine.pause(to: .finishMigrate)
                    failure = complete(wasRunning: vmWasRunning)
                    break loop
                }
            }
            if let error = writer.error { failure = error.message; break loop }
            let now = WallClock.monotonicMilliseconds()
            if let window = limiter.closeWindowIfElapsed(now: now, position: writer.position) {
                windowClosed = true
                let bandwidth = window.milliseconds > 0 ? window.bytes / window.milliseconds : 0 // bytes per ms
                maxSize = bandwidth * controller.parameters.downtimeLimitNanoseconds / 1_000_000
                stats.mbps = window.milliseconds > 0 ? Double(window.bytes) * 8 / (Double(window.milliseconds) / 1000) / 1_000_000 : 0
                if dirtyBytesRate > 0 && window.bytes > 10_000 && bandwidth > 0 {
                    stats.expectedDowntime = dirtyBytesRate / bandwidth
                }
                limiter.limitPerWindow = RateLimiter.limit(for: controller.parameters.maxBandwidth)
                flushStatistics()
            }
            if limiter.isExhausted(position: writer.position) {
                usleep(UInt32(max(limiter.millisecondsLeft(now: now), 1) * 1000))
            }
        }
        finish(failure: failure, resumeIfStopped: stoppedForCompletion, wasRunning: vmWasRunning)
    }

    /// Ends the migration as completed, failed or cancelled, and restarts the guest if this
    /// migration stopped it and did not complete.
    private func finish(failure: String?, resumeIfStopped: Bool, wasRunning: Bool) {
        let closeError = connection.close()
        let status = controller.status
        if failure == nil && closeError == nil && status == .active && stats.downtime != nil {
            stats.totalTime = WallClock.milliseconds() - stats.startMilliseconds
            stats.remaining = 0
            stats.dirtyPagesRate = 0
            if let total = stats.totalTime, total > 0 {
                stats.mbps = Double(writer.bytesWritten) * 8 / Double(total) / 1000
            }
            machine.setStoppedState(.postmigrate)
            flushStatistics()
            _ = controller.transition(from: .active, to: .completed)
            return
        }
        if resumeIfStopped {
            machine.setStoppedState(.paused)
            if wasRunning { machine.resume() }
        }
        if status == .cancelling {
            _ = controller.transition(from: .cancelling, to: .cancelled)
        } else {
            stats.errorDescription = failure ?? closeError?.message ?? "the migration ended unexpectedly"
            flushStatistics()
            _ = controller.transition(from: status, to: .failed)
        }
    }

    private func flushStatistics() {
        stats.transferred = writer.position
        stats.remaining = UInt64(remainingPages) * pageSize
        controller.update(stats)
    }

    /// The first pass: pages the guest never touched are holes in guest RAM's memfd and go as
    /// zero runs without being read; the rest are marked for sending.
    private func sendUntouchedAsZero() {
        var position: UInt64 = 0
        let extents = ram.dataExtents(offset: 0, length: ram.size)
        for extent in extents {
            if extent.offset > position { sendZeroRun(page: Int(position / pageSize), count: Int((extent.offset - position) / pageSize)) }
            let first = Int(extent.offset / pageSize)
            let last = Int((extent.offset + extent.length + pageSize - 1) / pageSize)
            for page in first..<min(last, bitmap.pageCount) { bitmap.set(page) }
            position = UInt64(last) * pageSize
        }
        if position < ram.size { sendZeroRun(page: Int(position / pageSize), count: Int((ram.size - position) / pageSize)) }
        remainingPages = bitmap.count
        cursor = 0
    }

    private func sendZeroRun(page: Int, count: Int) {
        var start = page
        var left = count
        while left > 0 {
            let chunk = min(left, Int(MigrationStreamFormat.maximumPagesPerRecord))
            writer.append(MigrationStreamFormat.RecordType.ramZero.rawValue)
            writer.append(UInt64(start) * pageSize)
            writer.append(UInt32(chunk))
            stats.duplicate += UInt64(chunk)
            pagesSent += UInt64(chunk)
            start += chunk
            left -= chunk
        }
    }

    /// Fetches the dirty log: the next pass's pages, merged with any not yet sent.
    private func syncDirtyLog() -> String? {
        let fresh: DirtyBitmap
        do { fresh = try tracker.collect() } catch { return "dirty log sync failed: \(error)" }
        let dirtied = fresh.count
        pagesDirtiedSinceRateSync += dirtied
        var merged = fresh
        if remainingPages > 0 {
            var page = cursor
            while let next = bitmap.nextSet(from: page) { merged.set(next); page = next + 1 }
        }
        bitmap = merged
        cursor = 0
        remainingPages = bitmap.count
        stats.dirtySyncCount += 1
        let now = WallClock.monotonicMilliseconds()
        if now > lastRateSync + 1000 {
            stats.dirtyPagesRate = UInt64(pagesDirtiedSinceRateSync) * 1000 / (now - lastRateSync)
            dirtyBytesRate = stats.dirtyPagesRate * pageSize
            pagesDirtiedSinceRateSync = 0
            lastRateSync = now
        }
        controller.passCompleted(Int(stats.dirtySyncCount))
        writer.append(MigrationStreamFormat.RecordType.passEnd.rawValue)
        writer.append(UInt32(truncatingIfNeeded: stats.dirtySyncCount))
        return nil
    }

    /// After a pass, whether one more pass (with the guest running) would shrink the final copy
    /// enough to be worth it: the dirty set is still more than 256 KiB and at most half the last
    /// pass's. QEMU stops as soon as the remainder fits the downtime limit; tern also requires
    /// that, but first lets a converging guest converge further, so the guest is stopped for
    /// the remainder's tail rather than up to the whole limit.
    static func anotherPassPays(pending: UInt64, previous: UInt64, passes: Int) -> Bool {
        pending > 256 << 10 && pending * 2 <= previous && passes < 30
    }

    /// Sends up to `batchPages` marked pages from the cursor, within `limit` bytes.
    private func sendBatch(limit: UInt64) {
        var budget = Int(min(UInt64(batchPages), max(limit / pageSize, 1)))
        while budget > 0, let start = bitmap.nextSet(from: cursor) {
            let end = min(bitmap.nextClear(from: start), start + budget)
            sendRun(from: start, to: end)
            budget -= end - start
            cursor = end
            remainingPages -= end - start
        }
        if bitmap.nextSet(from: cursor) == nil { remainingPages = 0 }
    }

    /// Sends pages `start..<end`, splitting them into zero and data records.
    private func sendRun(from start: Int, to end: Int) {
        var page = start
        var zero = isZero(page)
        while page < end {
            // Scan each page once: the page that ends this run starts the next one.
            var stop = page + 1
            var nextZero = zero
            while stop < end {
                nextZero = isZero(stop)
                if nextZero != zero { break }
                stop += 1
            }
            if zero {
                sendZeroRun(page: page, count: stop - page)
            } else {
                let count = stop - page
                writer.append(MigrationStreamFormat.RecordType.ramPages.rawValue)
                writer.append(UInt64(page) * pageSize)
                writer.append(UInt32(count))
                writer.append(memory: ram.hostBase + page * Int(pageSize), count: count * Int(pageSize))
                stats.normal += UInt64(count)
                pagesSent += UInt64(count)
            }
            page = stop
            zero = nextZero
        }
    }

    /// Test hook: with TERN_TEST_DROP_DIRTY_PAGE=1 the final copy leaves out one dirty page
    /// holding data, so a test can prove that the memory-digest check catches a lost page.
    static let dropsOneDirtyPage = ProcessInfo.processInfo.environment["TERN_TEST_DROP_DIRTY_PAGE"] == "1"

    private func dropOneDirtyPage() {
        var page = cursor
        while let candidate = bitmap.nextSet(from: page) {
            if !isZero(candidate) {
                bitmap.clear(candidate)
                remainingPages -= 1
                log("TEST HOOK: dropped dirty page at offset 0x\(String(UInt64(candidate) * pageSize, radix: 16))")
                return
            }
            page = candidate + 1
        }
        // Nothing was dirty at the end: lose the last update of a page with data instead, by
        // sending it as zero, so the hook always leaves the destination different.
        for extent in ram.dataExtents(offset: 0, length: ram.size) {
            var offset = extent.offset
            while offset < extent.offset + extent.length {
                let candidate = Int(offset / pageSize)
                if !isZero(candidate) {
                    sendZeroRun(page: candidate, count: 1)
                    log("TEST HOOK: dropped dirty page at offset 0x\(String(offset, radix: 16)) (sent as zero)")
                    return
                }
                offset += pageSize
            }
        }
    }

    private func log(_ message: String) { controller.log(message) }

    private func isZero(_ page: Int) -> Bool {
        cguest_is_zero(ram.hostBase + page * Int(pageSize), Int(pageSize)) != 0
    }

    /// The vCPUs are stopped: send every page still dirty, then the device state.
    private func complete(wasRunning: Bool) -> String? {
        let stopTime = WallClock.monotonicMilliseconds()
        let stoppedAt = WallClock.nanoseconds()
        if let error = syncDirtyLog() { return error }
        if Self.dropsOneDirtyPage { dropOneDirtyPage() }
        while remainingPages > 0 {
            sendBatch(limit: .max)
            if let error = writer.error { return error.message }
            if controller.status != .active { return "cancelled" }
        }
        let sections: [StateSection]
        do {
            sections = try machine.saveState(recordedRunState: wasRunning ? .running : .paused)
        } catch {
            return "saving the device state failed: \(error)"
        }
        for section in sections {
            writer.append(MigrationStreamFormat.RecordType.device.rawValue)
            let name = Array(section.name.utf8)
            writer.append(UInt16(name.count))
            writer.append(bytes: name)
            writer.append(section.version)
            writer.append(UInt32(section.payload.count))
            writer.append(bytes: section.payload)
        }
        writer.append(MigrationStreamFormat.RecordType.sourceStopped.rawValue)
        writer.append(stoppedAt)
        writer.append(MigrationStreamFormat.RecordType.end.rawValue)
        writer.append(pagesSent)
        writer.flush()
        if let error = writer.error { return error.message }
        stats.downtime = WallClock.monotonicMilliseconds() - stopTime
        return nil
    }
}
