/* The VMM's seccomp allow-lists as tables, one set of groups per thread role, loaded with libseccomp. */
#define _GNU_SOURCE
#include "sysfilter.h"

#include <errno.h>
#include <fcntl.h>
#include <seccomp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <linux/kvm.h>

/* Calls a group allows only with these arguments (built in sysfilter_add_special()). */
enum {
	SYSFILTER_F_MMAP_NOEXEC = 1u << 0, /* mmap/mprotect, never PROT_EXEC */
	SYSFILTER_F_TGKILL_SELF = 1u << 1, /* tgkill to this process's threads (the vCPU kick, SIGUSR1) */
	SYSFILTER_F_KILL_CHILD = 1u << 2,  /* kill() of the network backend only (passt_stop) */
	SYSFILTER_F_SOCKET_INET = 1u << 3, /* socket(AF_INET, ...): port-forward listeners */
	SYSFILTER_F_OPEN_WRITE = 1u << 4,  /* openat(..., O_WRONLY ...): snapshot files; never a read */
	SYSFILTER_F_ANY_MMAP = 1u << 5,    /* sanitizer runtimes: mmap/mprotect with any protection */
	SYSFILTER_F_FSTAT_FD = 1u << 6,    /* newfstatat(fd, "", AT_EMPTY_PATH): stdio's fstat, no paths */
	SYSFILTER_F_OPEN_READ = 1u << 7,   /* openat(..., O_RDONLY ...): the resolver's /etc files; never a write */
	SYSFILTER_F_SOCKET_DNS = 1u << 8,  /* socket(AF_INET|AF_INET6): DNS; AF_UNIX (nscd) and others fail softly */
	SYSFILTER_F_EXEC_EPERM = 1u << 9,  /* mmap/mprotect with PROT_EXEC fail with EPERM (an NSS module's dlopen) */
};

struct sysfilter_group {
	const char *name;
	const int *calls; /* allowed with any arguments */
	size_t nr_calls;
	const unsigned long *ioctls; /* ioctl() requests allowed (any fd) */
	size_t nr_ioctls;
	unsigned special; /* SYSFILTER_F_* */
	const int *denied; /* fail with EPERM instead of killing (sanitizers' symbolizer) */
	size_t nr_denied;
};

#define SYSFILTER_N(a) (sizeof(a) / sizeof((a)[0]))

/* ---- every thread: memory, locks, time, signals, exit ---------------------------------------- */
static const int sysfilter_common_calls[] = {
	SCMP_SYS(brk), SCMP_SYS(munmap), SCMP_SYS(mremap), SCMP_SYS(madvise), /* malloc */
	SCMP_SYS(futex),                                                       /* mutexes, condvars, join */
	SCMP_SYS(rt_sigreturn), SCMP_SYS(rt_sigprocmask), SCMP_SYS(restart_syscall),
	SCMP_SYS(getpid), SCMP_SYS(gettid), /* pthread_kill */
	SCMP_SYS(clock_gettime), SCMP_SYS(gettimeofday), SCMP_SYS(sched_yield),
	SCMP_SYS(write), SCMP_SYS(lseek), /* console (dprintf seeks), eventfds, stderr */
	SCMP_SYS(exit), SCMP_SYS(exit_group),
};

/* ---- vCPU threads: KVM_RUN, then the exit's device handler (serial, i8042, virtio-mmio, xstate) --- */
static const int sysfilter_vcpu_calls[] = {
	SCMP_SYS(ioctl),        /* narrowed to sysfilter_vcpu_ioctls below */
	SCMP_SYS(io_uring_enter), /* virtio-blk reset drains the disk's ring */
	SCMP_SYS(pread64),      /* its own /proc/thread-self/status, for STATUS */
};
static const unsigned long sysfilter_vcpu_ioctls[] = {
	KVM_RUN,
	KVM_GET_REGS,                                     /* the internal-error report */
	KVM_IRQ_LINE,                                     /* interrupts when irqfd is unavailable */
	KVM_CHECK_EXTENSION, KVM_GET_XSAVE, KVM_GET_XSAVE2, KVM_SET_XSAVE, /* XSTATE_PORT (compat) */
};

