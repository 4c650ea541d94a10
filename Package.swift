// swift-tools-version: 6.0
import PackageDescription

let package = Package(
    name: "tern",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "tern", targets: ["tern"]),
    ],
    targets: [
        // Layer 0: the kernel's headers, request numbers and flexible-array accessors. No logic.
        .target(name: "CKVM"),
        // Layer 1: thin typed Swift over /dev/kvm, the VM fd and vCPU fds. No policy, no threads.
        .target(name: "KVM", dependencies: ["CKVM"]),
        // memfd calls and the page scans of migration's hot path, optimised even in debug builds.
        .target(name: "CGuestMemory", cSettings: [.unsafeFlags(["-O2"])]),
        // liblzma, to unpack a bzImage's xz payload on the host (see ElfKernel.swift).
        .systemLibrary(name: "CLZMA", pkgConfig: "liblzma", providers: [.apt(["liblzma-dev"])]),
        // Layer 2: the machine: guest memory, boot, vCPU threads, devices, run state.
        // Disk image files: open flags, QEMU-compatible byte locks, holes.
        .target(name: "CDisk"),
        .target(name: "Machine", dependencies: ["KVM", "CKVM", "CLZMA", "CGuestMemory", "CProcess", "CDisk"]),
        // Sockets: listen/connect/accept and SCM_RIGHTS descriptor passing, for QMP and migration.
        .target(name: "CSocket"),
        // Process set-up QEMU's command line asks for: -daemonize, -pidfile, inherited sockets, ptys.
        .target(name: "CProcess"),
        // OpenSSL's libcrypto, for SHA-256 of guest memory.
        .systemLibrary(name: "CCrypto", pkgConfig: "libcrypto", providers: [.apt(["libssl-dev"])]),
        // CRC32C and XBZRLE byte loops for the migration stream, optimised even in debug builds.
        .target(name: "CPageCodec", cSettings: [.unsafeFlags(["-O2"])]),
        // zlib and zstd, for the `compress` capability's page compression.
        .systemLibrary(name: "CZlib", pkgConfig: "zlib", providers: [.apt(["zlib1g-dev"])]),
        .systemLibrary(name: "CZstd", pkgConfig: "libzstd", providers: [.apt(["libzstd-dev"])]),
        // OpenSSL's libssl, for TLS on the migration channels (macros wrapped for Swift).
        .target(name: "CTLS", linkerSettings: [.linkedLibrary("ssl"), .linkedLibrary("crypto")]),
        // Layer 3: the migration engine; it sees the machine through memory and saved state.
        .target(name: "Migration", dependencies: ["Machine", "KVM", "CSocket", "CGuestMemory", "CPageCodec", "CZlib", "CZstd", "CTLS"]),
        // Layer 4: QMP, QEMU's monitor protocol, controlling the machine and migrations.
        .target(name: "QMP", dependencies: ["Migration", "Machine", "KVM", "CSocket", "CCrypto", "CProcess"]),
        // Layer 5: the command line (option parsing, help, subcommands) as a library so tests reach it.
        .target(name: "TernCLI", dependencies: ["QMP", "Migration", "Machine", "KVM", "CSocket", "CProcess"]),
        .executableTarget(name: "tern", dependencies: ["TernCLI"]),
        // Micro-benchmarks that need a live VM; run through bench/dirty-sync.
        .executableTarget(name: "tern-bench", dependencies: ["Machine"]),
        .testTarget(name: "TernUnitTests", dependencies: ["TernCLI", "QMP", "Migration", "Machine", "KVM", "CKVM", "CPageCodec", "CZlib", "CZstd"]),
        .testTarget(name: "TernIntegrationTests", dependencies: ["tern", "TernCLI", "QMP", "Migration", "Machine", "KVM"]),
    ],
    swiftLanguageModes: [.v6]
)

// libFuzzer targets (Sources/tern-fuzz), only when scripts/fuzz builds them with
// -sanitize=fuzzer: without libFuzzer the executable cannot link.
if Context.environment["TERN_FUZZ"] != nil {
    package.targets.append(.target(name: "CFuzzDriver"))
    package.targets.append(.executableTarget(
        name: "tern-fuzz", dependencies: ["Migration", "Machine", "QMP", "CGuestMemory", "CPageCodec", "CFuzzDriver"]))
    package.products.append(.executable(name: "tern-fuzz", targets: ["tern-fuzz"]))
}
