import Machine
import Migration

/// What command handlers reach: the machine, the server-wide named descriptors, and the
/// migration engine.
public final class QMPContext: Sendable {
    public let machine: Machine
    public let descriptors: NamedDescriptors
    public let migration: MigrationController?

    init(machine: Machine, descriptors: NamedDescriptors, migration: MigrationController?) {
        self.machine = machine
        self.descriptors = descriptors
        self.migration = migration
    }
}