/* ---- the loop thread, devices' side: queues, vsock and passt sockets, disk completions ---------- */
static const int sysfilter_device_calls[] = {
	SCMP_SYS(ioctl), /* narrowed to sysfilter_device_ioctls */
	SCMP_SYS(io_uring_enter), /* the event loop and the disks (their rings allow only their opcodes) */
	SCMP_SYS(read), SCMP_SYS(readv), SCMP_SYS(recvfrom), SCMP_SYS(recvmsg),
	SCMP_SYS(sendto), SCMP_SYS(sendmsg), SCMP_SYS(writev),
	SCMP_SYS(accept4), SCMP_SYS(shutdown), SCMP_SYS(close),
};
static const unsigned long sysfilter_device_ioctls[] = {
	KVM_IRQ_LINE,
	KVM_IOEVENTFD, KVM_IRQFD, /* teardown unregisters them */
};

/* ---- the loop thread, control side: SNAPSHOT, FWD, STATUS, PAUSE, teardown --------------------- */
static const int sysfilter_control_calls[] = {
	SCMP_SYS(mkdir), SCMP_SYS(mkdirat), SCMP_SYS(pwrite64), SCMP_SYS(ftruncate), /* SNAPSHOT */
	SCMP_SYS(fsync), SCMP_SYS(fdatasync), SCMP_SYS(rename), SCMP_SYS(renameat),
	SCMP_SYS(renameat2),
	SCMP_SYS(unlink), SCMP_SYS(unlinkat), /* sockets' files at teardown */
	SCMP_SYS(setsockopt), SCMP_SYS(bind), SCMP_SYS(listen), SCMP_SYS(getsockname), /* FWD ADD */
	SCMP_SYS(pread64), SCMP_SYS(getdents64), /* STATUS: the pre-opened /proc status, limits, fd list */
	SCMP_SYS(wait4), SCMP_SYS(nanosleep), SCMP_SYS(clock_nanosleep), /* reaping passt */
	SCMP_SYS(fcntl),
	SCMP_SYS(linkat), SCMP_SYS(link), /* FORK: the capture links the base memory file */
	SCMP_SYS(getrusage),              /* RUSAGE (benchmarks/bench_net.py) */
};
static const unsigned long sysfilter_control_ioctls[] = {
	KVM_CHECK_EXTENSION, KVM_GET_MSR_INDEX_LIST, /* snapshot_save: VM and vCPU state */
	KVM_GET_PIT2, KVM_GET_CLOCK, KVM_GET_IRQCHIP,
	KVM_GET_MP_STATE, KVM_GET_REGS, KVM_GET_SREGS, KVM_GET_XSAVE, KVM_GET_XSAVE2, KVM_GET_FPU,
	KVM_GET_XCRS, KVM_GET_DEBUGREGS, KVM_GET_LAPIC, KVM_GET_MSRS, KVM_GET_VCPU_EVENTS,
	KVM_GET_DIRTY_LOG, /* FORK: the pages written since restore */
};

/*
 * ---- the resolver thread: getaddrinfo(AF_INET) as the host's /etc/nsswitch.conf "files dns" does it
 * (strace of glibc 2.36): /etc/resolv.conf, nsswitch.conf, hosts, gai.conf read-only, paths stat'ed
 * for changes, uname, UDP (TCP on truncation) to the nameservers, then its eventfd. nscd's AF_UNIX
 * socket and any NSS module that is not built into libc (dlopen: an executable mapping) fail with
 * an error instead of killing the VMM: glibc then goes on to the next source.
 */
static const int sysfilter_resolver_calls[] = {
	SCMP_SYS(read), SCMP_SYS(close), SCMP_SYS(newfstatat), SCMP_SYS(uname), SCMP_SYS(getrandom),
	SCMP_SYS(connect), SCMP_SYS(setsockopt), SCMP_SYS(getsockname), SCMP_SYS(poll), SCMP_SYS(ppoll),
	SCMP_SYS(sendto), SCMP_SYS(sendmmsg), SCMP_SYS(writev), SCMP_SYS(recvfrom), SCMP_SYS(recvmsg),
	SCMP_SYS(ioctl), /* narrowed to sysfilter_resolver_ioctls */
};
static const unsigned long sysfilter_resolver_ioctls[] = {
	FIONREAD, /* the size of a UDP answer */
};

/*
 * ---- sanitizer builds (SMOLVM_SANITIZE=1): what ASan/UBSan need to report a bug -----------------
 * The report opens its log_path file and reads /proc/self/maps; it cannot start the
 * symbolizer (EPERM: the report is unsymbolized but complete). Never in release builds.
 */
