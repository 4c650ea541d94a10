import CCrypto
import Machine

/// SHA-256 over all guest RAM, region by region in guest-physical order, for the
/// `x-query-memory-digest` extension: two machines whose digests match hold the same memory.
public enum MemoryDigest {
    public static func sha256(of memory: GuestMemory) -> String {
        guard let context = EVP_MD_CTX_new() else { return "" }
        defer { EVP_MD_CTX_free(context) }
        EVP_DigestInit_ex(context, EVP_sha256(), nil)
        let chunk = 64 << 20
        for region in memory.layout.regions {
            var offset: UInt64 = 0
            while offset < region.size {
                let length = Int(min(UInt64(chunk), region.size - offset))
                EVP_DigestUpdate(context, memory.hostBase + Int(region.hostOffset + offset), length)
                offset += UInt64(length)
            }
        }
        var digest = [UInt8](repeating: 0, count: 32)
        var length: UInt32 = 0
        EVP_DigestFinal_ex(context, &digest, &length)
        return digest.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined()
    }
}
