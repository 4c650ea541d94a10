/// The tern migration stream (docs/migration-stream.md has the full description).
///
/// Version 2, written by every tern since the live-section engine:
/// ```
/// header   "TERNMIGR" (8 bytes)  u32 version (2)
/// records  u8 type, u8 flags, u16 section, u32 body length, body, [u32 CRC32C]
///   flags bit 0: required (a reader that does not know the type must refuse the stream)
///   flags bit 1: a CRC32C of the 8-byte record header and the body follows the body
/// ```
/// Version 1 (read only, for VMs saved by older terns) is `StreamV1Loader`'s.
/// Integers are little-endian. Offsets are byte offsets into guest RAM as one block (the
/// mapping behind all memory slots), always page-aligned.
public enum MigrationStreamFormat {
    public static let magic = Array("TERNMIGR".utf8)
    /// The version this tern writes.
    public static let version: UInt32 = 2
    /// The versions this tern reads.
    public static let readableVersions: ClosedRange<UInt32> = 1...2
    public static let pageSize: UInt64 = 4096

    /// Version 1's record types (one byte, then a body whose layout depends on the type).
    public enum RecordType: UInt8, Sendable {
        case ramLayout = 0x01
        case ramPages = 0x02
        case ramZero = 0x03
        case passEnd = 0x04
        case device = 0x05
        case sourceStopped = 0x06
        case end = 0x7e
    }

    /// Version 1's bounds.
    public static let maximumPagesPerRecord: UInt32 = 1 << 18 // 1 GiB of pages
    public static let maximumDeviceNameLength = 64
    public static let maximumDevicePayload: UInt32 = 1 << 20
    public static let maximumDeviceSections = 1024
    /// All device-state bytes a loader holds before it applies them.
    public static let maximumDeviceStateBytes = 16 << 20
}

/// Version 2's record types. A reader skips an unknown type unless the record is flagged
/// required, and then refuses the stream naming the type.
public enum StreamRecordType: UInt8, Sendable, CaseIterable {
    /// What the destination must match: RAM, vCPUs, device sections, capabilities, encodings,
    /// the live sections and their ids. Required, first.
    case configuration = 0x01
    /// A live section's data; the section id in the record header says whose.
    case sectionData = 0x02
    /// The source synced its dirty log (u32 pass number). Optional.
    case passEnd = 0x03
    /// Asks for a return-path PONG with the same u32. Optional.
    case ping = 0x04
    /// u64 wall-clock ns when the source stopped its vCPUs. Optional.
    case sourceStopped = 0x05
    /// Postcopy: pages the destination must drop because the guest wrote them after they were
    /// sent: u32 count, count × (u64 offset, u64 length), page-aligned. Required.
    case discard = 0x06
    /// Postcopy: the device state is complete; start the vCPUs and fetch missing pages on
    /// demand. u64 pages the destination now lacks (the discards' total), as a check. Required.
    case postcopyRun = 0x07
    /// The first record of a connection that resumes a paused postcopy, instead of the
    /// configuration: u64 RAM size, u32 page size. Required.
    case resume = 0x08
    /// Multifd: u32 channel count, u64 session id; right after the configuration. The
    /// destination accepts that many channel connections (each naming the session) before it
    /// reads on. Required.
    case multifdSetup = 0x09
    /// Multifd: u32 sync number. On the main stream and on every channel after a pass's pages:
    /// the destination lets no stream past it until all have reached it. Required.
    case multifdSync = 0x0a
    /// u64 number of records before this one, as a check. Required, last.
    case end = 0x7e

    public var name: String {
        switch self {
        case .configuration: "CONFIGURATION"
        case .sectionData: "SECTION_DATA"
        case .passEnd: "PASS_END"
        case .ping: "PING"
        case .sourceStopped: "SOURCE_STOPPED"
        case .discard: "DISCARD"
        case .postcopyRun: "POSTCOPY_RUN"
        case .resume: "RESUME"
        case .multifdSetup: "MULTIFD_SETUP"
        case .multifdSync: "MULTIFD_SYNC"
        case .end: "END"
        }
    }
}

/// The framing of version 2 records.
public enum StreamRecordFraming {
    public static let headerSize = 8
    public static let requiredFlag: UInt8 = 1 << 0
    public static let checksumFlag: UInt8 = 1 << 1
    public static let knownFlags: UInt8 = requiredFlag | checksumFlag
    /// The largest body a reader accepts (a compressed batch or a raw run stays well below).
    public static let maximumBodyLength = 4 << 20
    /// Section id of records that belong to no section.
    public static let noSection: UInt16 = 0xffff
}

/// How a run of pages goes on the wire inside a RAM section record: the first byte of the
/// record body. The RAM section picks one per page; the loader dispatches on it.
public enum PageEncoding: UInt8, Sendable, CaseIterable {
    /// u64 offset, u32 count: pages that read as zero (QEMU's `duplicate`).
    case zero = 0x01
    /// u64 offset, u32 count, count × 4096 bytes.
    case raw = 0x02
    /// u16 count, count × (u64 offset, u16 length), then the encodings: XBZRLE deltas against
    /// what the destination holds (QEMU's docs/xbzrle.txt format).
    case xbzrle = 0x03
    /// u16 count, count × (u64 offset, u32 length), then zlib streams of one page each.
    case zlib = 0x04
    /// The same layout with zstd frames.
    case zstd = 0x05

    public var name: String {
        switch self {
        case .zero: "zero"
        case .raw: "raw"
        case .xbzrle: "xbzrle"
        case .zlib: "zlib"
        case .zstd: "zstd"
        }
    }
}
