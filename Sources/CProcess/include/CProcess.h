#ifndef CPROCESS_H
#define CPROCESS_H

/* QEMU's -daemonize: the process forks before it builds anything (no threads exist yet).
 * The parent waits until the child says it is ready, then exits 0; if the child dies first,
 * the parent exits with 1. Returns, in the child, the descriptor to pass to
 * cprocess_daemon_ready, or a negative errno. The parent never returns. */
int cprocess_daemonize(void);

/* The child is set up (its monitor listens, its pidfile is written): release the parent and
 * point standard input, output and error at /dev/null. */
void cprocess_daemon_ready(int fd);

/* Creates or opens PATH, takes a write lock on it (fails with -EAGAIN if another process
 * holds it) and writes this process's pid. Returns the open descriptor (kept open to hold
 * the lock) or a negative errno. */
int cprocess_write_pidfile(const char *path);

/* Whether fd is an open socket that listens (SO_ACCEPTCONN): 1, 0, or a negative errno. */
int cprocess_is_listening_socket(int fd);

/* Opens a new pseudo-terminal master (non-blocking, close-on-exec, raw) and writes its slave's
 * path into path. Returns the master descriptor or a negative errno. */
int cprocess_open_pty(char *path, unsigned long capacity);

#endif
