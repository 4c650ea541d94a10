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

/// Makes `length` bytes at `pointer` (page-aligned, in a shared mapping) present and writable
/// now rather than at the first touch (MADV_POPULATE_WRITE; on a kernel before 5.14, a write
/// of zero to each page, which only ever runs on fresh, all-zero memory). 0 or -errno.
int cguest_populate(void *pointer, size_t length, size_t page_size);

/// Whether `length` bytes (a multiple of 8) at `pointer` are all zero.
int cguest_is_zero(const void *pointer, size_t length);

/// Writes zeroes only where the bytes are not already zero, one page at a time, so that pages
/// that are zero are not dirtied (or allocated). `length` is a multiple of `page_size`.
void cguest_zero_pages(void *pointer, size_t length, size_t page_size);

/// userfaultfd(O_CLOEXEC | O_NONBLOCK) with the API handshake, asking for missing-page faults
/// on shared memory. Falls back to /dev/userfaultfd where the syscall is restricted. Returns
/// the descriptor or -errno (-ENOTSUP when the kernel lacks shared-memory missing faults).
int cguest_uffd_open(void);

/// Registers [address, address + length) for missing-page faults. Returns 0 or -errno;
/// -ENOTSUP if the range cannot take UFFDIO_COPY and UFFDIO_ZEROPAGE.
int cguest_uffd_register(int uffd, void *address, uint64_t length);

/// Unregisters the range; threads still waiting in it are woken and retry.
int cguest_uffd_unregister(int uffd, void *address, uint64_t length);

/// Installs `length` bytes from `source` at `address` atomically and wakes its waiters.
/// Returns 0, -EEXIST when a page of the range is already present, or -errno.
int cguest_uffd_copy(int uffd, void *address, const void *source, uint64_t length);

/// Installs zero pages at `address` and wakes its waiters; 0, -EEXIST or -errno.
int cguest_uffd_zeropage(int uffd, void *address, uint64_t length);

/// Wakes threads waiting on a range that someone else already filled.
int cguest_uffd_wake(int uffd, void *address, uint64_t length);

/// Reads up to `capacity` fault addresses (page faults only; other events are skipped) into
/// `addresses`. Returns the count, 0 when none is pending, or -errno.
int cguest_uffd_read_faults(int uffd, uint64_t *addresses, int capacity);

/// poll() on the fault descriptor and a wake-up descriptor; returns 1 if faults are pending,
/// 2 if the wake-up descriptor is readable, 0 on timeout, -errno on error.
int cguest_uffd_poll(int uffd, int wake, int timeout_ms);

#endif
