import Foundation
import Machine

/// How the disks travel: QEMU's `migrate` flags `blk` (the whole image) and `inc` (what the
/// destination's copy of the shared base lacks), or neither (the image is shared storage).
public enum BlockMigrationMode: UInt8, Sendable {
    case shared = 0
    case full = 1
    case incremental = 2
}

/// The record kinds of the `block` live section (docs/migration-stream.md).
enum BlockRecord {
    static let setup: UInt8 = 0
    static let data: UInt8 = 1
    static let zero: UInt8 = 2
    /// The most bytes one data record carries.
    static let maximumData = Int(DiskWriteTracker.chunkSize)
}

/// The source side of block migration, in the spirit of QEMU's block-migration.c: a first pass
/// over the image (or, with `inc`, over the chunks written since tern opened it), then the
/// chunks the guest wrote since, iterating with RAM; whatever is dirty at the switchover goes
/// while the guest is stopped. Holes are sent as zero runs without being read; with the
/// `zero-blocks` capability, chunks that read as zeros are too. In every mode the images are
/// flushed and their locks released at the switchover, so the destination can take them.
final class OutgoingBlockSection: OutgoingLiveSection {
    let name = "block"
    let version: UInt32 = 1
    private let machine: Machine
    private let mode: BlockMigrationMode
    private let zeroBlocks: Bool
    private let chunk = DiskWriteTracker.chunkSize
    /// The current pass's chunks per disk, in order, and where the pass has got to.
    private var work: [(disk: Int, chunk: Int)] = []
    private var cursor = 0
    /// Passes begun so far; the first (1) is the whole image or what was written since open.
    private var passNumber = 0
    private var buffer: UnsafeMutableRawPointer
    /// Per disk: the data extent last looked up, so holes are found without a call per chunk.
    private var extents: [Range<UInt64>?]
    private var transferred: UInt64 = 0
    private var total: UInt64 = 0
    /// Bytes of block records written to the stream (what `transferred` cost on the wire).
    private var streamBytes: UInt64 = 0
    private let backgroundFlush = BackgroundFlush()
    /// With TERN_TEST_DROP_DIRTY_BLOCK=1 one chunk the guest wrote after the last pass read it
    /// is left out of the final copy, so a test can prove that the guest's disk check catches
    /// a lost block.
    static let dropsOneDirtyBlock = ProcessInfo.processInfo.environment["TERN_TEST_DROP_DIRTY_BLOCK"] == "1"
    private var droppedOne = false

    init(machine: Machine, mode: BlockMigrationMode, zeroBlocks: Bool) {
        self.machine = machine
        self.mode = mode
        self.zeroBlocks = zeroBlocks
        self.buffer = UnsafeMutableRawPointer.allocate(byteCount: BlockRecord.maximumData, alignment: 4096)
        self.extents = Array(repeating: nil, count: machine.disks.count)
    }

    deinit { buffer.deallocate() }

    private var disks: [DiskImage] { machine.disks }

    func setup(_ stream: SectionStream) throws(MigrationStreamError) {
        if mode != .shared { disks.forEach { $0.writes.setTracking(true) } }
        stream.record { writer in
            writer.append(BlockRecord.setup)
            writer.append(mode.rawValue)
            writer.append(UInt32(disks.count))
            writer.append(UInt32(chunk))
            for disk in disks { writer.append(disk.size) }
        }
        total = mode == .full ? disks.reduce(0) { $0 + $1.size } : 0
    }

    var passComplete: Bool { cursor >= work.count }

    func beginPass() throws(MigrationStreamError) -> UInt64 {
        guard mode != .shared else {
            // Write back what the guest wrote so far while it runs, so the flush inside the
            // stop has only the last moments to write.
            backgroundFlush.start(disks)
            return 0
        }
        work.removeAll(keepingCapacity: true)
        cursor = 0
        passNumber += 1
        if passNumber == 1 {
            for (index, disk) in disks.enumerated() {
                // The tracker was cleared when tracking began: writes since then are in this pass.
                _ = disk.writes.takeDirty()
                let chunks = mode == .full ? Array(0..<disk.writes.chunkCount) : disk.writes.writtenSinceOpen()
                work.append(contentsOf: chunks.map { (index, $0) })
                if mode == .incremental { total += UInt64(chunks.count) * chunk }
            }
        } else {
            for (index, disk) in disks.enumerated() {
                var dirty = disk.writes.takeDirty()
                if Self.dropsOneDirtyBlock && !droppedOne, let first = dirty.first {
                    // Every chunk here was written after it was last read (see sendNext).
                    droppedOne = true
                    dirty.removeFirst()
                    FileHandle.standardError.write(Data("tern: TEST HOOK: dropped dirty disk chunk \(first) of disk \(index)\n".utf8))
                }
                work.append(contentsOf: dirty.map { (index, $0) })
                total += UInt64(dirty.count) * chunk
            }
        }
        return UInt64(work.count - cursor) * chunk
    }

