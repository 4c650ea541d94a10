/* What does TLS cost on this host, with nothing else in the way? Moves the same bytes over
 * loopback TCP between two processes, plain (send/recv) and through OpenSSL (SSL_write /
 * SSL_read, blocking sockets, TLS 1.3 AES-128-GCM as tern negotiates, read-ahead on), and
 * prints wall time and each side's CPU time, interleaved over rounds. It is the TLS baseline
 * tern's own TLS migration is judged against (issue 11, docs/performance.md).
 *
 * The certificates: `python3 tests/tls_certs.py DIR` (server/ and client/ as QEMU lays them out).
 * Build and run:
 *   cc -O2 -o /tmp/tlsp tools/tls-probe/tls-probe.c -lssl -lcrypto && /tmp/tlsp DIR [MiB] [rounds]
 * With TLS_PROBE_BATCHED=1 a third column: the sender's records gathered in a memory BIO and
 * written with one send per 1 MiB SSL_write instead of one write per 16 KiB record.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (1 << 20)

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static double cpu_seconds(void) {
    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    return usage.ru_utime.tv_sec + usage.ru_utime.tv_usec / 1e6 + usage.ru_stime.tv_sec + usage.ru_stime.tv_usec / 1e6;
}

static void die(const char *what) {
    fprintf(stderr, "tls-probe: %s\n", what);
    ERR_print_errors_fp(stderr);
    exit(1);
}

static SSL_CTX *context(const char *dir, int server) {
    char path[4096], key[4096];
    SSL_CTX *ctx = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
    SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
    SSL_CTX_set_ciphersuites(ctx, "TLS_AES_128_GCM_SHA256");
    SSL_CTX_set_num_tickets(ctx, 0);
    snprintf(path, sizeof path, "%s/%s/ca-cert.pem", dir, server ? "server" : "client");
    if (SSL_CTX_load_verify_locations(ctx, path, NULL) != 1) die("ca-cert.pem");
    snprintf(path, sizeof path, "%s/%s/%s-cert.pem", dir, server ? "server" : "client", server ? "server" : "client");
    snprintf(key, sizeof key, "%s/%s/%s-key.pem", dir, server ? "server" : "client", server ? "server" : "client");
    if (SSL_CTX_use_certificate_chain_file(ctx, path) != 1 || SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1)
        die("certificate or key");
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | (server ? SSL_VERIFY_FAIL_IF_NO_PEER_CERT : 0), NULL);
    return ctx;
}

/* The receiver: a child process that reads `total` bytes, then reports its CPU time. */
static void receive(int listener, const char *dir, size_t total, int tls, int report) {
    int fd = accept(listener, NULL, NULL);
    char *buffer = malloc(CHUNK);
    double cpu = cpu_seconds();
    SSL *ssl = NULL;
    if (tls) {
        SSL_CTX *ctx = context(dir, 1);
        ssl = SSL_new(ctx);
        SSL_set_fd(ssl, fd);
        /* TLS_PROBE_READ_AHEAD: 0 off, else the read buffer in KiB (default 256, as tern). */
        const char *ahead = getenv("TLS_PROBE_READ_AHEAD");
        long kib = ahead ? strtol(ahead, NULL, 10) : 256;
        if (kib > 0) {
            SSL_set_read_ahead(ssl, 1);
            SSL_set_default_read_buffer_len(ssl, (size_t)kib << 10);
        }
        if (SSL_accept(ssl) != 1) die("SSL_accept");
    }
    size_t got = 0;
    while (got < total) {
        size_t n = 0;
        if (tls) {
            if (SSL_read_ex(ssl, buffer, CHUNK, &n) != 1) die("SSL_read");
        } else {
            ssize_t r = recv(fd, buffer, CHUNK, 0);
            if (r <= 0) die("recv");
            n = (size_t)r;
        }
        got += n;
    }
    double used = cpu_seconds() - cpu;
    if (write(report, &used, sizeof used) != sizeof used) die("report");
    char ack = 'k';
    if (write(fd, &ack, 1) != 1) die("ack");
    close(fd);
    _exit(0);
}

