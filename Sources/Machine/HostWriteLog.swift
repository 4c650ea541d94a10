import Synchronization

/// The pages of guest RAM that tern itself wrote while a migration tracks dirty pages.
///
/// KVM's dirty log records only the guest's writes; the VMM's own stores (reloading the boot
/// image on a reset, for example) would otherwise be missed. Such writes are rare, so a set of
/// page numbers under a lock is enough; nothing is recorded while tracking is off.
final class HostWriteLog: Sendable {
    private struct State {
        var tracking = false
        var pages = Set<UInt64>()
    }
    private let state = Mutex(State())

    func record(offset: UInt64, length: UInt64) {
        state.withLock { state in
            guard state.tracking, length > 0 else { return }
            for page in (offset / 4096)...((offset + length - 1) / 4096) { state.pages.insert(page) }
        }
    }

    func setTracking(_ enabled: Bool) {
        state.withLock {
            $0.tracking = enabled
            $0.pages.removeAll()
        }
    }

    /// Returns the pages written since the last call, and forgets them.
    func drain() -> Set<UInt64> {
        state.withLock { state in
            defer { state.pages.removeAll() }
            return state.pages
        }
    }
}
