#define _GNU_SOURCE
#include "CGuestMemory.h"
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <linux/userfaultfd.h>

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

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

int cguest_populate(void *pointer, size_t length, size_t page_size) {
    if (madvise(pointer, length, MADV_POPULATE_WRITE) == 0) return 0;
    if (errno != EINVAL) return -errno;
    volatile uint8_t *bytes = pointer;
    for (size_t offset = 0; offset < length; offset += page_size) bytes[offset] = 0;
    return 0;
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

int cguest_uffd_open(void) {
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        // vm.unprivileged_userfaultfd=0 restricts the syscall; the device node may still work.
        int device = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
        if (device < 0) return -errno;
#ifdef USERFAULTFD_IOC_NEW
        fd = ioctl(device, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
#endif
        int saved = errno;
        close(device);
        if (fd < 0) return -saved;
    }
    struct uffdio_api api = { .api = UFFD_API, .features = 0 };
    if (ioctl(fd, UFFDIO_API, &api) < 0) {
        int saved = errno;
        close(fd);
        return -saved;
    }
    if (!(api.features & UFFD_FEATURE_MISSING_SHMEM)) {
        close(fd);
        return -ENOTSUP;
    }
    return fd;
}

int cguest_uffd_register(int uffd, void *address, uint64_t length) {
    struct uffdio_register reg = {
        .range = { .start = (uint64_t)(uintptr_t)address, .len = length },
        .mode = UFFDIO_REGISTER_MODE_MISSING,
    };
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0) return -errno;
    uint64_t needed = (1ULL << _UFFDIO_COPY) | (1ULL << _UFFDIO_ZEROPAGE) | (1ULL << _UFFDIO_WAKE);
    if ((reg.ioctls & needed) != needed) {
        cguest_uffd_unregister(uffd, address, length);
        return -ENOTSUP;
    }
    return 0;
}

int cguest_uffd_unregister(int uffd, void *address, uint64_t length) {
    struct uffdio_range range = { .start = (uint64_t)(uintptr_t)address, .len = length };
    return ioctl(uffd, UFFDIO_UNREGISTER, &range) < 0 ? -errno : 0;
}

int cguest_uffd_copy(int uffd, void *address, const void *source, uint64_t length) {
    struct uffdio_copy copy = {
        .dst = (uint64_t)(uintptr_t)address, .src = (uint64_t)(uintptr_t)source, .len = length, .mode = 0,
    };
    while (ioctl(uffd, UFFDIO_COPY, &copy) < 0) {
        if (errno == EAGAIN && copy.copy > 0) { // partial: continue after what went in
            copy.dst += (uint64_t)copy.copy; copy.src += (uint64_t)copy.copy; copy.len -= (uint64_t)copy.copy;
            continue;
        }
        if (errno == EAGAIN) continue;
        return -errno;
    }
    return 0;
}

int cguest_uffd_zeropage(int uffd, void *address, uint64_t length) {
    struct uffdio_zeropage zero = { .range = { .start = (uint64_t)(uintptr_t)address, .len = length }, .mode = 0 };
    while (ioctl(uffd, UFFDIO_ZEROPAGE, &zero) < 0) {
        if (errno == EAGAIN && zero.zeropage > 0) {
            zero.range.start += (uint64_t)zero.zeropage; zero.range.len -= (uint64_t)zero.zeropage;
            continue;
        }
        if (errno == EAGAIN) continue;
        return -errno;
    }
    return 0;
}

int cguest_uffd_wake(int uffd, void *address, uint64_t length) {
    struct uffdio_range range = { .start = (uint64_t)(uintptr_t)address, .len = length };
    return ioctl(uffd, UFFDIO_WAKE, &range) < 0 ? -errno : 0;
}

int cguest_uffd_read_faults(int uffd, uint64_t *addresses, int capacity) {
    struct uffd_msg messages[64];
    int want = capacity < 64 ? capacity : 64;
    ssize_t n = read(uffd, messages, sizeof(struct uffd_msg) * (size_t)want);
    if (n < 0) return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -errno;
    int count = 0;
    for (ssize_t i = 0; i < n / (ssize_t)sizeof(struct uffd_msg); i++) {
        if (messages[i].event == UFFD_EVENT_PAGEFAULT) addresses[count++] = messages[i].arg.pagefault.address;
    }
    return count;
}

int cguest_uffd_poll(int uffd, int wake, int timeout_ms) {
    struct pollfd fds[2] = { { .fd = uffd, .events = POLLIN }, { .fd = wake, .events = POLLIN } };
    int n = poll(fds, 2, timeout_ms);
    if (n < 0) return errno == EINTR ? 0 : -errno;
    if (fds[1].revents) return 2;
    if (fds[0].revents & POLLIN) return 1;
    if (fds[0].revents) return -EIO;
    return 0;
}
