/* Per-thread seccomp allow-lists of the VMM (libseccomp; not named seccomp.h, which is libseccomp's). */
#ifndef SMOLVM_SYSFILTER_H
#define SMOLVM_SYSFILTER_H

#include <stddef.h>
#include <sys/types.h>

/*
 * The threads of a running VMM and the filter each one installs on itself.
 * A thread's filter is built from the groups its role lists (sysfilter.c:
 * sysfilter_roles[]): a new thread kind adds a role there and calls
 * sysfilter_install() with it before it touches anything the guest controls.
 */
enum sysfilter_role {
	SYSFILTER_ROLE_VCPU, /* KVM_RUN and the MMIO/PIO device handlers it calls */
	SYSFILTER_ROLE_LOOP, /* the main thread: io_uring event loop, devices' queues, control socket, teardown */
	SYSFILTER_ROLE_RESOLVER, /* the egress policy's getaddrinfo thread (resolver.c): the host's resolver only */
	SYSFILTER_NR_ROLES,
};

enum sysfilter_mode {
	SYSFILTER_KILL = 0, /* the default: a call outside the list kills the whole VMM (SIGSYS) */
	SYSFILTER_OFF,      /* --no-seccomp: no filter (debugging only) */
	SYSFILTER_REPORT,   /* --seccomp-report: name the call on stderr and the console, then die (exit 159) */
};

struct sysfilter_params {
	enum sysfilter_mode mode;
	pid_t child;    /* the one process kill() may signal (passt), or -1 */
	int console_fd; /* SYSFILTER_REPORT also writes here; -1: stderr only */
};

/*
 * Load role's filter on the calling thread (no other thread is affected; a
 * thread it creates later inherits it). Sets PR_SET_NO_NEW_PRIVS. A no-op in
 * SYSFILTER_OFF. Returns 0 or -errno with a message in err.
 */
int sysfilter_install(enum sysfilter_role role, const struct sysfilter_params *p, char *err, size_t errlen);

/* The name of a role ("vcpu", "loop", "resolver") for messages. */
const char *sysfilter_role_name(enum sysfilter_role role);

#endif
