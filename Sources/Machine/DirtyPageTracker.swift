import KVM

/// Tracks which pages of guest RAM change, for migration: KVM's dirty log for the guest's own
/// writes, merged with the pages tern wrote itself.
///
/// `start()` turns on KVM_MEM_LOG_DIRTY_PAGES for every slot (KVM then write-protects guest
/// pages and logs the first write to each); each `collect()` fetches and clears the log
/// (KVM_GET_DIRTY_LOG) and returns the pages dirtied since the previous one; `stop()` turns
/// logging off so the guest runs at full speed again. Runs on the migration thread, never on
/// a vCPU's.
public final class DirtyPageTracker: @unchecked Sendable {
    // Sendable: used by one migration thread at a time.
    private let machine: Machine

    public init(machine: Machine) {
        self.machine = machine
    }

    private var memory: GuestMemory { machine.memory }

    public var pageCount: Int { Int(memory.size / DirtyBitmap.pageSize) }

    public func start() throws(KVMError) {
        memory.hostWrites.setTracking(true)
        try setLogging(true)
        _ = try collect() // start from a clean log
    }

    public func stop() throws(KVMError) {
        memory.hostWrites.setTracking(false)
        try setLogging(false)
    }

    private func setLogging(_ enabled: Bool) throws(KVMError) {
        for region in memory.layout.regions {
            try machine.virtualMachine.setUserMemoryRegion(
                slot: region.slot, guestPhysicalAddress: region.guestAddress.rawValue, size: region.size,
                hostAddress: memory.hostBase + Int(region.hostOffset), logDirtyPages: enabled)
        }
    }

    /// The pages dirtied since the last call (or since `start`).
    public func collect() throws(KVMError) -> DirtyBitmap {
        var bitmap = DirtyBitmap(pageCount: pageCount)
        for region in memory.layout.regions {
            // Regions start on 256 KiB boundaries of the mapping (the low one at 0, the high
            // one at 3 GiB), so each slot's log lands on whole words of the bitmap.
            let firstWord = Int(region.hostOffset / DirtyBitmap.pageSize / 64)
            let failure = bitmap.withWords { words -> KVMError? in
                do throws(KVMError) {
                    try machine.virtualMachine.fetchDirtyLog(slot: region.slot, into: words + firstWord)
                    return nil
                } catch {
                    return error
                }
            }
            if let failure { throw failure }
        }
        for page in memory.hostWrites.drain() where page < UInt64(pageCount) {
            bitmap.set(Int(page))
        }
        return bitmap
    }
}
