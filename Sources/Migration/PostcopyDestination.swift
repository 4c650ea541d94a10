import Foundation
import Machine
import Synchronization

/// The destination's half of postcopy: guest RAM under userfaultfd, the set of pages it still
/// lacks, and a fault thread that turns every fault on a lacking page into a page request.
///
/// A page is in one of three conditions: present (loaded during pre-copy and not discarded),
/// a hole that reads as zero (pre-copy sent it as zero, or it was never written) or lacking
/// (the source discarded it or never sent it). A fault on a hole is answered here with a zero
/// page; a fault on a lacking page asks the source. Pages from the stream are installed with
/// `UFFDIO_COPY`, whole, and wake their waiters. The stream reader never touches guest memory
/// itself, so it can never wait on a fault that only it could serve.
final class PostcopyDestination: @unchecked Sendable {
    // Sendable: mutable state lives in `state`, under its mutex; `region` is thread-safe.
    struct State {
        var lacking: DirtyBitmap
        var lackingCount = 0
        /// Pages requested and not yet installed, with when the fault was seen (ns).
        var requestedAt: [Int: UInt64] = [:]
        /// Fault-to-install latencies in microseconds (the first million).
        var latencies: [UInt32] = []
        var faults: UInt64 = 0
        var sender: ReturnPathSender?
        var stopping = false
    }

    private let region: UserfaultRegion
    private let memory: GuestMemory
    private let state: Mutex<State>
    private let pageSize = MigrationStreamFormat.pageSize
    private let wake: (read: Int32, write: Int32)
    private let finished = NSCondition()
    private var threadDone = false
    private static let maximumSamples = 1 << 20

    init(memory: GuestMemory, sender: ReturnPathSender?) throws(MigrationStreamError) {
        self.memory = memory
        do {
            region = try UserfaultRegion(memory: memory)
        } catch {
            throw MigrationStreamError("cannot receive postcopy: \(error.description)")
        }
        var descriptors: [Int32] = [0, 0]
        guard pipe(&descriptors) == 0 else { throw MigrationStreamError("cannot create the fault thread's wake-up pipe") }
        wake = (descriptors[0], descriptors[1])
        let pages = Int(memory.size / MigrationStreamFormat.pageSize)
        state = Mutex(State(lacking: DirtyBitmap(pageCount: pages), sender: sender))
    }

    deinit {
        close(wake.read)
        close(wake.write)
    }

    /// Drops pages the guest wrote after they were sent: punched out of the memfd, so the next
    /// touch faults, and marked lacking. Runs are checked to lie in RAM.
    func discard(_ runs: [ReturnPathMessage.PageRun]) throws(MigrationStreamError) {
        for run in runs {
            let length = UInt64(run.pages) * pageSize
            guard run.pages > 0, run.offset % pageSize == 0, memory.pointer(atOffset: run.offset, length: length) != nil else {
                throw MigrationStreamError("a DISCARD run at 0x\(String(run.offset, radix: 16)) of \(run.pages) pages lies outside guest RAM")
            }
            guard memory.discard(offset: run.offset, length: length) else {
                throw MigrationStreamError("cannot drop guest pages at 0x\(String(run.offset, radix: 16)) for postcopy")
            }
            let first = Int(run.offset / pageSize)
            state.withLock { state in
                for page in first..<first + Int(run.pages) where !state.lacking.isSet(page) {
                    state.lacking.set(page)
                    state.lackingCount += 1
                }
            }
        }
    }

    var lackingCount: Int { state.withLock { $0.lackingCount } }

    /// The lacking pages as runs, for a resumed source.
    func lackingRuns() -> [ReturnPathMessage.PageRun] {
        state.withLock { $0.lacking.runs }.map { .init(offset: UInt64($0.lowerBound) * pageSize, pages: UInt32($0.count)) }
    }

    /// A new connection after a break: requests go there, and those still outstanding are
    /// asked again first (the LACKING list follows them).
    func reconnected(_ sender: ReturnPathSender) {
        let outstanding = state.withLock { state -> [Int] in
            state.sender = sender
            return state.requestedAt.keys.sorted()
        }
        for page in outstanding {
            sender.send(.requestPages(offset: UInt64(page) * pageSize, length: UInt32(pageSize)))
        }
    }

    func disconnected() { state.withLock { $0.sender = nil } }

    // MARK: installing pages from the stream

