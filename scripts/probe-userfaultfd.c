// What postcopy needs from the host's userfaultfd, on a memfd mapped MAP_SHARED as tern maps
// guest RAM: the API features, the ioctls a MISSING registration offers, the cost of a fault
// served by a poll() handler, EEXIST on a present page, a punched page faulting again, and a
// 64-page UFFDIO_COPY. Build and run (as root where vm.unprivileged_userfaultfd=0):
//   gcc -O2 -pthread -o /tmp/probe-userfaultfd scripts/probe-userfaultfd.c && /tmp/probe-userfaultfd
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

enum { PAGE = 4096, PAGES = 2048, FAULTS = 1000, RUN = 64 };
static char *ram, source[RUN * PAGE];
static int uffd, first, count;                 // the toucher's pages: [first, first + count)
static volatile int done;
static double worst, total;

static double now_us(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1e6 + t.tv_nsec / 1e3; }
static void die(const char *what) { perror(what); exit(1); }

static void *toucher(void *unused) {           // a "vCPU": each read of a missing page blocks
    for (int i = first; i < first + count; i++) {
        double start = now_us();
        if (((volatile char *)ram)[(size_t)i * PAGE] != 'p') { fprintf(stderr, "page %d wrong\n", i); exit(1); }
        double took = now_us() - start;
        total += took; if (took > worst) worst = took;
    }
    done = 1;
    return unused;
}

static void serve(int from, int n) {           // the handler: poll, read the fault, UFFDIO_COPY
    pthread_t thread; first = from; count = n; done = 0; worst = total = 0;
    pthread_create(&thread, NULL, toucher, NULL);
    while (!done) {
        struct pollfd p = { .fd = uffd, .events = POLLIN };
        if (poll(&p, 1, 10) <= 0) continue;
        struct uffd_msg msg;
        if (read(uffd, &msg, sizeof msg) != sizeof msg || msg.event != UFFD_EVENT_PAGEFAULT) continue;
        struct uffdio_copy copy = { .dst = msg.arg.pagefault.address & ~(PAGE - 1ULL), .src = (unsigned long)source, .len = PAGE };
        if (ioctl(uffd, UFFDIO_COPY, &copy) < 0 && errno != EEXIST) die("UFFDIO_COPY");
    }
    pthread_join(thread, NULL);
}

int main(void) {
    for (int i = 0; i < RUN * PAGE; i++) source[i] = 'p';
    uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    printf("userfaultfd syscall: %s\n", uffd >= 0 ? "ok" : "refused");
    if (uffd < 0) {                            // the shim's fallback
        int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
        if (dev < 0 || (uffd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK)) < 0) die("/dev/userfaultfd");
        printf("/dev/userfaultfd: ok\n");
    }
    struct uffdio_api api = { .api = UFFD_API };
    if (ioctl(uffd, UFFDIO_API, &api) < 0) die("UFFDIO_API");
    printf("features 0x%llx, MISSING_SHMEM %s\n", (unsigned long long)api.features,
           api.features & UFFD_FEATURE_MISSING_SHMEM ? "yes" : "NO");
    int memfd = memfd_create("probe", MFD_CLOEXEC);
    if (memfd < 0 || ftruncate(memfd, (off_t)PAGES * PAGE) < 0) die("memfd");
    ram = mmap(NULL, (size_t)PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    if (ram == MAP_FAILED) die("mmap");
    struct uffdio_register reg = { .range = { (unsigned long)ram, (size_t)PAGES * PAGE }, .mode = UFFDIO_REGISTER_MODE_MISSING };
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0) die("UFFDIO_REGISTER");
    printf("ioctls 0x%llx: COPY %s, ZEROPAGE %s, WAKE %s\n", (unsigned long long)reg.ioctls,
           reg.ioctls & (1ULL << _UFFDIO_COPY) ? "yes" : "NO", reg.ioctls & (1ULL << _UFFDIO_ZEROPAGE) ? "yes" : "NO",
           reg.ioctls & (1ULL << _UFFDIO_WAKE) ? "yes" : "NO");

    serve(0, FAULTS);
    printf("%d faults from a second thread: mean %.0f us, max %.0f us\n", FAULTS, total / FAULTS, worst);

    struct uffdio_copy again = { .dst = (unsigned long)ram, .src = (unsigned long)source, .len = PAGE };
    int rc = ioctl(uffd, UFFDIO_COPY, &again);
    printf("UFFDIO_COPY onto a present page: %s\n", rc < 0 ? (errno == EEXIST ? "EEXIST" : "other error") : "succeeded");

    if (fallocate(memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, PAGE) < 0) die("fallocate");
    serve(0, 1);
    printf("after FALLOC_FL_PUNCH_HOLE: the page faulted again and UFFDIO_COPY installed it (%.0f us)\n", total);

    struct uffdio_copy run = { .dst = (unsigned long)(ram + (size_t)FAULTS * PAGE), .src = (unsigned long)source, .len = RUN * PAGE };
    double start = now_us();
    if (ioctl(uffd, UFFDIO_COPY, &run) < 0) die("UFFDIO_COPY of a run");
    printf("a %d-page UFFDIO_COPY: %.0f us\n", RUN, now_us() - start);
    return 0;
}
