/* The VM's network backend process: passt, started by the VMM on one end of a socketpair. */
#ifndef SMOLVM_PASST_H
#define SMOLVM_PASST_H

#include <sys/types.h>

#define PASST_MAX_ARGS 64

/*
 * Start argv[0] (passt) with argv[1..] and "--fd 3" appended, fd 3 being one
 * end of a new SOCK_STREAM socketpair; *fd gets the other end (non-blocking,
 * close-on-exec), *pid the child. passt then speaks QEMU's stream protocol
 * (4-byte big-endian length, then the Ethernet frame) on it and exits once it
 * closes. The child's stdin is /dev/null; stdout and stderr are the VMM's.
 * Returns 0 or -errno (-ENOENT: no such program; -E2BIG: too many args).
 */
int passt_start(char *const *argv, int argc, int *fd, pid_t *pid);

/*
 * SIGTERM the child and reap it (SIGKILL after a second). Once the VMM is jailed it may not
 * signal passt (EPERM: passt runs as nobody when started by root): close the NIC's socket
 * first (net_free shuts it down), so that passt ends on EOF within that second; it is not
 * waited for beyond it. pid <= 0: nothing.
 */
void passt_stop(pid_t pid);

#endif