#if defined(__SANITIZE_ADDRESS__)
static const int sysfilter_sanitizer_calls[] = {
	SCMP_SYS(openat), SCMP_SYS(open), SCMP_SYS(read), SCMP_SYS(pread64), SCMP_SYS(close),
	SCMP_SYS(readlink), SCMP_SYS(readlinkat), SCMP_SYS(fstat), SCMP_SYS(newfstatat),
	SCMP_SYS(lseek), SCMP_SYS(getrlimit), SCMP_SYS(prlimit64), SCMP_SYS(sigaltstack),
	SCMP_SYS(rt_sigaction), SCMP_SYS(prctl), SCMP_SYS(sched_getaffinity), SCMP_SYS(uname),
	SCMP_SYS(getcwd), SCMP_SYS(tgkill), SCMP_SYS(dup2), SCMP_SYS(dup3),
	SCMP_SYS(pipe2), SCMP_SYS(getrusage),
};
static const int sysfilter_sanitizer_denied[] = {
	SCMP_SYS(clone), SCMP_SYS(clone3), SCMP_SYS(fork), SCMP_SYS(vfork), SCMP_SYS(execve),
	SCMP_SYS(ptrace),
};
#define SYSFILTER_SANITIZER_GROUP                                                                     \
	&(const struct sysfilter_group){ "sanitizer", sysfilter_sanitizer_calls,                        \
				       SYSFILTER_N(sysfilter_sanitizer_calls), NULL, 0,                 \
				       SYSFILTER_F_ANY_MMAP, sysfilter_sanitizer_denied,                \
				       SYSFILTER_N(sysfilter_sanitizer_denied) },
#else
#define SYSFILTER_SANITIZER_GROUP
#endif

/* Release builds: a dlopen in the resolver fails (EPERM); sanitizer builds map anything already. */
#if defined(__SANITIZE_ADDRESS__)
#define SYSFILTER_RESOLVER_SPECIAL (SYSFILTER_F_OPEN_READ | SYSFILTER_F_SOCKET_DNS)
#else
#define SYSFILTER_RESOLVER_SPECIAL (SYSFILTER_F_OPEN_READ | SYSFILTER_F_SOCKET_DNS | SYSFILTER_F_EXEC_EPERM)
#endif

#define SYSFILTER_GROUP(name_, calls_, ioctls_, special_)                                             \
	&(const struct sysfilter_group){ name_, calls_, SYSFILTER_N(calls_), ioctls_, SYSFILTER_N(ioctls_), \
				       special_, NULL, 0 }

static const struct sysfilter_group sysfilter_common = {
	"common", sysfilter_common_calls, SYSFILTER_N(sysfilter_common_calls), NULL, 0,
	SYSFILTER_F_MMAP_NOEXEC | SYSFILTER_F_TGKILL_SELF | SYSFILTER_F_FSTAT_FD, NULL, 0,
};

/*
 * Role -> groups. The loop thread is the io_uring/device thread and the control
 * thread at once (ctl.c runs on the event loop); its two groups stay apart so
 * either can move to a thread of its own. A new thread kind gets a group of its
 * own here and a role in sysfilter.h.
 */
static const struct sysfilter_group *const sysfilter_roles[SYSFILTER_NR_ROLES][6] = {
	[SYSFILTER_ROLE_VCPU] = {
		&sysfilter_common,
		SYSFILTER_GROUP("vcpu", sysfilter_vcpu_calls, sysfilter_vcpu_ioctls, 0),
		SYSFILTER_SANITIZER_GROUP
	},
	[SYSFILTER_ROLE_LOOP] = {
		&sysfilter_common,
		SYSFILTER_GROUP("device", sysfilter_device_calls, sysfilter_device_ioctls, 0),
		SYSFILTER_GROUP("control", sysfilter_control_calls, sysfilter_control_ioctls,
			      SYSFILTER_F_KILL_CHILD | SYSFILTER_F_SOCKET_INET | SYSFILTER_F_OPEN_WRITE),
		SYSFILTER_SANITIZER_GROUP
	},
	[SYSFILTER_ROLE_RESOLVER] = {
		&sysfilter_common,
		SYSFILTER_GROUP("resolver", sysfilter_resolver_calls, sysfilter_resolver_ioctls,
			      SYSFILTER_RESOLVER_SPECIAL),
		SYSFILTER_SANITIZER_GROUP
	},
};

static const char *const sysfilter_role_names[SYSFILTER_NR_ROLES] = {
	[SYSFILTER_ROLE_VCPU] = "vcpu", [SYSFILTER_ROLE_LOOP] = "loop", [SYSFILTER_ROLE_RESOLVER] = "resolver",
};

const char *sysfilter_role_name(enum sysfilter_role role)
{
	return role < SYSFILTER_NR_ROLES ? sysfilter_role_names[role] : "?";
}

