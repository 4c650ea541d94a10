import CDisk

/// The locks that keep two VMMs from writing one image, in QEMU's layout so that tern and QEMU
/// see each other's: open-file-description locks on single bytes, byte 100 + p for each
/// permission p a user holds and byte 200 + p for each it refuses to share. tern holds
/// "consistent read" (bit 0) and, when it writes, "write" (bit 1), and refuses to share
/// "write": so a second writer, or a reader while tern writes, is refused.
///
/// A migration's destination opens its images inactive, holding nothing, and activates them
/// when the guest is about to run there; the source deactivates its images after the last
/// flush. That is what lets two processes on one host share an image across a migration.
struct ImageLock {
    private static let consistentRead: UInt64 = 100
    private static let writePermission: UInt64 = 101
    private static let unshareWrite: UInt64 = 201

    let descriptor: Int32
    let writable: Bool
    private(set) var held = false

    init(descriptor: Int32, writable: Bool) {
        self.descriptor = descriptor
        self.writable = writable
    }

    /// Takes the locks, or says who holds what. Idempotent.
    mutating func acquire(path: String) throws(DiskImageError) {
        guard !held else { return }
        // Test first, then lock: a shared lock never fails on another shared lock, so the test
        // is what detects the conflict. (Two processes racing here can both pass; QEMU has the
        // same window and closes it by re-testing after locking, as below.)
        try checkNoConflict(path: path)
        var taken: [UInt64] = []
        for byte in bytes {
            let result = cdisk_lock_shared(descriptor, byte, 0)
            if result < 0 {
                for undo in taken { _ = cdisk_lock_shared(descriptor, undo, 1) }
                throw .lockFailed(path: path, errno: -result)
            }
            taken.append(byte)
        }
        do {
            try checkNoConflict(path: path)
        } catch {
            for undo in taken { _ = cdisk_lock_shared(descriptor, undo, 1) }
            throw error
        }
        held = true
    }

    /// Drops the locks (the image stays open). Idempotent.
    mutating func release() {
        guard held else { return }
        for byte in bytes { _ = cdisk_lock_shared(descriptor, byte, 1) }
        held = false
    }

    private var bytes: [UInt64] {
        writable ? [Self.consistentRead, Self.writePermission, Self.unshareWrite]
            : [Self.consistentRead, Self.unshareWrite]
    }

    private func checkNoConflict(path: String) throws(DiskImageError) {
        // Someone writing conflicts with us refusing to share writes; someone refusing to share
        // writes conflicts with us writing.
        var tests: [UInt64] = [Self.writePermission]
        if writable { tests.append(Self.unshareWrite) }
        for byte in tests {
            let result = cdisk_lock_test(descriptor, byte)
            if result < 0 { throw .lockFailed(path: path, errno: -result) }
            if result == 1 { throw .locked(path: path, writable: writable) }
        }
    }
}
