import Foundation

/// Loads a Linux bzImage, its initrd and command line for the 64-bit boot protocol
/// (Documentation/arch/x86/boot.rst, "64-bit Boot Protocol").
public enum LinuxLoader {
    /// A bzImage is tens of MiB; anything near this is not a kernel.
    static let maximumKernelFileSize = 512 << 20
    /// Reads and loads the kernel into `memory`, returning where the boot CPU starts.
    public static func load(kernelPath: String, initrdPath: String?, arguments: String?, cpuCount: Int,
                            into memory: GuestMemory) throws(MachineError) -> BootPlan {
        let kernelBytes: [UInt8]
        do {
            kernelBytes = try readFile(kernelPath, maximumSize: Self.maximumKernelFileSize)
        } catch {
            throw .kernel(.unreadable(path: kernelPath, reason: error.reason))
        }
        let lowMemory = memory.layout.lowMemorySize
        let kernel: LoadedKernelForm
        do {
            kernel = try LoadedKernelForm(bytes: kernelBytes, path: kernelPath)
        } catch {
            throw .kernel(error)
        }
        guard kernel.end <= lowMemory else {
            throw .kernel(.doesNotFit(path: kernelPath,
                reason: "it needs memory up to \(kernel.end >> 20) MiB; give the guest more with -m"))
        }
        do { try kernel.load(into: memory) } catch { throw .memory(error) }
        let kernelEnd = kernel.end

        let commandLine = KernelCommandLine.merge(userArguments: arguments)
        let maximum = min(Int(kernel.commandLineSize), BootAddresses.commandLineLimit - 1)
        guard commandLine.utf8.count <= maximum else {
            throw .commandLineTooLong(length: commandLine.utf8.count, maximum: maximum)
        }

        var params = BootParams()
        params.copySetupHeader(kernel.setupHeader)
        params.setCommandLine(at: BootAddresses.commandLine)
        params.setMemoryMap(E820Map(layout: memory.layout))

        if let initrdPath {
            let initrd: [UInt8]
            do { initrd = try readFile(initrdPath, maximumSize: Int(lowMemory)) } catch {
                throw .initrd(path: initrdPath, reason: error.reason)
            }
            // As high as allowed, page aligned, below both the RAM top and initrd_addr_max.
            let limit = min(lowMemory, UInt64(kernel.initrdAddressMax) + 1)
            let size = UInt64(initrd.count)
            guard size < limit, (limit - size) & ~0xfff >= kernelEnd else {
                throw .initrd(path: initrdPath,
                              reason: "\(size >> 20) MiB does not fit between the kernel and \(limit >> 20) MiB; raise -m")
            }
            let address = GuestAddress((limit - size) & ~0xfff)
            do { try memory.write(initrd, at: address) } catch { throw .memory(error) }
            params.setRamdisk(at: address, size: size)
        }

        do {
            try memory.write(Array(commandLine.utf8) + [0], at: BootAddresses.commandLine)
            try memory.write(params.bytes, at: BootAddresses.bootParams)
            let mpTable = MultiprocessorTable(cpuCount: cpuCount, base: BootAddresses.multiprocessorTable)
            try memory.write(mpTable.bytes, at: BootAddresses.multiprocessorTable)
        } catch {
            throw .memory(error)
        }
        return BootPlan(entry: kernel.entry, bootParams: BootAddresses.bootParams,
                        startsAllCPUs: false, commandLine: commandLine)
    }
}

/// A file that could not be read, with the reason in words.
struct FileReadError: Error {
    let reason: String
}

/// Reads a whole file, with an errno-based reason on failure (Foundation's messages vary).
/// Refuses, before reading anything, a file larger than `maximumSize`.
func readFile(_ path: String, maximumSize: Int) throws(FileReadError) -> [UInt8] {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw FileReadError(reason: String(cString: strerror(errno))) }
    defer { close(fd) }
    var info = stat()
    guard fstat(fd, &info) == 0 else { throw FileReadError(reason: String(cString: strerror(errno))) }
    guard info.st_mode & S_IFMT == S_IFREG else { throw FileReadError(reason: "not a regular file") }
    guard info.st_size <= maximumSize else {
        throw FileReadError(reason: "it is \(info.st_size >> 20) MiB, more than the \(maximumSize >> 20) MiB that can be loaded")
    }
    var bytes = [UInt8](repeating: 0, count: Int(info.st_size))
    var done = 0
    while done < bytes.count {
        let n = bytes.withUnsafeMutableBytes { read(fd, $0.baseAddress! + done, $0.count - done) }
        if n < 0 && errno == EINTR { continue }
        guard n > 0 else { throw FileReadError(reason: n == 0 ? "file shrank while reading" : String(cString: strerror(errno))) }
        done += n
    }
    return bytes
}
