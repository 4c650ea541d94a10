// CGuestMemory: the memfd calls Glibc does not export to Swift (they need _GNU_SOURCE), and the
// page scans on migration's hot path, compiled with optimisation even in debug builds so a
// debug tern still migrates at memory speed.
#ifndef CGUESTMEMORY_H
#define CGUESTMEMORY_H

#include <stddef.h>
#include <stdint.h>

/// memfd_create(name, MFD_CLOEXEC). Returns the descriptor or -errno.
int cguest_memfd_create(const char *name);

/// lseek(fd, offset, SEEK_DATA): the next data byte at or after offset, or -1 at a final hole.
int64_t cguest_seek_data(int fd, int64_t offset);

/// lseek(fd, offset, SEEK_HOLE): the next hole at or after offset (the file end counts).
int64_t cguest_seek_hole(int fd, int64_t offset);

/// fallocate(PUNCH_HOLE | KEEP_SIZE): the range reads as zero and its memory is freed.
/// Returns 0 or -errno.
int cguest_punch_hole(int fd, int64_t offset, int64_t length);

/// Whether `length` bytes (a multiple of 8) at `pointer` are all zero.
int cguest_is_zero(const void *pointer, size_t length);

/// Writes zeroes only where the bytes are not already zero, one page at a time, so that pages
/// that are zero are not dirtied (or allocated). `length` is a multiple of `page_size`.
void cguest_zero_pages(void *pointer, size_t length, size_t page_size);

#endif
