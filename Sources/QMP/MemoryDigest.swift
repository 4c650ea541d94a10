import CCrypto
import Machine

/// SHA-256 over all guest RAM, in the order of the RAM mapping (guest-physical order), for the
/// `x-query-memory-digest` extension: two machines whose digests match hold the same memory.
public enum MemoryDigest {
    public static func sha256(of memory: GuestMemory) -> String {
        guard let context = EVP_MD_CTX_new() else { return "" }
        defer { EVP_MD_CTX_free(context) }
        EVP_DigestInit_ex(context, EVP_sha256(), nil)
        // Holes (pages never written) hash as zeroes without being read, so a digest does not
        // make a 16 GiB guest resident.
        let zeroes = [UInt8](repeating: 0, count: 1 << 20)
        func hashZeroes(_ count: UInt64) {
            var left = count
            while left > 0 {
                let length = Int(min(left, UInt64(zeroes.count)))
                zeroes.withUnsafeBytes { _ = EVP_DigestUpdate(context, $0.baseAddress, length) }
                left -= UInt64(length)
            }
        }
        var position: UInt64 = 0
        for extent in memory.dataExtents(offset: 0, length: memory.size) {
            hashZeroes(extent.offset - position)
            EVP_DigestUpdate(context, memory.hostBase + Int(extent.offset), Int(extent.length))
            position = extent.offset + extent.length
        }
        hashZeroes(memory.size - position)
        var digest = [UInt8](repeating: 0, count: 32)
        var length: UInt32 = 0
        EVP_DigestFinal_ex(context, &digest, &length)
        return digest.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined()
    }
}
