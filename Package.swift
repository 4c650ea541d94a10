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
        // liblzma, to unpack a bzImage's xz payload on the host (see ElfKernel.swift).
        .systemLibrary(name: "CLZMA", pkgConfig: "liblzma", providers: [.apt(["liblzma-dev"])]),
        // Layer 2: the machine: guest memory, boot, vCPU threads, devices, run state.
        .target(name: "Machine", dependencies: ["KVM", "CKVM", "CLZMA"]),
        // Layer 3: the command line (option parsing, help, subcommands) as a library so tests reach it.
        .target(name: "TernCLI", dependencies: ["Machine", "KVM"]),
        .executableTarget(name: "tern", dependencies: ["TernCLI"]),
        .testTarget(name: "TernUnitTests", dependencies: ["TernCLI", "Machine", "KVM", "CKVM"]),
        .testTarget(name: "TernIntegrationTests", dependencies: ["tern", "Machine", "KVM"]),
    ],
    swiftLanguageModes: [.v6]
)