    /// Installs a run of pages from the stream (`data` holds `count` pages). Pages no longer
    /// lacking are left alone: the newest copy is already in place.
    func install(offset: UInt64, count: UInt64, data: UnsafeRawPointer?) throws(MigrationStreamError) {
        let first = Int(offset / pageSize)
        // The stretches of the record still lacking, found under one lock; each goes in with
        // one ioctl.
        let stretches = state.withLock { state -> [Range<Int>] in
            var stretches: [Range<Int>] = []
            var page = first
            while page < first + Int(count) {
                guard state.lacking.isSet(page) else { page += 1; continue }
                let end = min(state.lacking.nextClear(from: page), first + Int(count))
                stretches.append(page..<end)
                page = end
            }
            return stretches
        }
        for stretch in stretches {
            let at = UInt64(stretch.lowerBound) * pageSize
            let length = UInt64(stretch.count) * pageSize
            do {
                if let data {
                    _ = try region.copy(offset: at, from: data + (stretch.lowerBound - first) * Int(pageSize), length: length)
                } else {
                    _ = try region.zero(offset: at, length: length)
                }
            } catch {
                throw MigrationStreamError("installing postcopy pages failed: \(error.description)")
            }
            installed(stretch)
        }
    }

    private func installed(_ pages: Range<Int>) {
        let now = WallClock.nanoseconds()
        state.withLock { state in
            for page in pages where state.lacking.isSet(page) {
                state.lacking.clear(page)
                state.lackingCount -= 1
                if let asked = state.requestedAt.removeValue(forKey: page), state.latencies.count < Self.maximumSamples {
                    state.latencies.append(UInt32(clamping: (now &- asked) / 1000))
                }
            }
        }
    }

    // MARK: the fault thread

    func startFaultThread() {
        let thread = Thread { [self] in
            serveFaults()
            finished.lock()
            threadDone = true
            finished.broadcast()
            finished.unlock()
        }
        thread.name = "postcopy-faults"
        thread.start()
    }

    private func serveFaults() {
        while !state.withLock({ $0.stopping }) {
            let wait: UserfaultRegion.Wait
            do { wait = try region.wait(wakeDescriptor: wake.read, timeoutMilliseconds: 100) } catch { return }
            guard wait == .faults else { continue }
            let faults: [UInt64]
            do { faults = try region.pendingFaults() } catch { return }
            let now = WallClock.nanoseconds()
            var zeroes: [UInt64] = []
            var requests: [UInt64] = []
            let sender = state.withLock { state -> ReturnPathSender? in
                for offset in faults {
                    let page = Int(offset / pageSize)
                    if state.lacking.isSet(page) {
                        if state.requestedAt[page] == nil {
                            state.requestedAt[page] = now
                            state.faults += 1
                            requests.append(offset)
                        }
                    } else {
                        zeroes.append(offset)
                    }
                }
                return state.sender
            }
            for offset in zeroes { _ = try? region.zero(offset: offset, length: pageSize) }
            for offset in requests { sender?.send(.requestPages(offset: offset, length: UInt32(pageSize))) }
        }
    }

    /// Every page is in: stops the fault thread and unregisters guest RAM.
    func stop() {
        state.withLock { $0.stopping = true }
        var byte: UInt8 = 1
        _ = write(wake.write, &byte, 1)
        finished.lock()
        while !threadDone { _ = finished.wait(until: Date().addingTimeInterval(0.1)) }
        finished.unlock()
        region.unregister()
    }

    /// Fault counts and fault-to-install latency percentiles.
    var faultStatistics: PostcopyFaultStatistics {
        state.withLock { state in
            let sorted = state.latencies.sorted()
            func percentile(_ p: Double) -> UInt64 {
                sorted.isEmpty ? 0 : UInt64(sorted[min(sorted.count - 1, Int(Double(sorted.count - 1) * p))])
            }
            return PostcopyFaultStatistics(count: state.faults, p50Microseconds: percentile(0.5),
                                           p99Microseconds: percentile(0.99), maxMicroseconds: UInt64(sorted.last ?? 0))
        }
    }
}

/// How the destination's faults were served: `x-postcopy-faults` in its `query-migrate`.
public struct PostcopyFaultStatistics: Equatable, Sendable {
    public var count: UInt64 = 0
    public var p50Microseconds: UInt64 = 0
    public var p99Microseconds: UInt64 = 0
    public var maxMicroseconds: UInt64 = 0
}
