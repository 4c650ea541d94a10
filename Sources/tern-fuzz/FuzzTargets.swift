import Foundation
import Machine
@testable import Migration
import QMP
import CFuzzDriver
import CGuestMemory
import CPageCodec

// Coverage-guided fuzz targets for libFuzzer (Swift's -sanitize=fuzzer): the inputs a peer or
// a client controls. One binary holds every target; TERN_FUZZ_TARGET picks one:
//
//   stream       a migration stream (version 1 or 2, every page encoder) into the real loader,
//                with guest memory but no KVM (the loader sees the machine as a MigrationTarget)
//   qmp-json     bytes from a QMP client through the line splitter and the JSON parser, and
//                every parsed value through serialisation and back (it must come back equal)
//   return-path  return-path frames through the reader, and bodies with a valid checksum
//                through the decoder (so the fuzzer gets past the CRC)
//
// Built and run by scripts/fuzz (see docs/fuzzing.md); a crash is a bug: a trap, a write
// outside guest memory, or a parse that does not round-trip.

/// The destination the stream target loads into: 32 MiB of guest memory (the smallest tern
/// machine, which the seed streams come from) and the device sections of a one-vCPU machine.
final class FuzzDestination: MigrationTarget {
    let memory: GuestMemory
    let cpuCount = 1
    let disks: [DiskImage]
    let deviceSectionNames: [String]
    /// The image size of the destination with a disk: what scripts/fuzz-seeds.py's disk seed uses.
    static let diskSize = 1 << 20

    /// `withDisk`: one 1 MiB image in a temporary file, for streams with a `block` section.
    init(withDisk: Bool = false) {
        do {
            memory = try GuestMemory(layout: GuestMemoryLayout(ramSize: MachineConfiguration.minimumMemorySize))
            if withDisk {
                let path = FileManager.default.temporaryDirectory.appendingPathComponent("tern-fuzz-disk-\(getpid()).img").path
                FileManager.default.createFile(atPath: path, contents: Data(count: Self.diskSize))
                disks = [try DiskImage(DriveConfiguration(path: path, id: "fuzz"), active: false)]
            } else {
                disks = []
            }
        } catch {
            fatalError("tern-fuzz: cannot create the destination: \(error)") // the harness itself, not an input
        }
        deviceSectionNames = ["runstate", "kvmclock", "pic/master", "pic/slave", "ioapic", "pit", "serial/com1", "i8042"]
            + (withDisk ? ["virtio-blk/0"] : []) + ["cpu/0"]
    }

    /// A block record that wrote past the image's end would have grown the file.
    func checkDiskUnharmed() {
        for disk in disks {
            let size = (try? FileManager.default.attributesOfItem(atPath: disk.path)[.size] as? Int) ?? -1
            if size != Self.diskSize { fatalError("tern-fuzz: the disk image is now \(size) bytes: a write ran past its end") }
        }
    }

    func loadDeviceState(_ sections: [StateSection]) throws(StateLoadError) -> RunState { .running }
}

enum FuzzTarget: String {
    case stream
    case qmpJSON = "qmp-json"
    case returnPath = "return-path"
}

let selectedTarget: FuzzTarget = {
    let name = ProcessInfo.processInfo.environment["TERN_FUZZ_TARGET"] ?? ""
    guard let target = FuzzTarget(rawValue: name) else {
        fatalError("tern-fuzz: set TERN_FUZZ_TARGET to stream, qmp-json or return-path (got '\(name)')")
    }
    return target
}()
nonisolated(unsafe) let destination = FuzzDestination()
nonisolated(unsafe) let diskDestination = FuzzDestination(withDisk: true)
let verbose = ProcessInfo.processInfo.environment["TERN_FUZZ_VERBOSE"] != nil

@main
struct TernFuzz {
    static func main() {
        var argc = CommandLine.argc
        var argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? = CommandLine.unsafeArgv
        _ = selectedTarget // a missing TERN_FUZZ_TARGET stops here, before fuzzing starts
        exit(LLVMFuzzerRunDriver(&argc, &argv, { data, size in fuzzOneInput(data, size) }))
    }
}

/// libFuzzer's callback. (Exported by its C name too: libFuzzer's own main, which the linker
/// may pick instead of the one above, calls it by that name.)
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    let bytes = data.map { Array(UnsafeBufferPointer(start: $0, count: size)) } ?? []
    switch selectedTarget {
    case .stream: fuzzStream(bytes)
    case .qmpJSON: fuzzQMPJSON(bytes)
    case .returnPath: fuzzReturnPath(bytes)
    }
    return 0
}

