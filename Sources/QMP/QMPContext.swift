import Machine

/// What command handlers reach: the machine and the server-wide named descriptors.
public final class QMPContext: Sendable {
    public let machine: Machine
    public let descriptors: NamedDescriptors

    init(machine: Machine, descriptors: NamedDescriptors) {
        self.machine = machine
        self.descriptors = descriptors
    }
}
