// CPageCodec: the byte loops of migration's page encodings (CRC32C record checks, XBZRLE
// deltas), in C and compiled with optimisation even in debug builds, because they run over
// every byte a migration sends. Each function bounds every read and write by the lengths it
// is given; the callers in Sources/Migration are the only users.
#ifndef CPAGECODEC_H
#define CPAGECODEC_H

#include <stddef.h>
#include <stdint.h>

/// CRC32C (Castagnoli, reflected, as iSCSI and ext4 use it) of `length` bytes, continuing from
/// `crc` (start with 0). Uses SSE4.2's crc32 instruction where the CPU has it.
uint32_t cpage_crc32c(uint32_t crc, const void *data, size_t length);

/// XBZRLE-encodes `page` (the new contents) against `old` (what the destination holds), both
/// `length` bytes, into `out` of `capacity` bytes. The encoding is a sequence of pairs:
/// ULEB128 length of a run of unchanged bytes, ULEB128 length of a run of changed bytes, then
/// the changed bytes; a trailing unchanged run is left out. Returns the encoded length, 0 when
/// the pages are equal, or -1 when the encoding would not fit in `capacity` (QEMU's overflow).
long cpage_xbzrle_encode(const uint8_t *old, const uint8_t *page, size_t length, uint8_t *out, size_t capacity);

/// Applies an XBZRLE encoding of `encoded_length` bytes to `page` (`length` bytes, holding the
/// old contents), in place. Returns 0, or -1 if the encoding is malformed: a truncated or
/// over-long length, a run past the end of the page, or a zero-length changed run. Nothing is
/// written unless the whole encoding has been checked first.
int cpage_xbzrle_decode(const uint8_t *encoded, size_t encoded_length, uint8_t *page, size_t length);

#endif
