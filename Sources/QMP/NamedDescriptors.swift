#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// File descriptors a client passed with `getfd`, by name, until `closefd` or use.
/// The migration transport `fd:NAME` takes them from here.
public final class NamedDescriptors: Sendable {
    private let descriptors = Mutex<[String: Int32]>([:])

    public init() {}

    /// Stores `descriptor` under `name`, closing any descriptor the name held before (as QEMU).
    public func store(_ descriptor: Int32, as name: String) {
        let previous = descriptors.withLock { table -> Int32? in
            let old = table[name]
            table[name] = descriptor
            return old
        }
        if let previous { Glibc.close(previous) }
    }

    /// Closes and forgets the named descriptor; false when there is none.
    public func close(named name: String) -> Bool {
        guard let descriptor = descriptors.withLock({ $0.removeValue(forKey: name) }) else { return false }
        Glibc.close(descriptor)
        return true
    }

    /// Removes the named descriptor and hands it to the caller, who then owns it.
    public func take(named name: String) -> Int32? {
        descriptors.withLock { $0.removeValue(forKey: name) }
    }

    deinit {
        descriptors.withLock { table in table.values.forEach { Glibc.close($0) } }
    }
}
