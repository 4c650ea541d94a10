#define _GNU_SOURCE
#include "CProcess.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

int cprocess_daemonize(void) {
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0) return -errno;
    pid_t pid = fork();
    if (pid < 0) {
        int error = errno;
        close(fds[0]);
        close(fds[1]);
        return -error;
    }
    if (pid > 0) {
        close(fds[1]);
        char status = 1;
        ssize_t n;
        do { n = read(fds[0], &status, 1); } while (n < 0 && errno == EINTR);
        /* One zero byte: ready. End of file: the child failed (it printed why). */
        _exit(n == 1 && status == 0 ? 0 : 1);
    }
    close(fds[0]);
    setsid();
    /* A second fork, as QEMU does, so the daemon is not a session leader. */
    pid = fork();
    if (pid < 0) return -errno;
    if (pid > 0) _exit(0);
    umask(027);
    return fds[1];
}

void cprocess_daemon_ready(int fd) {
    if (fd < 0) return;
    char ready = 0;
    ssize_t n;
    do { n = write(fd, &ready, 1); } while (n < 0 && errno == EINTR);
    close(fd);
    int null = open("/dev/null", O_RDWR);
    if (null >= 0) {
        dup2(null, STDIN_FILENO);
        dup2(null, STDOUT_FILENO);
        dup2(null, STDERR_FILENO);
        if (null > STDERR_FILENO) close(null);
    }
}

int cprocess_write_pidfile(const char *path) {
    int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return -errno;
    if (lockf(fd, F_TLOCK, 0) != 0) {
        int error = errno == EACCES ? EAGAIN : errno;
        close(fd);
        return -error;
    }
    char text[32];
    int length = snprintf(text, sizeof text, "%d\n", (int)getpid());
    if (ftruncate(fd, 0) != 0 || write(fd, text, (size_t)length) != length) {
        int error = errno;
        close(fd);
        return -error;
    }
    return fd;
}

int cprocess_is_listening_socket(int fd) {
    int listening = 0;
    socklen_t length = sizeof listening;
    if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &length) != 0) return -errno;
    return listening ? 1 : 0;
}

int cprocess_open_pty(char *path, unsigned long capacity) {
    int fd = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) return -errno;
    if (grantpt(fd) != 0 || unlockpt(fd) != 0 || ptsname_r(fd, path, capacity) != 0) {
        int error = errno;
        close(fd);
        return -error;
    }
    struct termios settings;
    if (tcgetattr(fd, &settings) == 0) {
        cfmakeraw(&settings);
        tcsetattr(fd, TCSANOW, &settings);
    }
    return fd;
}