static int sysfilter_report_console = -1; /* SYSFILTER_REPORT only: where the handler also writes */

/* SYSFILTER_REPORT: a forbidden call traps here. Only async-signal-safe calls the filter allows. */
static void sysfilter_on_sigsys(int sig, siginfo_t *si, void *uc)
{
	char line[160];
	int n;

	(void)sig;
	(void)uc;
	n = snprintf(line, sizeof(line),
		     "smolvm-vmm: seccomp: thread %ld made system call %d, which its filter forbids "
		     "(scmp_sys_resolver %d names it); exiting\n",
		     (long)syscall(SYS_gettid), si->si_syscall, si->si_syscall);
	if (n > 0) {
		(void)!write(2, line, (size_t)n);
		if (sysfilter_report_console >= 0)
			(void)!write(sysfilter_report_console, line, (size_t)n);
	}
	syscall(SYS_exit_group, 159);
}

static int sysfilter_rule(scmp_filter_ctx ctx, uint32_t action, int nr, unsigned nargs,
			const struct scmp_arg_cmp *cmp)
{
	int ret = seccomp_rule_add_array(ctx, action, nr, nargs, cmp);

	return ret == -EEXIST ? 0 : ret;
}

static int sysfilter_add_special(scmp_filter_ctx ctx, unsigned special, const struct sysfilter_params *p)
{
	int ret = 0;

	if (special & SYSFILTER_F_ANY_MMAP) {
		ret = sysfilter_rule(ctx, SCMP_ACT_ALLOW, SCMP_SYS(mmap), 0, NULL);
		if (!ret)
			ret = sysfilter_rule(ctx, SCMP_ACT_ALLOW, SCMP_SYS(mprotect), 0, NULL);
		if (!ret)
			ret = sysfilter_rule(ctx, SCMP_ACT_ALLOW, SCMP_SYS(openat), 0, NULL);
	}
	if (!ret && (special & SYSFILTER_F_MMAP_NOEXEC)) {
		struct scmp_arg_cmp noexec = SCMP_A2(SCMP_CMP_MASKED_EQ, PROT_EXEC, 0);

		ret = sysfilter_rule(ctx, SCMP_ACT_ALLOW, SCMP_SYS(mmap), 1, &noexec);
		if (!ret)
			ret = sysfilter_rule(ctx, SCMP_ACT_ALLOW, SCMP_SYS(mprotect), 1, &noexec);
	}
	if (!ret && (special & SYSFILTER_F_FSTAT_FD)) {
		struct scmp_arg_cmp empty = SCMP_A3(SCMP_CMP_MASKED_EQ, AT_EMPTY_PATH, AT_EMPTY_PATH);

		ret = sysfilter_rule(ctx, SCMP_ACT_ALLOW, SCMP_SYS(newfstatat), 1, &empty);
		if (!ret)
			ret = sysfilter_rule(ctx, SCMP_ACT_ALLOW, SCMP_SYS(fstat), 0, NULL);
	}
	if (!ret && (special & SYSFILTER_F_TGKILL_SELF)) {
		struct scmp_arg_cmp self = SCMP_A0(SCMP_CMP_EQ, (scmp_datum_t)getpid());

		ret = sysfilter_rule(ctx, SCMP_ACT_ALLOW, SCMP_SYS(tgkill), 1, &self);
	}
	if (!ret && (special & SYSFILTER_F_KILL_CHILD) && p->child > 0) {
		struct scmp_arg_cmp child = SCMP_A0(SCMP_CMP_EQ, (scmp_datum_t)p->child);

		ret = sysfilter_rule(ctx, SCMP_ACT_ALLOW, SCMP_SYS(kill), 1, &child);
	}
	if (!ret && (special & SYSFILTER_F_SOCKET_INET)) {
		struct scmp_arg_cmp inet = SCMP_A0(SCMP_CMP_EQ, AF_INET);

		ret = sysfilter_rule(ctx, SCMP_ACT_ALLOW, SCMP_SYS(socket), 1, &inet);
	}
	if (!ret && (special & SYSFILTER_F_OPEN_WRITE)) {
		struct scmp_arg_cmp wronly = SCMP_A2(SCMP_CMP_MASKED_EQ, O_ACCMODE, O_WRONLY);

		ret = sysfilter_rule(ctx, SCMP_ACT_ALLOW, SCMP_SYS(openat), 1, &wronly);
	}
	if (!ret && (special & SYSFILTER_F_OPEN_READ)) {
		struct scmp_arg_cmp rdonly = SCMP_A2(SCMP_CMP_MASKED_EQ, O_ACCMODE, O_RDONLY);

		ret = sysfilter_rule(ctx, SCMP_ACT_ALLOW, SCMP_SYS(openat), 1, &rdonly);
	}
	if (!ret && (special & SYSFILTER_F_SOCKET_DNS)) {
		struct scmp_arg_cmp inet = SCMP_A0(SCMP_CMP_EQ, AF_INET), inet6 = SCMP_A0(SCMP_CMP_EQ, AF_INET6);
		struct scmp_arg_cmp unix_ = SCMP_A0(SCMP_CMP_EQ, AF_UNIX), nl = SCMP_A0(SCMP_CMP_EQ, AF_NETLINK);

		ret = sysfilter_rule(ctx, SCMP_ACT_ALLOW, SCMP_SYS(socket), 1, &inet);
		if (!ret)
			ret = sysfilter_rule(ctx, SCMP_ACT_ALLOW, SCMP_SYS(socket), 1, &inet6);
		if (!ret)
			ret = sysfilter_rule(ctx, SCMP_ACT_ERRNO(EACCES), SCMP_SYS(socket), 1, &unix_);
		if (!ret)
			ret = sysfilter_rule(ctx, SCMP_ACT_ERRNO(EAFNOSUPPORT), SCMP_SYS(socket), 1, &nl);
	}
	if (!ret && (special & SYSFILTER_F_EXEC_EPERM)) {
		struct scmp_arg_cmp exec = SCMP_A2(SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC);

		ret = sysfilter_rule(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(mmap), 1, &exec);
		if (!ret)
			ret = sysfilter_rule(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(mprotect), 1, &exec);
	}
	return ret;
}

