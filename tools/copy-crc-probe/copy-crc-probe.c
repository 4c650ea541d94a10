/* Would a fused copy-and-CRC32C pay on the source? tern's writer copies each guest page into
 * its 1 MiB stream buffer, then takes the CRC32C of the whole record (the buffer is hot by
 * then). This compares that with one pass that copies and checksums each 8-byte word as it
 * goes (3 lanes, as tern's CRC does, combined with the same shift tables), over 512 MiB of
 * pages copied 256 KiB records at a time. Issue 11, docs/performance.md.
 *
 * Build and run: cc -O2 -I Sources/CPageCodec/include -o /tmp/ccp tools/copy-crc-probe/copy-crc-probe.c && /tmp/ccp
 */
#include "../../Sources/CPageCodec/codec.c"
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

__attribute__((target("sse4.2")))
static uint64_t copy_crc32c_lanes(uint64_t crc0, const uint8_t **pp, uint8_t **dp, size_t *lengthp, size_t block,
                                  uint32_t table[4][256]) {
    const uint8_t *p = *pp;
    uint8_t *d = *dp;
    size_t length = *lengthp;
    while (length >= 3 * block) {
        uint64_t crc1 = 0, crc2 = 0;
        const uint8_t *end = p + block;
        do {
            uint64_t a, b, c;
            memcpy(&a, p, 8);
            memcpy(&b, p + block, 8);
            memcpy(&c, p + 2 * block, 8);
            memcpy(d, &a, 8);
            memcpy(d + block, &b, 8);
            memcpy(d + 2 * block, &c, 8);
            crc0 = __builtin_ia32_crc32di(crc0, a);
            crc1 = __builtin_ia32_crc32di(crc1, b);
            crc2 = __builtin_ia32_crc32di(crc2, c);
            p += 8;
            d += 8;
        } while (p < end);
        crc0 = crc32c_shift(table, (uint32_t)crc0) ^ crc1;
        crc0 = crc32c_shift(table, (uint32_t)crc0) ^ crc2;
        p += 2 * block;
        d += 2 * block;
        length -= 3 * block;
    }
    *pp = p;
    *dp = d;
    *lengthp = length;
    return crc0;
}

__attribute__((target("sse4.2")))
static uint32_t copy_crc32c(uint32_t crc32, uint8_t *dst, const uint8_t *src, size_t length) {
    pthread_once(&crc_shift_once, crc32c_build_shift_tables);
    uint64_t crc = ~crc32;
    crc = copy_crc32c_lanes(crc, &src, &dst, &length, CRC_LONG, crc_shift_long);
    crc = copy_crc32c_lanes(crc, &src, &dst, &length, CRC_SHORT, crc_shift_short);
    while (length >= 8) {
        uint64_t a;
        memcpy(&a, src, 8);
        memcpy(dst, &a, 8);
        crc = __builtin_ia32_crc32di(crc, a);
        src += 8; dst += 8; length -= 8;
    }
    uint32_t small = (uint32_t)crc;
    while (length--) { *dst = *src; small = __builtin_ia32_crc32qi(small, *src++); dst++; }
    return ~small;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(void) {
    const size_t memory = 512u << 20, record = 256u << 10, page = 4096;
    uint8_t *guest = aligned_alloc(4096, memory);
    uint8_t *buffer = aligned_alloc(4096, 1u << 20);
    for (size_t i = 0; i < memory / 8; i++) ((uint64_t *)guest)[i] = i * 0x9E3779B97F4A7C15ull;
    memset(buffer, 0, 1u << 20);
    uint32_t check = 0;
    for (int round = 0; round < 5; round++) {
        double t0 = now();
        for (size_t r = 0; r < memory; r += record) {
            uint8_t *d = buffer + (r % (1u << 20));
            for (size_t o = 0; o < record; o += page) memcpy(d + o, guest + r + o, page);
            check ^= cpage_crc32c(0, d, record);
        }
        double separate = now() - t0;
        t0 = now();
        uint32_t fused_check = 0;
        for (size_t r = 0; r < memory; r += record) {
            uint8_t *d = buffer + (r % (1u << 20));
            uint32_t crc = 0;
            for (size_t o = 0; o < record; o += page) crc = copy_crc32c(crc, d + o, guest + r + o, page);
            fused_check ^= crc;
        }
        double fused = now() - t0;
        uint32_t again = 0;
        for (size_t r = 0; r < memory; r += record) again ^= cpage_crc32c(0, guest + r, record);
        printf("round %d: copy then CRC %.1f ms (%.2f GiB/s), fused per page %.1f ms (%.2f GiB/s), fused/separate %.2f%s\n",
               round + 1, separate * 1e3, 0.5 / separate, fused * 1e3, 0.5 / fused, fused / separate,
               fused_check == again ? "" : "  CRC MISMATCH");
    }
    return (int)(check & 0);
}