/// The input as a readable descriptor: a memfd holding it, positioned at its start.
func descriptor(holding bytes: [UInt8]) -> Int32 {
    let fd = cguest_memfd_create("tern-fuzz-input")
    precondition(fd >= 0, "tern-fuzz: memfd_create failed")
    var written = 0
    while written < bytes.count {
        let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + written, $0.count - written) }
        precondition(n > 0, "tern-fuzz: writing the input failed")
        written += n
    }
    lseek(fd, 0, SEEK_SET)
    return fd
}

func fuzzStream(_ bytes: [UInt8]) {
    let fd = descriptor(holding: bytes)
    defer { close(fd) }
    // The destination must set the capabilities the source used, or it refuses the stream at
    // its configuration record: take them from the names in the input's first bytes, so that
    // mutated seeds of every kind get past that check.
    let head = bytes.prefix(4096)
    let capabilities = ["xbzrle", "compress"].filter { head.firstRange(of: Array($0.utf8)) != nil }
    // A stream from a machine with a disk names its device section; it goes to the destination
    // with a disk, so that the block loader is reached.
    let target = head.firstRange(of: Array("virtio-blk/0".utf8)) != nil ? diskDestination : destination
    let incoming = IncomingMigration(target: target, descriptor: fd,
                                     settings: IncomingSettings(capabilities: capabilities, decompressThreads: 1))
    do {
        _ = try incoming.load { _ in }
        if verbose { print("stream: loaded") }
    } catch {
        if verbose { print("stream: refused: \(error.message)") }
    }
    target.checkDiskUnharmed()
}

func fuzzQMPJSON(_ bytes: [UInt8]) {
    var splitter = JSONStreamSplitter(maximumSize: 64 << 10)
    for piece in splitter.feed(bytes) {
        guard case let .text(text) = piece, let value = try? JSONParser.parse(text) else { continue }
        let again: JSONValue
        do {
            again = try JSONParser.parse(Array(value.serialized.utf8))
        } catch {
            fatalError("tern-fuzz: tern's own serialisation does not parse: \(value.serialized) (\(error))")
        }
        guard sameJSON(again, value) else {
            fatalError("tern-fuzz: a value changed through serialisation: \(value) -> \(again)")
        }
    }
}

/// Equal as JSON: a number is the same number whichever Swift case holds it (4.0 prints as 4,
/// as QEMU prints it, and parses back as an integer).
func sameJSON(_ a: JSONValue, _ b: JSONValue) -> Bool {
    func number(_ value: JSONValue) -> Double? {
        switch value {
        case let .int(v): Double(v)
        case let .uint(v): Double(v)
        case let .double(v): v
        default: nil
        }
    }
    switch (a, b) {
    case let (.array(x), .array(y)):
        return x.count == y.count && zip(x, y).allSatisfy { sameJSON($0, $1) }
    case let (.object(x), .object(y)):
        return x.members.count == y.members.count
            && zip(x.members, y.members).allSatisfy { $0.key == $1.key && sameJSON($0.value, $1.value) }
    default:
        if let x = number(a), let y = number(b) { return x == y }
        return a == b
    }
}

func fuzzReturnPath(_ bytes: [UInt8]) {
    // Framed, as a destination sends them (length and checksum as given).
    let fd = descriptor(holding: bytes)
    defer { close(fd) }
    let reader = MigrationStreamReader(descriptor: fd)
    while (try? ReturnPathMessage.read(from: reader)) != nil {}
    // Bodies with a correct checksum, so every decoder check is reached: u16 type, u16 length.
    var at = 0
    while at + 4 <= bytes.count {
        let type = UInt16(bytes[at]) | UInt16(bytes[at + 1]) << 8
        let length = min(Int(UInt16(bytes[at + 2]) | UInt16(bytes[at + 3]) << 8), bytes.count - at - 4)
        var framed = Array(bytes[at..<(at + 4)])
        framed[2] = UInt8(length & 0xff)
        framed[3] = UInt8(length >> 8)
        let body = Array(bytes[(at + 4)..<(at + 4 + length)])
        framed += body
        let checksum = framed.withUnsafeBytes { cpage_crc32c(0, $0.baseAddress!, $0.count) }
        _ = try? ReturnPathMessage.decode(type: type, body: body, checksum: checksum)
        at += 4 + length
    }
}
