/// The tern migration stream, version 1 (docs/migration-stream.md has the full description).
///
/// ```
/// header   "TERNMIGR" (8 bytes)  u32 version
/// records  u8 type, then a body that depends on the type:
///   0x01 RAM_LAYOUT       u64 RAM size, u32 page size
///   0x02 RAM_PAGES        u64 offset, u32 count, count × 4096 bytes of page data
///   0x03 RAM_ZERO         u64 offset, u32 count             (pages that read as zero)
///   0x04 PASS_END         u32 pass number                   (a dirty-log sync happened)
///   0x05 DEVICE           u16 name length, name, u32 version, u32 length, payload
///   0x06 SOURCE_STOPPED   u64 wall-clock nanoseconds when the source's vCPUs stopped
///   0x7e END              u64 pages sent in all (data + zero), as a check
/// ```
/// Integers are little-endian. Offsets are byte offsets into guest RAM as one block (the
/// mapping behind all memory slots), always page-aligned.
public enum MigrationStreamFormat {
    public static let magic = Array("TERNMIGR".utf8)
    public static let version: UInt32 = 1
    public static let pageSize: UInt64 = 4096

    public enum RecordType: UInt8, Sendable {
        case ramLayout = 0x01
        case ramPages = 0x02
        case ramZero = 0x03
        case passEnd = 0x04
        case device = 0x05
        case sourceStopped = 0x06
        case end = 0x7e
    }

    /// Bounds the loader enforces before using a value.
    public static let maximumPagesPerRecord: UInt32 = 1 << 18 // 1 GiB of pages
    public static let maximumDeviceNameLength = 64
    public static let maximumDevicePayload: UInt32 = 1 << 20
    public static let maximumDeviceSections = 1024
}
