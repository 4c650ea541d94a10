// CSocket: the socket calls whose C interfaces Swift cannot use directly (sockaddr unions,
// getaddrinfo lists, the CMSG macros for SCM_RIGHTS). Each returns a descriptor or byte count,
// or -errno on failure. No policy lives here.
#ifndef CSOCKET_H
#define CSOCKET_H

#include <stddef.h>
#include <sys/types.h>

/// Creates, binds and listens on a Unix stream socket at `path` (an existing socket file there
/// is replaced, as QEMU does). Returns the listening descriptor or -errno.
int csocket_listen_unix(const char *path, int backlog);

/// Listens on `host`:`port` over TCP (IPv4 or IPv6, SO_REUSEADDR). `port` may be "0"; the bound
/// port is stored in `bound_port`. Returns the listening descriptor or -errno (-EINVAL for a host
/// that does not resolve).
int csocket_listen_tcp(const char *host, const char *port, int backlog, int *bound_port);

/// Connects to a Unix stream socket. Returns the descriptor or -errno.
int csocket_connect_unix(const char *path);

/// Connects over TCP. Returns the descriptor or -errno.
int csocket_connect_tcp(const char *host, const char *port);

/// Accepts a connection (close-on-exec). Returns the descriptor or -errno.
int csocket_accept(int listener);

/// Reads up to `length` bytes, also taking up to `max_fds` descriptors passed with SCM_RIGHTS
/// (close-on-exec); their count goes to `fd_count`. Returns the byte count, 0 at end of stream,
/// or -errno.
ssize_t csocket_receive(int fd, void *buffer, size_t length, int *fds, int max_fds, int *fd_count);

/// Sends bytes, with one descriptor attached by SCM_RIGHTS when `pass_fd` >= 0, without raising
/// SIGPIPE. Returns the byte count or -errno.
ssize_t csocket_send(int fd, const void *buffer, size_t length, int pass_fd);

/// Bounds how long a send may block (seconds), so that one stuck client cannot stall others.
int csocket_set_send_timeout(int fd, int seconds);

#endif
