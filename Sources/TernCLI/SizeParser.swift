/// Parses sizes written as QEMU writes them: a number with an optional K, M, G or T suffix
/// (powers of 1024, either case, an optional trailing B or iB).
public enum SizeParser {
    /// Parses `text`; a bare number is taken in `defaultUnit` bytes (QEMU's `-m 512` is MiB).
    public static func parse(_ text: String, defaultUnit: UInt64 = 1) -> UInt64? {
        var digits = Substring(text)
        var unit = defaultUnit
        for suffix in ["iB", "B", "b"] where digits.hasSuffix(suffix) && digits.count > suffix.count {
            digits = digits.dropLast(suffix.count)
            break
        }
        if let last = digits.last, last.isLetter {
            switch last.uppercased() {
            case "K": unit = 1 << 10
            case "M": unit = 1 << 20
            case "G": unit = 1 << 30
            case "T": unit = 1 << 40
            default: return nil
            }
            digits = digits.dropLast()
        }
        guard !digits.isEmpty, digits.allSatisfy(\.isASCII), let value = UInt64(digits) else { return nil }
        let (product, overflow) = value.multipliedReportingOverflow(by: unit)
        return overflow ? nil : product
    }
}
