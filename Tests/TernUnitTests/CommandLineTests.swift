import Machine
import Testing
@testable import TernCLI

@Suite("Command line")
struct CommandLineTests {
    static let mebibyte: UInt64 = 1 << 20
    static let sizes: [(String, UInt64)] = [
        ("512", 512 * mebibyte), ("512M", 512 * mebibyte), ("2G", 2048 * mebibyte), ("2g", 2048 * mebibyte),
        ("64MiB", 64 * mebibyte), ("65536K", 64 * mebibyte), ("1T", 1024 * 1024 * mebibyte),
    ]

    @Test("sizes in QEMU's spellings", arguments: sizes)
    func memorySizes(text: String, expected: UInt64) throws {
        #expect(try RunOptions(arguments: ["-m", text]).configuration.memorySize == expected)
    }

    @Test("bad sizes are refused with the option named", arguments: ["abc", "12Q", "", "-5", "0", "1K", "99999999999999999999G"])
    func badMemorySizes(text: String) {
        #expect {
            try RunOptions(arguments: ["-m", text])
        } throws: { error in
            (error as? CommandLineError)?.message.hasPrefix("tern run: -m ") == true
        }
    }

    @Test("a bare number is MiB for -m, bytes for other sizes")
    func defaultUnits() {
        #expect(SizeParser.parse("3") == 3)
        #expect(SizeParser.parse("3", defaultUnit: 1 << 20) == 3 << 20)
        #expect(SizeParser.parse("1.5G") == nil)
    }

    @Test("defaults: built-in guest, 512 MiB, one vCPU, serial on stdio")
    func defaults() throws {
        let options = try RunOptions(arguments: [])
        #expect(options.configuration.memorySize == 512 << 20)
        #expect(options.configuration.cpuCount == 1)
        #expect(options.configuration.serial == .stdio)
        #expect(options.configuration.boot == .builtinGuest(arguments: ""))
        #expect(!options.configuration.startPaused)
    }

    @Test("every accepted QEMU option parses")
    func qemuSpellings() throws {
        let options = try RunOptions(arguments: [
            "-m", "1G", "-smp", "2", "-kernel", "/k", "-initrd", "/i", "-append", "quiet", "-serial", "file:/tmp/x",
            "-S", "-name", "vm1", "-nographic", "-display", "none", "-nodefaults", "-no-user-config", "-enable-kvm",
            "-machine", "accel=kvm", "-cpu", "host", "-no-reboot", "--accel", "kvm", "-mem-prealloc",
        ])
        let configuration = options.configuration
        #expect(configuration.memorySize == 1 << 30)
        #expect(configuration.cpuCount == 2)
        #expect(configuration.boot == .linux(kernelPath: "/k", initrdPath: "/i", arguments: "quiet"))
        #expect(configuration.serial == .file(path: "/tmp/x"))
        #expect(configuration.startPaused)
        #expect(configuration.name == "vm1")
        #expect(!configuration.exposeInvariantTSC)
        #expect(configuration.preallocateMemory)
        #expect(try !RunOptions(arguments: []).configuration.preallocateMemory)
    }

    @Test("option=value and double-dash forms")
    func inlineValues() throws {
        let options = try RunOptions(arguments: ["--m=2G", "-smp=cpus=4,sockets=1", "-cpu", "host,+invtsc"])
        #expect(options.configuration.memorySize == 2 << 30)
        #expect(options.configuration.cpuCount == 4)
        #expect(options.configuration.exposeInvariantTSC)
    }

    @Test("-nodefaults without -serial leaves COM1 unconnected")
    func noDefaults() throws {
        #expect(try RunOptions(arguments: ["-nodefaults"]).configuration.serial == .none)
        #expect(try RunOptions(arguments: ["-nodefaults", "-serial", "stdio"]).configuration.serial == .stdio)
    }

    @Test("errors name the offending option", arguments: [
        (["-foo"], "unknown option '-foo'"),
        (["-m"], "option '-m' needs a value"),
        (["-smp", "0"], "-smp 0"),
        (["-smp", "two"], "-smp two"),
        (["-serial", "vc"], "-serial vc"),
        (["-machine", "accel=tcg"], "only on KVM"),
        (["-cpu", "qemu64"], "-cpu qemu64"),
        (["-display", "gtk"], "-display gtk"),
        (["-initrd", "/i"], "-initrd needs -kernel"),
        (["stray"], "unexpected argument 'stray'"),
    ])
    func errors(arguments: [String], fragment: String) {
        #expect {
            try RunOptions(arguments: arguments)
        } throws: { error in
            (error as? CommandLineError)?.message.contains(fragment) == true
        }
    }

    @Test("help is shown for -h and --help")
    func help() throws {
        #expect(try RunOptions(arguments: ["--help"]).showHelp)
        #expect(try RunOptions(arguments: ["-h"]).showHelp)
        for option in RunOptions.valued.union(RunOptions.flags) where !["h", "help", "M"].contains(option) {
            #expect(HelpText.run.contains("-\(option)"), "tern run --help does not explain -\(option)")
        }
    }
}
