// The pieces of the shim that are function bodies: what Swift cannot call or set portably
// (sigaction's handler union, variadic prctl, gettid).
#include "CKVM.h"
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

static void ckvm_kick_handler(int signal_number) { (void)signal_number; }

int ckvm_install_kick_handler(int signal_number) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = ckvm_kick_handler;
    sigemptyset(&action.sa_mask);
    action.sa_flags = 0; // no SA_RESTART: KVM_RUN must come back with EINTR
    return sigaction(signal_number, &action, NULL);
}

int ckvm_unblock_signal(int signal_number) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, signal_number);
    return pthread_sigmask(SIG_UNBLOCK, &set, NULL);
}

int ckvm_thread_id(void) {
    return (int)syscall(SYS_gettid);
}

int ckvm_set_thread_name(const char *name) {
    return prctl(PR_SET_NAME, (unsigned long)name, 0, 0, 0);
}
