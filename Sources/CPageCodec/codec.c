#include "CPageCodec.h"

#include <pthread.h>
#include <string.h>

// ---- CRC32C ---------------------------------------------------------------------------------

static uint32_t crc32c_table[8][256];
static pthread_once_t crc32c_table_once = PTHREAD_ONCE_INIT;

static void crc32c_fill_table(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t crc = n;
        for (int k = 0; k < 8; k++) crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1)));
        crc32c_table[0][n] = crc;
    }
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t crc = crc32c_table[0][n];
        for (int k = 1; k < 8; k++) {
            crc = crc32c_table[0][crc & 0xff] ^ (crc >> 8);
            crc32c_table[k][n] = crc;
        }
    }
}

static void crc32c_build_table(void) { pthread_once(&crc32c_table_once, crc32c_fill_table); }

static uint32_t crc32c_software(uint32_t crc, const uint8_t *p, size_t length) {
    crc32c_build_table();
    while (length >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        word ^= crc;
        crc = crc32c_table[7][word & 0xff] ^ crc32c_table[6][(word >> 8) & 0xff] ^
              crc32c_table[5][(word >> 16) & 0xff] ^ crc32c_table[4][(word >> 24) & 0xff] ^
              crc32c_table[3][(word >> 32) & 0xff] ^ crc32c_table[2][(word >> 40) & 0xff] ^
              crc32c_table[1][(word >> 48) & 0xff] ^ crc32c_table[0][word >> 56];
        p += 8;
        length -= 8;
    }
    while (length--) crc = crc32c_table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return crc;
}

#if defined(__x86_64__)
// Three independent crc32 chains hide the instruction's 3-cycle latency (one chain runs at a
// third of its throughput). The lanes are joined by shifting a lane's CRC over the bytes of
// the lanes after it: the CRC register is linear over zero bytes, so a shift by a fixed
// length is four table look-ups (one per byte of the register), with tables built once.
#define CRC_LONG 8192
#define CRC_SHORT 256

static uint32_t crc_shift_long[4][256];
static uint32_t crc_shift_short[4][256];
static pthread_once_t crc_shift_once = PTHREAD_ONCE_INIT;

// The raw register (no inversions) advanced over `count` zero bytes.
static uint32_t crc32c_over_zeros(uint32_t crc, size_t count) {
    while (count--) crc = crc32c_table[0][crc & 0xff] ^ (crc >> 8);
    return crc;
}

// Built from the 32 one-bit registers (linearity), so building costs a quarter of a million
// byte steps, well under a millisecond, on the first use.
static void build_shift_table(uint32_t table[4][256], size_t count) {
    uint32_t bit[32];
    for (int i = 0; i < 32; i++) bit[i] = crc32c_over_zeros(1u << i, count);
    for (int k = 0; k < 4; k++) {
        for (uint32_t b = 0; b < 256; b++) {
            uint32_t value = 0;
            for (int i = 0; i < 8; i++) if (b & (1u << i)) value ^= bit[8 * k + i];
            table[k][b] = value;
        }
    }
}

static void crc32c_build_shift_tables(void) {
    crc32c_build_table();
    build_shift_table(crc_shift_long, CRC_LONG);
    build_shift_table(crc_shift_short, CRC_SHORT);
}

static inline uint32_t crc32c_shift(uint32_t table[4][256], uint32_t crc) {
    return table[0][crc & 0xff] ^ table[1][(crc >> 8) & 0xff] ^ table[2][(crc >> 16) & 0xff] ^ table[3][crc >> 24];
}

__attribute__((target("sse4.2")))
static uint64_t crc32c_lanes(uint64_t crc0, const uint8_t **pp, size_t *lengthp, size_t block, uint32_t table[4][256]) {
    const uint8_t *p = *pp;
    size_t length = *lengthp;
    while (length >= 3 * block) {
        uint64_t crc1 = 0, crc2 = 0;
        const uint8_t *end = p + block;
        do {
            uint64_t a, b, c;
            memcpy(&a, p, 8);
            memcpy(&b, p + block, 8);
            memcpy(&c, p + 2 * block, 8);
            crc0 = __builtin_ia32_crc32di(crc0, a);
            crc1 = __builtin_ia32_crc32di(crc1, b);
            crc2 = __builtin_ia32_crc32di(crc2, c);
            p += 8;
        } while (p < end);
        crc0 = crc32c_shift(table, (uint32_t)crc0) ^ crc1;
        crc0 = crc32c_shift(table, (uint32_t)crc0) ^ crc2;
        p += 2 * block;
        length -= 3 * block;
    }
    *pp = p;
    *lengthp = length;
    return crc0;
}

