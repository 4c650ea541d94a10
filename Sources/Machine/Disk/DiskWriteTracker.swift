import Synchronization

/// Which chunks of a disk image were written: since the image was opened (what an incremental
/// block migration must send), and since the last sync while a migration tracks them.
///
/// A chunk is marked after its write has completed, so a reader that clears the mark before
/// reading either reads the new data or sees the chunk marked again.
public final class DiskWriteTracker: Sendable {
    /// The tracking unit: QEMU's block migration moves 1 MiB chunks; 64 KiB keeps a guest's
    /// scattered small writes from re-sending much more than they changed.
    public static let chunkSize: UInt64 = 64 << 10

    private struct State {
        var sinceOpen: [UInt64]
        var dirty: [UInt64]
        var tracking = false
    }
    private let state: Mutex<State>
    public let chunkCount: Int

    init(size: UInt64) {
        chunkCount = Int((size + Self.chunkSize - 1) / Self.chunkSize)
        let words = (chunkCount + 63) / 64
        state = Mutex(State(sinceOpen: [UInt64](repeating: 0, count: words), dirty: [UInt64](repeating: 0, count: words)))
    }

    /// Records a completed write of `length` bytes at `offset`.
    func markWritten(offset: UInt64, length: UInt64) {
        guard length > 0 else { return }
        let first = Int(offset / Self.chunkSize)
        let last = min(Int((offset + length - 1) / Self.chunkSize), chunkCount - 1)
        guard first <= last else { return }
        state.withLock { state in
            for chunk in first...last {
                let bit = UInt64(1) << UInt64(chunk % 64)
                state.sinceOpen[chunk / 64] |= bit
                if state.tracking { state.dirty[chunk / 64] |= bit }
            }
        }
    }

    /// Starts (or stops) recording dirty chunks; either way the dirty set starts empty.
    public func setTracking(_ enabled: Bool) {
        state.withLock { state in
            state.tracking = enabled
            for index in state.dirty.indices { state.dirty[index] = 0 }
        }
    }

    /// The chunks written since the last call (or since tracking began), which are forgotten.
    public func takeDirty() -> [Int] {
        state.withLock { state in
            defer { for index in state.dirty.indices { state.dirty[index] = 0 } }
            return Self.chunks(in: state.dirty)
        }
    }

    /// Forgets that `chunk` is dirty: its data is about to be read and sent.
    public func clearDirty(chunk: Int) {
        guard chunk >= 0, chunk < chunkCount else { return }
        state.withLock { $0.dirty[chunk / 64] &= ~(UInt64(1) << UInt64(chunk % 64)) }
    }

    /// How many chunks are dirty now, without taking them.
    public var dirtyCount: Int {
        state.withLock { $0.dirty.reduce(0) { $0 + $1.nonzeroBitCount } }
    }

    /// The chunks written since the image was opened.
    public func writtenSinceOpen() -> [Int] {
        state.withLock { Self.chunks(in: $0.sinceOpen) }
    }

    /// The numbers of the set bits, in order.
    private static func chunks(in words: [UInt64]) -> [Int] {
        var chunks: [Int] = []
        for (index, word) in words.enumerated() where word != 0 {
            var bits = word
            while bits != 0 {
                chunks.append(index * 64 + bits.trailingZeroBitCount)
                bits &= bits - 1
            }
        }
        return chunks
    }
}
