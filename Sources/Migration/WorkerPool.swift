import Foundation

/// A fixed set of threads that run one job at a time, each worker on its own index, while the
/// caller waits: the compression threads of the source and the decompression threads of the
/// destination (`compress-threads`, `decompress-threads`).
final class WorkerPool: @unchecked Sendable {
    // Sendable: every field is guarded by `condition`.
    private let condition = NSCondition()
    private var job: ((Int) -> Void)?
    private var generation = 0
    private var running = 0
    private var stopping = false
    let workerCount: Int

    init(workers: Int, name: String) {
        workerCount = max(workers, 1)
        for index in 0..<workerCount {
            let thread = Thread { [self] in work(index) }
            thread.name = "\(name)-\(index)"
            thread.start()
        }
    }

    private func work(_ index: Int) {
        var seen = 0
        while true {
            condition.lock()
            while generation == seen && !stopping { condition.wait() }
            if stopping { condition.unlock(); return }
            seen = generation
            let current = job
            condition.unlock()
            current?(index)
            condition.lock()
            running -= 1
            if running == 0 { condition.broadcast() }
            condition.unlock()
        }
    }

    /// Runs `body(worker)` on every worker and returns when all are done.
    func run(_ body: @escaping (Int) -> Void) {
        condition.lock()
        job = body
        running = workerCount
        generation += 1
        condition.broadcast()
        while running > 0 { condition.wait() }
        job = nil
        condition.unlock()
    }

    /// Ends the threads (after the current job).
    func shutdown() {
        condition.lock()
        stopping = true
        condition.broadcast()
        condition.unlock()
    }
}