    func iterate(_ stream: SectionStream, budget: UInt64) throws(MigrationStreamError) {
        var spent: UInt64 = 0
        while cursor < work.count && spent < budget {
            spent += try sendNext(stream)
        }
    }

    var pending: PendingBytes {
        guard mode != .shared else { return PendingBytes() }
        if passNumber == 0 {
            // Before the first pass: all of it (blk) or what was written since open (inc).
            let first = disks.reduce(UInt64(0)) {
                $0 + (mode == .full ? $1.size : UInt64($1.writes.writtenSinceOpen().count) * chunk)
            }
            return PendingBytes(beforeSwitchover: first)
        }
        let dirty = disks.reduce(0) { $0 + UInt64($1.writes.dirtyCount) }
        return PendingBytes(beforeSwitchover: (UInt64(work.count - cursor) + dirty) * chunk)
    }

    func complete(_ stream: SectionStream, _ context: SwitchoverContext) throws(MigrationStreamError) {
        if mode != .shared {
            // The guest is stopped: one last sync finds everything it wrote.
            while cursor < work.count { _ = try sendNext(stream) }
            _ = try beginPass()
            while cursor < work.count { _ = try sendNext(stream) }
            if let error = stream.error { throw error }
        }
        do {
            // Shared storage: what the guest wrote must be on the image before the destination
            // reads it. A copy (blk/inc) already carries it; the source's image only has to be
            // let go. Earlier flushes (beginPass) leave little for this one, inside the stop.
            try machine.flushAndDeactivateDisks(flush: mode == .shared)
        } catch {
            throw MigrationStreamError("flushing the disks before the handover failed: \(error)")
        }
    }

    func report(into statistics: inout MigrationStatistics) {
        guard mode != .shared else { return }
        let remaining = pending.beforeSwitchover
        statistics.disk = DiskMigrationStatistics(transferred: transferred, remaining: remaining,
                                                  total: max(total, transferred + remaining), streamBytes: streamBytes)
    }

    func cleanup() {
        disks.forEach { $0.writes.setTracking(false) }
    }

    /// Sends the next chunk, or a run of hole chunks as one zero record. Returns the bytes sent.
    private func sendNext(_ stream: SectionStream) throws(MigrationStreamError) -> UInt64 {
        let (diskIndex, chunkIndex) = work[cursor]
        let disk = disks[diskIndex]
        let offset = UInt64(chunkIndex) * chunk
        let length = min(chunk, disk.size - offset)
        if isHole(diskIndex, offset: offset, length: length) {
            // Coalesce the following chunks of the same disk that are holes too.
            var end = offset + length
            cursor += 1
            while cursor < work.count, work[cursor].disk == diskIndex, UInt64(work[cursor].chunk) * chunk == end {
                let next = min(chunk, disk.size - end)
                guard isHole(diskIndex, offset: end, length: next) else { break }
                end += next
                cursor += 1
            }
            writeZero(stream, disk: diskIndex, offset: offset, length: end - offset)
            transferred += end - offset
            streamBytes += 21
            return 21
        }
        cursor += 1
        // Cleared before the read: a write that completes after it marks the chunk again and
        // it goes again; one that completed before it is in what is read, and need not.
        disk.writes.clearDirty(chunk: chunkIndex)
        do {
            try disk.read(offset: offset, into: buffer, count: Int(length))
        } catch {
            throw MigrationStreamError("reading disk \(diskIndex) for the migration failed: \(error)")
        }
        transferred += length
        if zeroBlocks && isZero(buffer, count: Int(length)) {
            writeZero(stream, disk: diskIndex, offset: offset, length: length)
            streamBytes += 21
            return 21
        }
        stream.record { writer in
            writer.append(BlockRecord.data)
            writer.append(UInt32(diskIndex))
            writer.append(offset)
            writer.append(UInt32(length))
            writer.append(memory: buffer, count: Int(length))
        }
        streamBytes += 17 + length
        return 17 + length
    }

    private func writeZero(_ stream: SectionStream, disk: Int, offset: UInt64, length: UInt64) {
        stream.record { writer in
            writer.append(BlockRecord.zero)
            writer.append(UInt32(disk))
            writer.append(offset)
            writer.append(length)
        }
    }

    /// Whether the range lies in a hole of the image file. Only the first pass over a full
    /// copy asks the file system: a chunk the guest wrote since is read whatever it holds.
    private func isHole(_ disk: Int, offset: UInt64, length: UInt64) -> Bool {
        guard mode == .full, passNumber == 1 else { return false }
        if let extent = extents[disk], offset < extent.upperBound {
            return offset + length <= extent.lowerBound
        }
        // Past the extent we knew of: look up the next one.
        let next = disks[disk].nextDataRange(from: offset)
        extents[disk] = next ?? (disks[disk].size..<disks[disk].size)
        guard let next else { return true }
        return offset + length <= next.lowerBound
    }

    private func isZero(_ pointer: UnsafeMutableRawPointer, count: Int) -> Bool {
        let words = pointer.bindMemory(to: UInt64.self, capacity: count / 8)
        for index in 0..<(count / 8) where words[index] != 0 { return false }
        return true
    }
}

