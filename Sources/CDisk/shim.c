#define _GNU_SOURCE
#include "CDisk.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

int cdisk_open(const char *path, int writable, int direct, int dsync) {
    int flags = (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC;
    if (direct) flags |= O_DIRECT;
    if (dsync) flags |= O_DSYNC;
    int fd = open(path, flags);
    return fd < 0 ? -errno : fd;
}

int cdisk_kind(int fd, uint64_t *size) {
    struct stat st;
    if (fstat(fd, &st) < 0) return -errno;
    if (S_ISREG(st.st_mode)) {
        *size = (uint64_t)st.st_size;
        return 1;
    }
    if (S_ISBLK(st.st_mode)) {
        off_t end = lseek(fd, 0, SEEK_END);
        if (end < 0) return -errno;
        *size = (uint64_t)end;
        return 2;
    }
    *size = 0;
    return 0;
}

static int lock_byte(int fd, uint64_t offset, short type, int command) {
    struct flock lock = {0};
    lock.l_type = type;
    lock.l_whence = SEEK_SET;
    lock.l_start = (off_t)offset;
    lock.l_len = 1;
    if (fcntl(fd, command, &lock) < 0) return -errno;
    return command == F_OFD_GETLK ? (lock.l_type != F_UNLCK) : 0;
}

int cdisk_lock_shared(int fd, uint64_t offset, int unlock) {
    return lock_byte(fd, offset, unlock ? F_UNLCK : F_RDLCK, F_OFD_SETLK);
}

int cdisk_lock_test(int fd, uint64_t offset) {
    /* Asking for a write lock reports any lock another description holds on the byte. */
    return lock_byte(fd, offset, F_WRLCK, F_OFD_GETLK);
}

int64_t cdisk_next_data(int fd, uint64_t offset, uint64_t size) {
    off_t found = lseek(fd, (off_t)offset, SEEK_DATA);
    if (found < 0) return errno == ENXIO ? (int64_t)size : -errno;
    return found;
}

int64_t cdisk_next_hole(int fd, uint64_t offset, uint64_t size) {
    off_t found = lseek(fd, (off_t)offset, SEEK_HOLE);
    if (found < 0) return errno == ENXIO ? (int64_t)size : -errno;
    return found;
}

int cdisk_punch_hole(int fd, uint64_t offset, uint64_t length) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length) < 0 ? -errno : 0;
}

int cdisk_flush(int fd) {
    return fdatasync(fd) < 0 ? -errno : 0;
}