__attribute__((target("sse4.2")))
static uint32_t crc32c_hardware(uint32_t crc32, const uint8_t *p, size_t length) {
    pthread_once(&crc_shift_once, crc32c_build_shift_tables);
    uint64_t crc = crc32;
    crc = crc32c_lanes(crc, &p, &length, CRC_LONG, crc_shift_long);
    crc = crc32c_lanes(crc, &p, &length, CRC_SHORT, crc_shift_short);
    while (length >= 8) {
        uint64_t a;
        memcpy(&a, p, 8);
        crc = __builtin_ia32_crc32di(crc, a);
        p += 8;
        length -= 8;
    }
    uint32_t small = (uint32_t)crc;
    while (length--) small = __builtin_ia32_crc32qi(small, *p++);
    return small;
}

static int hardware_state = -1;

static int has_sse42(void) {
    if (hardware_state < 0) {
        __builtin_cpu_init();
        hardware_state = __builtin_cpu_supports("sse4.2") ? 1 : 0;
    }
    return hardware_state;
}
#endif

uint32_t cpage_crc32c(uint32_t crc, const void *data, size_t length) {
    const uint8_t *p = data;
    crc = ~crc;
#if defined(__x86_64__)
    if (has_sse42()) return ~crc32c_hardware(crc, p, length);
#endif
    return ~crc32c_software(crc, p, length);
}

// ---- XBZRLE ---------------------------------------------------------------------------------

static int put_uleb128(uint8_t *out, size_t capacity, size_t *position, size_t value) {
    do {
        if (*position >= capacity) return -1;
        uint8_t byte = value & 0x7f;
        value >>= 7;
        if (value) byte |= 0x80;
        out[(*position)++] = byte;
    } while (value);
    return 0;
}

long cpage_xbzrle_encode(const uint8_t *old, const uint8_t *page, size_t length, uint8_t *out, size_t capacity) {
    size_t i = 0, position = 0;
    while (i < length) {
        // A run of unchanged bytes, compared a word at a time where aligned runs allow.
        size_t start = i;
        while (i + 8 <= length) {
            uint64_t a, b;
            memcpy(&a, old + i, 8);
            memcpy(&b, page + i, 8);
            if (a != b) break;
            i += 8;
        }
        while (i < length && old[i] == page[i]) i++;
        if (i == length) break; // the trailing unchanged run is not encoded
        size_t unchanged = i - start;
        // A run of changed bytes. Short unchanged gaps (under 2 bytes) inside it cost more to
        // encode as a pair than to carry, so they join the changed run.
        start = i;
        while (i < length) {
            if (old[i] != page[i]) { i++; continue; }
            if (i + 1 < length && old[i + 1] != page[i + 1]) { i++; continue; }
            break;
        }
        size_t changed = i - start;
        if (put_uleb128(out, capacity, &position, unchanged) < 0) return -1;
        if (put_uleb128(out, capacity, &position, changed) < 0) return -1;
        if (capacity - position < changed) return -1;
        memcpy(out + position, page + start, changed);
        position += changed;
    }
    return (long)position;
}

static int get_uleb128(const uint8_t *in, size_t length, size_t *position, size_t *value) {
    size_t result = 0;
    for (int shift = 0; shift < 28; shift += 7) { // 4 bytes cover any run within a page
        if (*position >= length) return -1;
        uint8_t byte = in[(*position)++];
        result |= (size_t)(byte & 0x7f) << shift;
        if (!(byte & 0x80)) { *value = result; return 0; }
    }
    return -1;
}

// Walks the encoding; with `page` NULL it only checks it.
static int xbzrle_walk(const uint8_t *encoded, size_t encoded_length, uint8_t *page, size_t length) {
    size_t in = 0, at = 0;
    while (in < encoded_length) {
        size_t unchanged, changed;
        if (get_uleb128(encoded, encoded_length, &in, &unchanged) < 0) return -1;
        if (get_uleb128(encoded, encoded_length, &in, &changed) < 0) return -1;
        if (changed == 0) return -1;
        if (unchanged > length - at) return -1;
        at += unchanged;
        if (changed > length - at || changed > encoded_length - in) return -1;
        if (page) memcpy(page + at, encoded + in, changed);
        at += changed;
        in += changed;
    }
    return 0;
}

int cpage_xbzrle_decode(const uint8_t *encoded, size_t encoded_length, uint8_t *page, size_t length) {
    if (xbzrle_walk(encoded, encoded_length, NULL, length) < 0) return -1;
    return xbzrle_walk(encoded, encoded_length, page, length);
}