/// One flush of the images at a time on a thread of its own, while the guest runs.
final class BackgroundFlush: @unchecked Sendable {
    // @unchecked: `running` is only touched under `lock`.
    private let lock = NSLock()
    private var running = false

    func start(_ disks: [DiskImage]) {
        lock.lock()
        defer { lock.unlock() }
        guard !running, !disks.isEmpty else { return }
        running = true
        let thread = Thread { [self] in
            for disk in disks { try? disk.flush() }
            lock.lock()
            running = false
            lock.unlock()
        }
        thread.name = "disk-flush"
        thread.start()
    }
}

/// The destination side: checks the source's disks against its own before anything is
/// written, then writes each chunk (or zero run) into its image, every range checked.
final class IncomingBlockSection: IncomingLiveSection {
    private let disks: [DiskImage]
    private var mode: BlockMigrationMode?

    init(disks: [DiskImage]) { self.disks = disks }

    func load(_ body: ByteCursor) throws(MigrationStreamError) {
        let kind = try body.read(UInt8.self, "block record kind")
        switch kind {
        case BlockRecord.setup:
            guard mode == nil else { throw MigrationStreamError("the block section was set up twice") }
            let rawMode = try body.read(UInt8.self, "block migration mode")
            guard let parsed = BlockMigrationMode(rawValue: rawMode) else {
                throw MigrationStreamError("unknown block migration mode \(rawMode)")
            }
            let count = Int(try body.read(UInt32.self, "disk count"))
            let chunk = try body.read(UInt32.self, "block chunk size")
            guard count == disks.count else {
                throw MigrationStreamError("the source has \(count) disks, this destination \(disks.count): give it the same -drive options")
            }
            guard chunk == UInt32(DiskWriteTracker.chunkSize) else {
                throw MigrationStreamError("block chunk size \(chunk) is not supported (this tern uses \(DiskWriteTracker.chunkSize))")
            }
            for (index, disk) in disks.enumerated() {
                let size = try body.read(UInt64.self, "disk size")
                guard size == disk.size else {
                    throw MigrationStreamError("disk \(index): the source's image is \(size) bytes, but '\(disk.path)' here is \(disk.size) bytes; create it with 'truncate -s \(size)'")
                }
            }
            try body.finish("the block setup record")
            if parsed != .shared {
                for disk in disks {
                    guard !disk.configuration.readOnly else {
                        throw MigrationStreamError("'\(disk.path)' is read-only here: a block migration must write it")
                    }
                    // The copy must be this destination's own: the lock fails if the source
                    // (or anyone) still has the image open, i.e. it is shared storage.
                    do { try disk.activate() } catch {
                        throw MigrationStreamError("\(error) (block migration writes its own copy; for shared storage migrate without blk/inc)")
                    }
                }
            }
            mode = parsed
        case BlockRecord.data, BlockRecord.zero:
            guard let mode, mode != .shared else { throw MigrationStreamError("block data before the block setup, or in shared-storage mode") }
            let index = Int(try body.read(UInt32.self, "disk index"))
            let offset = try body.read(UInt64.self, "block offset")
            let length = kind == BlockRecord.data ? UInt64(try body.read(UInt32.self, "block length"))
                : try body.read(UInt64.self, "zero run length")
            guard index < disks.count else { throw MigrationStreamError("block data for disk \(index); there are \(disks.count)") }
            let disk = disks[index]
            let (end, overflow) = offset.addingReportingOverflow(length)
            guard !overflow, end <= disk.size, offset % 512 == 0, length % 512 == 0, length > 0 else {
                throw MigrationStreamError("block range \(offset)+\(length) does not fit disk \(index) (\(disk.size) bytes) in whole sectors")
            }
            do {
                if kind == BlockRecord.data {
                    guard length <= UInt64(BlockRecord.maximumData) else {
                        throw MigrationStreamError("a block data record of \(length) bytes (at most \(BlockRecord.maximumData))")
                    }
                    let data = try body.take(Int(length), "block data")
                    try body.finish("a block data record")
                    // Recorded as written: what arrived here differs from the base too, so a
                    // later `inc` migration from this destination sends it on.
                    try disk.write(offset: offset, from: data.baseAddress!, count: Int(length))
                } else {
                    try body.finish("a block zero record")
                    try disk.zero(offset: offset, length: length)
                }
            } catch let error as DiskImageError {
                throw MigrationStreamError("writing disk \(index) failed: \(error)")
            } catch let error as MigrationStreamError {
                throw error
            } catch {
                throw MigrationStreamError("writing disk \(index) failed")
            }
        default:
            throw MigrationStreamError("unknown block record kind \(kind)")
        }
    }

    /// The copy stays in the page cache, like any write through a writeback cache: flushing a
    /// whole image here would hold the guest stopped for it, and the guest's own FLUSH
    /// requests make its data durable when it asks (cache=none or writethrough write through).
    func finish() throws(MigrationStreamError) {
        guard mode != nil else { throw MigrationStreamError("the block section was never set up") }
    }
}
