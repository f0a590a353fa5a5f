/* The VMM's jail: its own IPC/UTS namespaces, no inherited fds, no capabilities, no new privileges, not dumpable, rlimits. */
#ifndef SMOLVM_JAIL_H
#define SMOLVM_JAIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/*
 * What the jail did, for STATUS and the log. The uid and gid stay the caller's
 * (the VMM writes the snapshot and fork files its caller names, in the
 * caller's folders), and so do the mount, PID and network namespaces (the
 * expose_local listeners and snapshot folders would first have to be handed
 * over as fds): SECURITY.md, "Not done yet".
 */
struct jail {
	bool on;                                    /* false: --no-jail (debugging only): nothing is done */
	unsigned long ns_ipc_caller, ns_uts_caller; /* inodes of the namespaces the VMM was started in */
	unsigned long ns_ipc, ns_uts;               /* its own (the caller's when unshare was refused) */
	char done[96];     /* what was applied: "ns,fds,caps,bset,nnp,nodump,nofile,core,as" (a subset) */
	char skipped[160]; /* what was not, and why: "ns:EPERM bset:EPERM" ("" when nothing was skipped) */
};

/*
 * First thing after the arguments, while the calling thread is the process's
 * only one (namespaces are per thread; later threads inherit them): enter new
 * IPC and UTS namespaces (skipped, and said in j->skipped, when the caller may
 * not: no CAP_SYS_ADMIN), then close every fd but 0, 1, 2 and keep_fd (the
 * control socket; -1: none). Returns 0 or -errno with a message in err.
 */
int jail_early(struct jail *j, int keep_fd, char *err, size_t errlen);

/*
 * After set-up (devices made, passt started, files open), before any vCPU
 * thread exists: the calling thread's capabilities dropped (jail_thread()),
 * the process made non-dumpable (no core, no ptrace by its uid; the VMM still
 * reads its own /proc), and its rlimits set: RLIMIT_NOFILE to the highest fd
 * open now + 1 + nofile_runtime (the fds the running VMM may still open:
 * connections, listeners, capture files), RLIMIT_CORE 0, RLIMIT_AS (if
 * as_runtime is not 0; sanitizer builds pass 0) to the address space used now
 * + as_runtime. Threads created afterwards inherit all of it. RLIMIT_NPROC is
 * not set: io_uring's workers count against it for a non-root caller.
 * Returns 0 or -errno with a message in err.
 */
int jail_enter(struct jail *j, unsigned long nofile_runtime, uint64_t as_runtime, char *err, size_t errlen);

/*
 * The calling thread's part (capabilities are per thread): empty the bounding
 * set (where permitted: it needs CAP_SETPCAP, which a non-root caller lacks),
 * clear the ambient, inheritable, permitted and effective sets, and set
 * PR_SET_NO_NEW_PRIVS. A thread started before jail_enter() (the resolver)
 * calls this itself first thing. A no-op when !j->on. Returns 0 or -errno.
 */
int jail_thread(const struct jail *j);

#endif
