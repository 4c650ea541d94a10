// tern-bench: micro-benchmarks of the machine layer that need a live VM (run by bench/dirty-sync).
import Foundation
import Machine

/// Measures one dirty-log sync (KVM_GET_DIRTY_LOG on every slot plus tern's own writes) on a
/// running guest, for the RAM size and dirty rate given.
func dirtySync(memory: UInt64, rate: String, samples: Int) throws {
    var configuration = MachineConfiguration()
    configuration.memorySize = memory
    configuration.boot = .builtinGuest(arguments: "wss=\(min(memory / 2, 512 << 20) >> 20)M rate=\(rate)")
    configuration.serial = .none
    let machine = try Machine(configuration: configuration)
    machine.start()
    defer { machine.end(.hostQuit(cause: .signal, reason: "benchmark done")); _ = machine.waitUntilEnded() }
    Thread.sleep(forTimeInterval: 1.5) // the guest fills its working set
    let tracker = DirtyPageTracker(machine: machine)
    try tracker.start()
    var times: [Double] = []
    var pages: [Int] = []
    for _ in 0..<samples {
        Thread.sleep(forTimeInterval: 0.1)
        let start = DispatchTime.now().uptimeNanoseconds
        let bitmap = try tracker.collect()
        times.append(Double(DispatchTime.now().uptimeNanoseconds - start) / 1000)
        pages.append(bitmap.count)
    }
    try tracker.stop()
    times.sort()
    pages.sort()
    print(String(format: "dirty-sync: RAM %5d MiB, guest rate %5@: median %7.1f us per sync (min %.1f, max %.1f), median %d pages dirty per 100 ms",
                 Int(memory >> 20), rate as NSString, times[times.count / 2], times.first!, times.last!, pages[pages.count / 2]))
}

let arguments = CommandLine.arguments.dropFirst()
let samples = Int(arguments.first ?? "") ?? 20
do {
    for (memory, rate) in [(UInt64(1) << 30, "0"), (1 << 30, "100M"), (1 << 30, "400M"), (4 << 30, "0"), (4 << 30, "100M")] {
        try dirtySync(memory: memory, rate: rate, samples: samples)
    }
} catch {
    FileHandle.standardError.write(Data("tern-bench: \(error)\n".utf8))
    exit(1)
}
