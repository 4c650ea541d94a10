/* Does MSG_ZEROCOPY pay for a migration stream on this host? Sends the same bytes over a TCP
 * connection (loopback, or to a --to HOST:PORT sink) with plain send() and with
 * send(MSG_ZEROCOPY), in 256 KiB calls from a 64 MiB buffer, as tern's writer does, and
 * prints wall time, the sender's CPU time and how the kernel completed the zero-copy sends
 * (SO_EE_CODE_ZEROCOPY_COPIED means it copied after all). Issue 11, docs/performance.md.
 *
 * Build and run: cc -O2 -pthread -o /tmp/zcp zerocopy-probe.c && /tmp/zcp [GiB]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <time.h>
#include <linux/errqueue.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef SO_ZEROCOPY
#define SO_ZEROCOPY 60
#endif
#ifndef MSG_ZEROCOPY
#define MSG_ZEROCOPY 0x4000000
#endif

static const size_t chunk = 256 << 10;
static const size_t buffer_size = 64 << 20;

static void *sink(void *arg) {
    int fd = *(int *)arg;
    char *buf = malloc(1 << 20);
    while (read(fd, buf, 1 << 20) > 0) {}
    free(buf);
    return NULL;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static double cpu(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

/* Reads zero-copy completions; returns how many sends completed, counting copied ones. */
static long drain(int fd, long *copied, int wait) {
    long done = 0;
    for (;;) {
        if (wait) {
            struct pollfd p = {fd, 0, 0};
            poll(&p, 1, 100);
        }
        char control[128];
        struct msghdr msg = {0};
        msg.msg_control = control;
        msg.msg_controllen = sizeof control;
        if (recvmsg(fd, &msg, MSG_ERRQUEUE | MSG_DONTWAIT) < 0) return done;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
            struct sock_extended_err *e = (struct sock_extended_err *)CMSG_DATA(c);
            if (e->ee_origin != SO_EE_ORIGIN_ZEROCOPY) continue;
            long n = (long)e->ee_data - (long)e->ee_info + 1;
            done += n;
            if (e->ee_code & SO_EE_CODE_ZEROCOPY_COPIED) *copied += n;
        }
        wait = 0;
    }
}

static void run(const char *label, int zerocopy, size_t total) {
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    bind(listener, (struct sockaddr *)&addr, sizeof addr);
    socklen_t len = sizeof addr;
    getsockname(listener, (struct sockaddr *)&addr, &len);
    listen(listener, 1);
    int out = socket(AF_INET, SOCK_STREAM, 0);
    connect(out, (struct sockaddr *)&addr, sizeof addr);
    int in = accept(listener, NULL, NULL);
    pthread_t reader;
    pthread_create(&reader, NULL, sink, &in);
    int one = 1;
    if (zerocopy && setsockopt(out, SOL_SOCKET, SO_ZEROCOPY, &one, sizeof one) < 0) {
        printf("%s: SO_ZEROCOPY refused: %s\n", label, strerror(errno));
        return;
    }
    char *buffer = aligned_alloc(4096, buffer_size);
    memset(buffer, 0x5a, buffer_size);
    long sends = 0, completed = 0, copied = 0;
    double t0 = now(), c0 = cpu();
    for (size_t sent = 0; sent < total; sent += chunk) {
        size_t offset = sent % buffer_size;
        ssize_t n;
        do {
            n = send(out, buffer + offset, chunk, zerocopy ? MSG_ZEROCOPY : 0);
            if (n < 0 && errno == ENOBUFS) completed += drain(out, &copied, 1); /* optmem full: reap */
        } while (n < 0 && (errno == ENOBUFS || errno == EINTR));
        if (n != (ssize_t)chunk) { printf("%s: short send %zd\n", label, n); break; }
        sends++;
        if (zerocopy && (sends & 63) == 0) completed += drain(out, &copied, 0);
    }
    while (zerocopy && completed < sends) {
        long got = drain(out, &copied, 1);
        if (got == 0) break;
        completed += got;
    }
    double wall = now() - t0, cpu_s = cpu() - c0;
    shutdown(out, SHUT_WR);
    pthread_join(reader, NULL);
    printf("%-12s %.2f GiB in %.3f s = %.2f GiB/s, sender CPU %.3f s%s", label, total / 1073741824.0, wall,
           total / 1073741824.0 / wall, cpu_s, zerocopy ? "" : "\n");
    if (zerocopy) printf(", %ld of %ld sends completed, %ld copied by the kernel\n", completed, sends, copied);
    close(out); close(in); close(listener); free(buffer);
}

int main(int argc, char **argv) {
    size_t total = (size_t)(argc > 1 ? atof(argv[1]) : 2.0) * 1073741824.0;
    for (int round = 0; round < 3; round++) {
        run("send", 0, total);
        run("MSG_ZEROCOPY", 1, total);
    }
    return 0;
}