static void run(const char *dir, size_t total, int tls, double *wall, double *sender, double *receiver) {
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in address = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t length = sizeof address;
    bind(listener, (struct sockaddr *)&address, sizeof address);
    listen(listener, 1);
    getsockname(listener, (struct sockaddr *)&address, &length);
    int pipefd[2];
    if (pipe(pipefd) != 0) die("pipe");
    pid_t child = fork();
    if (child == 0) receive(listener, dir, total, tls, pipefd[1]);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(fd, (struct sockaddr *)&address, sizeof address) != 0) die("connect");
    char *buffer = malloc(CHUNK);
    for (size_t i = 0; i < CHUNK; i++) buffer[i] = (char)(i * 2654435761u >> 13);
    double start = now(), cpu = cpu_seconds();
    SSL *ssl = NULL;
    BIO *outbox = NULL;
    if (tls) {
        ssl = SSL_new(context(dir, 0));
        SSL_set_fd(ssl, fd);
        SSL_set1_host(ssl, "localhost");
        if (SSL_connect(ssl) != 1) die("SSL_connect");
        if (tls == 2) {
            /* Records gathered in memory, written with one send per SSL_write. */
            outbox = BIO_new(BIO_s_mem());
            BIO_up_ref(SSL_get_rbio(ssl));
            SSL_set_bio(ssl, SSL_get_rbio(ssl), outbox);
        }
    }
    for (size_t sent = 0; sent < total; sent += CHUNK) {
        if (tls) {
            size_t n;
            if (SSL_write_ex(ssl, buffer, CHUNK, &n) != 1) die("SSL_write");
            if (outbox) {
                char *data;
                long pending = BIO_get_mem_data(outbox, &data);
                for (long off = 0; off < pending;) {
                    ssize_t w = send(fd, data + off, (size_t)(pending - off), 0);
                    if (w <= 0) die("send outbox");
                    off += w;
                }
                (void)BIO_reset(outbox);
            }
        } else {
            for (size_t off = 0; off < CHUNK;) {
                ssize_t n = send(fd, buffer + off, CHUNK - off, 0);
                if (n <= 0) die("send");
                off += (size_t)n;
            }
        }
    }
    char ack;
    if (read(fd, &ack, 1) != 1) die("no ack");
    *wall = now() - start;
    *sender = cpu_seconds() - cpu;
    if (read(pipefd[0], receiver, sizeof *receiver) != sizeof *receiver) die("no report");
    waitpid(child, NULL, 0);
    if (ssl) SSL_free(ssl);
    close(fd);
    close(listener);
    close(pipefd[0]);
    close(pipefd[1]);
    free(buffer);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: tls-probe PKI-DIR [MiB] [rounds]\n");
        return 2;
    }
    size_t mib = argc > 2 ? strtoul(argv[2], NULL, 10) : 512;
    int rounds = argc > 3 ? atoi(argv[3]) : 5;
    printf("%zu MiB over loopback TCP, %d rounds; CPU s per GiB for each side\n", mib, rounds);
    int modes = getenv("TLS_PROBE_BATCHED") ? 3 : 2;
    printf("round   plain s (send/recv cpu)       tls s (send/recv cpu)      tls/plain%s\n",
           modes == 3 ? "   batched tls s (send/recv cpu)" : "");
    for (int round = 1; round <= rounds; round++) {
        double w[3], s[3], r[3];
        for (int tls = 0; tls < modes; tls++) run(argv[1], mib << 20, tls, &w[tls], &s[tls], &r[tls]);
        double gib = mib / 1024.0;
        printf("%5d   %.3f (%.2f/%.2f)          %.3f (%.2f/%.2f)         %.2f", round, w[0], s[0] / gib, r[0] / gib,
               w[1], s[1] / gib, r[1] / gib, w[1] / w[0]);
        if (modes == 3) printf("        %.3f (%.2f/%.2f)", w[2], s[2] / gib, r[2] / gib);
        printf("\n");
    }
    return 0;
}
