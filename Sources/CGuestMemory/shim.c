#define _GNU_SOURCE
#include "CGuestMemory.h"
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

int cguest_memfd_create(const char *name) {
    int fd = memfd_create(name, MFD_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

int64_t cguest_seek_data(int fd, int64_t offset) {
    return lseek(fd, offset, SEEK_DATA);
}

int64_t cguest_seek_hole(int fd, int64_t offset) {
    return lseek(fd, offset, SEEK_HOLE);
}

int cguest_punch_hole(int fd, int64_t offset, int64_t length) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) < 0 ? -errno : 0;
}

int cguest_is_zero(const void *pointer, size_t length) {
    const uint64_t *words = pointer;
    size_t count = length / 8;
    // OR eight words at a time: the compiler turns this into wide vector loads.
    for (size_t i = 0; i + 8 <= count; i += 8) {
        uint64_t any = words[i] | words[i + 1] | words[i + 2] | words[i + 3]
                     | words[i + 4] | words[i + 5] | words[i + 6] | words[i + 7];
        if (any) return 0;
    }
    for (size_t i = count & ~(size_t)7; i < count; i++) {
        if (words[i]) return 0;
    }
    return 1;
}

void cguest_zero_pages(void *pointer, size_t length, size_t page_size) {
    char *bytes = pointer;
    for (size_t offset = 0; offset < length; offset += page_size) {
        if (!cguest_is_zero(bytes + offset, page_size)) memset(bytes + offset, 0, page_size);
    }
}
