#ifndef CDISK_H
#define CDISK_H

#include <stdint.h>

/* Disk image files: the calls Swift cannot make directly (variadic fcntl and open, Linux-only
 * lseek and fallocate flags). Every function returns a negative errno on failure. */

/* open(2) of an image: read-write or read-only, optionally O_DIRECT and O_DSYNC, always
 * close-on-exec. Returns the descriptor. */
int cdisk_open(const char *path, int writable, int direct, int dsync);

/* fstat: 1 for a regular file, 2 for a block device, 0 for anything else (a directory...);
 * the size in bytes goes to *size. */
int cdisk_kind(int fd, uint64_t *size);

/* Open file description locks on single bytes, as QEMU's raw driver takes them (bytes 100+
 * for the permissions a user holds, 200+ for those it refuses to share).
 * cdisk_lock_shared: takes a shared (read) lock on byte `offset`, or releases it with unlock=1.
 * cdisk_lock_test: 1 if another open file description holds any lock on that byte, else 0. */
int cdisk_lock_shared(int fd, uint64_t offset, int unlock);
int cdisk_lock_test(int fd, uint64_t offset);

/* lseek(SEEK_DATA): the first offset at or after `offset` that holds data, or the file's size
 * when only a hole follows (ENXIO). -EINVAL if the file system cannot tell. */
int64_t cdisk_next_data(int fd, uint64_t offset, uint64_t size);
/* lseek(SEEK_HOLE): the first hole at or after `offset` (the size counts as one). */
int64_t cdisk_next_hole(int fd, uint64_t offset, uint64_t size);

/* fallocate(PUNCH_HOLE | KEEP_SIZE): the range reads as zeros afterwards. */
int cdisk_punch_hole(int fd, uint64_t offset, uint64_t length);

/* fdatasync. */
int cdisk_flush(int fd);

#endif
