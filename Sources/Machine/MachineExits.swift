import CKVM
import KVM

/// Exit handling: what each KVM exit means for this machine. Runs on the exiting vCPU's thread.
extension Machine {
    func handle(_ exit: VCPUExit, on vcpu: VCPU) -> ExitDisposition {
        switch exit {
        case let .io(port, isWrite, size, count, data):
            for access in 0..<count {
                let offset = access * size
                if isWrite {
                    bus.write(port: port, size: size, value: UInt32(truncatingIfNeeded: loadLittleEndian(data, at: offset, size: size)))
                } else {
                    storeLittleEndian(UInt64(bus.read(port: port, size: size)), into: data, at: offset, size: size)
                }
            }
            return .resume
        case let .mmio(address, isWrite, data):
            guard let device = virtioDevice(at: address) else {
                // Nothing else is mapped outside RAM but the in-kernel APICs; reads see all ones.
                if !isWrite { for i in 0..<data.count { data[i] = 0xff } }
                return .resume
            }
            let offset = address - device.base
            if isWrite {
                device.write(offset: offset, size: data.count, value: loadLittleEndian(data, at: 0, size: data.count))
            } else {
                storeLittleEndian(device.read(offset: offset, size: data.count), into: data, at: 0, size: data.count)
            }
            return .resume
        case .interrupted:
            return .resume
        case .halt:
            return .resume
        case .shutdown:
            end(.guestReset(reason: "vCPU \(vcpu.id) triple-faulted (\(describeRegisters(of: vcpu)))"))
            return .stop
        case let .systemEvent(type):
            if type == UInt32(KVM_SYSTEM_EVENT_RESET) {
                end(.guestReset(reason: "the guest requested a reset"))
            } else {
                end(.guestShutdown(reason: "the guest powered off (system event \(type))"))
            }
            return .stop
        case let .internalError(suberror, data):
            let what: String
            switch suberror {
            case UInt32.max:
                what = "KVM_RUN failed (errno \(data.first ?? 0))"
            case 1:
                what = "KVM could not emulate an instruction"
            case 2:
                what = "a simultaneous exception"
            case 3:
                what = "an event delivery failure"
            default:
                what = "KVM internal error, suberror \(suberror)"
            }
            end(.internalError(message: "vCPU \(vcpu.id): \(what) (\(describeRegisters(of: vcpu)))"))
            return .stop
        case let .failedEntry(reason, _):
            end(.internalError(message: "vCPU \(vcpu.id): VM entry failed, hardware reason 0x\(String(reason, radix: 16))"))
            return .stop
        case .debug:
            return .resume
        case let .unhandled(reason):
            end(.internalError(message: "vCPU \(vcpu.id): unexpected KVM exit reason \(reason) (\(describeRegisters(of: vcpu)))"))
            return .stop
        }
    }

    /// A one-line register summary for error messages.
    func describeRegisters(of vcpu: VCPU) -> String {
        guard let regs = try? vcpu.registers(), let sregs = try? vcpu.specialRegisters() else {
            return "registers unavailable"
        }
        func hex(_ value: UInt64) -> String { "0x" + String(value, radix: 16) }
        return "RIP \(hex(regs.rip)) RSP \(hex(regs.rsp)) RFLAGS \(hex(regs.rflags)) CPL \(sregs.cs.selector & 3) "
            + "CR0 \(hex(sregs.cr0)) CR3 \(hex(sregs.cr3)) CR4 \(hex(sregs.cr4)) EFER \(hex(sregs.efer))"
    }
}

/// The value of `size` bytes of an exit's data (x86 is little-endian), and the reverse.
private func loadLittleEndian(_ data: UnsafeMutableRawBufferPointer, at offset: Int, size: Int) -> UInt64 {
    var value: UInt64 = 0
    for byte in (0..<size).reversed() { value = value << 8 | UInt64(data[offset + byte]) }
    return value
}

private func storeLittleEndian(_ value: UInt64, into data: UnsafeMutableRawBufferPointer, at offset: Int, size: Int) {
    for byte in 0..<size { data[offset + byte] = UInt8(truncatingIfNeeded: value >> (8 * byte)) }
}