static int sysfilter_add_group(scmp_filter_ctx ctx, const struct sysfilter_group *g,
			     const struct sysfilter_params *p)
{
	int ret = 0;

	for (size_t i = 0; !ret && i < g->nr_calls; i++)
		if (g->calls[i] != SCMP_SYS(ioctl) || !g->nr_ioctls)
			ret = sysfilter_rule(ctx, SCMP_ACT_ALLOW, g->calls[i], 0, NULL);
	for (size_t i = 0; !ret && i < g->nr_ioctls; i++) {
		struct scmp_arg_cmp req = SCMP_A1_32(SCMP_CMP_EQ, (uint32_t)g->ioctls[i]);

		ret = sysfilter_rule(ctx, SCMP_ACT_ALLOW, SCMP_SYS(ioctl), 1, &req);
	}
	for (size_t i = 0; !ret && i < g->nr_denied; i++)
		ret = sysfilter_rule(ctx, SCMP_ACT_ERRNO(EPERM), g->denied[i], 0, NULL);
	if (!ret)
		ret = sysfilter_add_special(ctx, g->special, p);
	return ret;
}

int sysfilter_install(enum sysfilter_role role, const struct sysfilter_params *p, char *err, size_t errlen)
{
	scmp_filter_ctx ctx = NULL;
	const char *what = "seccomp_init";
	int ret = 0;

	if (p->mode == SYSFILTER_OFF)
		return 0;
	if (role >= SYSFILTER_NR_ROLES)
		return -EINVAL;
	if (p->mode == SYSFILTER_REPORT) {
		struct sigaction sa;

		memset(&sa, 0, sizeof(sa));
		sa.sa_sigaction = sysfilter_on_sigsys;
		sa.sa_flags = SA_SIGINFO;
		sigemptyset(&sa.sa_mask);
		sysfilter_report_console = p->console_fd;
		if (sigaction(SIGSYS, &sa, NULL) < 0) {
			ret = -errno;
			what = "sigaction(SIGSYS)";
			goto out;
		}
	}
	ctx = seccomp_init(p->mode == SYSFILTER_REPORT ? SCMP_ACT_TRAP : SCMP_ACT_KILL_PROCESS);
	if (!ctx) {
		ret = -ENOMEM;
		goto out;
	}
	what = "a rule";
	for (int i = 0; !ret && i < 6 && sysfilter_roles[role][i]; i++)
		ret = sysfilter_add_group(ctx, sysfilter_roles[role][i], p);
	if (ret)
		goto out;
	what = "seccomp_load";
	ret = seccomp_load(ctx); /* also PR_SET_NO_NEW_PRIVS (libseccomp's default) */
out:
	if (ret)
		snprintf(err, errlen, "seccomp filter for the %s thread: %s: %s", sysfilter_role_name(role),
			 what, strerror(-ret));
	seccomp_release(ctx);
	return ret;
}
