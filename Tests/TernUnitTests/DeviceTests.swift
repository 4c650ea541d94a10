import Synchronization
import Testing
@testable import Machine

/// Records what a device does to the outside.
final class Recorder: Sendable {
    let bytes = Mutex<[UInt8]>([])
    let levels = Mutex<[Bool]>([])
    let resets = Mutex(0)
}

@Suite("Devices")
struct DeviceTests {
    func makeSerial() -> (Serial16550, Recorder) {
        let recorder = Recorder()
        let serial = Serial16550(output: { byte in recorder.bytes.withLock { $0.append(byte) } },
                                 interruptLine: { level in recorder.levels.withLock { $0.append(level) } })
        return (serial, recorder)
    }

    @Test("bytes written to THR are transmitted; the transmitter always reads empty")
    func transmit() {
        let (serial, recorder) = makeSerial()
        for byte in "hi\n".utf8 { serial.write(offset: 0, size: 1, value: UInt32(byte)) }
        #expect(recorder.bytes.withLock { $0 } == Array("hi\n".utf8))
        #expect(serial.read(offset: 5, size: 1) & 0x60 == 0x60)
    }

    @Test("received bytes set data-ready, raise IRQ 4 when enabled, and drain in order")
    func receive() {
        let (serial, recorder) = makeSerial()
        serial.write(offset: 1, size: 1, value: 0x01) // IER: receive data available
        #expect(serial.receive(Array("ab".utf8)) == 2)
        #expect(serial.read(offset: 5, size: 1) & 0x01 == 0x01)
        #expect(serial.read(offset: 2, size: 1) & 0x0f == 0x04)
        #expect(recorder.levels.withLock { $0 }.last == true)
        #expect(serial.read(offset: 0, size: 1) == UInt32(UInt8(ascii: "a")))
        #expect(serial.read(offset: 0, size: 1) == UInt32(UInt8(ascii: "b")))
        #expect(serial.read(offset: 5, size: 1) & 0x01 == 0)
        #expect(recorder.levels.withLock { $0 }.last == false)
    }

    @Test("enabling the THR-empty interrupt raises it; reading IIR acknowledges it")
    func transmitInterrupt() {
        let (serial, recorder) = makeSerial()
        serial.write(offset: 1, size: 1, value: 0x02)
        #expect(recorder.levels.withLock { $0 } == [true])
        #expect(serial.read(offset: 2, size: 1) & 0x0f == 0x02)
        #expect(serial.read(offset: 2, size: 1) & 0x0f == 0x01)
        #expect(recorder.levels.withLock { $0 } == [true, false])
    }

    @Test("Linux's 16550A probe: FIFO bits in IIR, scratch register, loopback MSR 0x90, divisor latch")
    func linuxProbe() {
        let (serial, recorder) = makeSerial()
        serial.write(offset: 2, size: 1, value: 0xe7) // enable FIFOs
        #expect(serial.read(offset: 2, size: 1) & 0xc0 == 0xc0)
        serial.write(offset: 7, size: 1, value: 0xa5)
        #expect(serial.read(offset: 7, size: 1) == 0xa5)
        serial.write(offset: 4, size: 1, value: 0x1a) // loopback | OUT2 | RTS
        #expect(serial.read(offset: 6, size: 1) & 0xf0 == 0x90)
        serial.write(offset: 0, size: 1, value: 0x41) // looped back, not transmitted
        #expect(recorder.bytes.withLock { $0 }.isEmpty)
        #expect(serial.read(offset: 0, size: 1) == 0x41)
        serial.write(offset: 4, size: 1, value: 0x08)
        serial.write(offset: 3, size: 1, value: 0x83) // DLAB
        serial.write(offset: 0, size: 1, value: 0x01)
        serial.write(offset: 1, size: 1, value: 0x00)
        #expect(serial.read(offset: 0, size: 1) == 0x01)
        serial.write(offset: 3, size: 1, value: 0x03)
        #expect(serial.read(offset: 3, size: 1) == 0x03)
    }

    @Test("the receive buffer refuses input beyond its capacity instead of growing")
    func receiveCapacity() {
        let (serial, _) = makeSerial()
        let accepted = serial.receive([UInt8](repeating: 0x61, count: Serial16550.receiveCapacity + 10))
        #expect(accepted == Serial16550.receiveCapacity)
        #expect(!serial.canReceive)
    }

    @Test("i8042: 0xFE on the command port resets; self-test answers 0x55; command byte round-trips")
    func keyboardController() {
        let recorder = Recorder()
        let controller = I8042Controller { recorder.resets.withLock { $0 += 1 } }
        controller.write(offset: 4, size: 1, value: 0xaa)
        #expect(controller.read(offset: 4, size: 1) & 0x01 == 0x01)
        #expect(controller.read(offset: 0, size: 1) == 0x55)
        controller.write(offset: 4, size: 1, value: 0x60)
        controller.write(offset: 0, size: 1, value: 0x47)
        controller.write(offset: 4, size: 1, value: 0x20)
        #expect(controller.read(offset: 0, size: 1) == 0x47)
        #expect(recorder.resets.withLock { $0 } == 0)
        controller.write(offset: 4, size: 1, value: 0xfe)
        #expect(recorder.resets.withLock { $0 } == 1)
    }

    @Test("unmapped ports read as all ones and ignore writes")
    func unmappedPorts() {
        let bus = PortIOBus()
        #expect(bus.read(port: 0x80, size: 1) == 0xff)
        #expect(bus.read(port: 0xcfc, size: 4) == 0xffff_ffff)
        bus.write(port: 0x80, size: 1, value: 0x12)
    }
}
