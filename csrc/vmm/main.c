/* smolvm-vmm: one VM per process. Parses arguments, wires devices, runs vCPUs and the event loop. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <poll.h>
#include <stdarg.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "boot.h"
#include "daemonize.h"
#include "ctl.h"
#include "dev.h"
#include "devices.h"
#include "evloop.h"
#include "fork.h"
#include "inspect.h"
#include "jail.h"
#include "kvm.h"
#include "memcache.h"
#include "mptable.h"
#include "net_filter.h"
#include "passt.h"
#include "portfwd.h"
#include "virtio/vsock.h"
#include "proto.h"
#include "sysfilter.h"
#include "snapshot.h"
#include "vcpu.h"
#include "vm.h"

#define VMM_GUEST_CID 3
#define VMM_MAX_DISKS 4
#define VMM_MEM_MIN_MIB 64ul    /* guest memory range: smolvm/_validate.py MEMORY_MIN_MIB..MEMORY_MAX_MIB */
#define VMM_MEM_MAX_MIB 65536ul

/*
 * The jail's limits (jail.h). Fds the running VMM may still open beyond those open at
 * jail time: every vsock connection (host clients and forwarded ones) and the one it
 * refuses, every forward's listener, the control connections, each vCPU's /proc status,
 * a capture's files, and headroom. Address space beyond that in use at jail time: a
 * stack and a malloc arena for each thread to come, the vsock buffers, and slack.
 */
#define VMM_NOFILE_RUNTIME (VSOCK_MAX_CONNS + 1 + PORTFWD_MAX + CTL_MAX_CONNS + VM_MAX_VCPUS + 16 + 64)
#define VMM_AS_PER_THREAD (128ull << 20)
#define VMM_AS_SLACK ((uint64_t)VSOCK_MAX_CONNS * VSOCK_BUF_ALLOC + (512ull << 20))

struct vmm_args {
	const char *kernel, *initrd, *cmdline, *vsock_uds, *console, *restore, *ctl_listen, *inspect;
	const char *memory_cache, *memory_extents; /* --restore: memcache.h (nested profile) */
	int daemonize, xstate_port, no_dirty_log, fork_verify;
	int no_jail; /* --no-jail (debugging only): no jail.h */
	enum sysfilter_mode seccomp; /* SYSFILTER_KILL unless --no-seccomp / --seccomp-report */
	unsigned long mem_mib, vcpus;
	int ctl_fd;
	int nr_disks;
	char *disks[VMM_MAX_DISKS]; /* "PATH" or "PATH,ro" */
	int nr_passt;
	char *passt[PASST_MAX_ARGS]; /* --net-passt: passt's path, then its arguments; any = a NIC */
	struct netf *filter;         /* --net-filter and its --net-allow-*, --net-host: the egress policy */
};

struct vmm {
	struct vm vm;
	struct vmm_args a;
	struct dev_table devs; /* every device: save, restore and teardown walk it */
	struct vsock *vsock;   /* in devs; the port forwards and the ready signal use it */
	struct portfwd *fwd;
	int sig_fd;
	int paused; /* paused by a PAUSE command */
	struct fork_state fork; /* pages written since restore, for FORK (fork.h) */
	pid_t passt; /* the network backend, or -1 */
	int status_fd; /* the loop thread's /proc/thread-self/status, opened before its filter */
	int limits_fd; /* /proc/self/limits, likewise */
	int fd_dir;    /* /proc/self/fd, likewise: STATUS lists the open fds */
	struct jail jail;
	struct ctl *ctl;
};

static uint64_t vmm_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void vmm_usage(void)
{
	fprintf(stderr, "usage: smolvm-vmm (--kernel PATH [--initrd PATH] --cmdline STR --mem-mib N "
			"--vcpus N | --restore SNAPSHOT_DIR [--memory-cache FILE --memory-extents FILE]) --vsock-uds PATH --console PATH --ctl-fd N "
			"[--ctl-listen PATH] [--daemonize] [--disk PATH[,ro]]... [--xstate-port] "
			"[--net-passt PASST [--net-passt ARG]...] [--net-filter [--net-allow-domain NAME|*.NAME]... "
			"[--net-allow-cidr A.B.C.D/N]... [--net-host NAME=A.B.C.D]...] [--no-dirty-log] [--fork-verify] "
			"[--no-seccomp | --seccomp-report] [--no-jail]\n"
			"       smolvm-vmm --inspect SNAPSHOT_DIR_OR_FILE   (its checks and header as JSON; no KVM)\n");
}

/* A whole decimal number in [lo, hi] (no sign, no trailing characters) into *out; -EINVAL with a message otherwise. */
static int vmm_parse_count(const char *opt, const char *s, unsigned long lo, unsigned long hi, unsigned long *out)
{
	unsigned long v;
	char *end;

	errno = 0;
	v = strtoul(s, &end, 10);
	if (errno || end == s || *end || s[0] < '0' || s[0] > '9' || v < lo || v > hi) {
		fprintf(stderr, "smolvm-vmm: %s %s: want a whole number from %lu to %lu\n", opt, s, lo, hi);
		return -EINVAL;
	}
	*out = v;
	return 0;
}

/* One --net-filter / --net-allow-domain / --net-allow-cidr / --net-host into a->filter; -EINVAL with a message. */
static int vmm_parse_policy(struct vmm_args *a, int opt, const char *val)
{
	int ret = 0;

	if (!a->filter && netf_new(&a->filter) < 0) {
		fprintf(stderr, "smolvm-vmm: out of memory\n");
		return -ENOMEM;
	}
	if (opt == 'D')
		ret = netf_add_domain(a->filter, val);
	else if (opt == 'C')
		ret = netf_add_cidr(a->filter, val);
	else if (opt == 'H')
		ret = netf_add_host(a->filter, val);
	if (ret)
		fprintf(stderr, "smolvm-vmm: %s %s: %s\n",
			opt == 'D' ? "--net-allow-domain" : opt == 'C' ? "--net-allow-cidr" : "--net-host", val,
			ret == -E2BIG ? "too many entries" : opt == 'D' ? "want NAME or *.NAME" :
			opt == 'C' ? "want A.B.C.D/N" : "want NAME=A.B.C.D");
	return ret;
}

static int vmm_parse(int argc, char **argv, struct vmm_args *a)
{
	static const struct option opts[] = {
		{ "kernel", required_argument, NULL, 'k' },
		{ "initrd", required_argument, NULL, 'i' },
		{ "cmdline", required_argument, NULL, 'c' },
		{ "mem-mib", required_argument, NULL, 'm' },
		{ "vcpus", required_argument, NULL, 'n' },
		{ "vsock-uds", required_argument, NULL, 'u' },
		{ "console", required_argument, NULL, 'o' },
		{ "ctl-fd", required_argument, NULL, 'f' },
		{ "restore", required_argument, NULL, 'r' },
		{ "ctl-listen", required_argument, NULL, 'l' },
		{ "daemonize", no_argument, NULL, 'd' },
		{ "xstate-port", no_argument, NULL, 'x' },
		{ "disk", required_argument, NULL, 'b' },
		{ "net-passt", required_argument, NULL, 'p' },
		{ "net-filter", no_argument, NULL, 'F' },
		{ "net-allow-domain", required_argument, NULL, 'D' },
		{ "net-allow-cidr", required_argument, NULL, 'C' },
		{ "net-host", required_argument, NULL, 'H' },
		{ "inspect", required_argument, NULL, 'I' },
		{ "no-dirty-log", no_argument, NULL, 'L' },
		{ "fork-verify", no_argument, NULL, 'V' },
		{ "no-seccomp", no_argument, NULL, 'S' },     /* debugging only: no filters */
		{ "seccomp-report", no_argument, NULL, 'R' }, /* debugging: name a forbidden call, exit 159 */
		{ "no-jail", no_argument, NULL, 'J' },        /* debugging only: no jail (jail.h) */
		{ "memory-cache", required_argument, NULL, 'M' },
		{ "memory-extents", required_argument, NULL, 'E' },
		{ NULL, 0, NULL, 0 },
	};
	int c;

	memset(a, 0, sizeof(*a));
	a->cmdline = "";
	a->mem_mib = 512;
	a->vcpus = 1;
	a->ctl_fd = -1;
	while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (c) {
		case 'k': a->kernel = optarg; break;
		case 'i': a->initrd = optarg; break;
		case 'c': a->cmdline = optarg; break;
		case 'm':
			if (vmm_parse_count("--mem-mib", optarg, VMM_MEM_MIN_MIB, VMM_MEM_MAX_MIB, &a->mem_mib) < 0)
				return -EINVAL;
			break;
		case 'n':
			if (vmm_parse_count("--vcpus", optarg, 1, VM_MAX_VCPUS, &a->vcpus) < 0)
				return -EINVAL;
			break;
		case 'u': a->vsock_uds = optarg; break;
		case 'o': a->console = optarg; break;
		case 'f': a->ctl_fd = atoi(optarg); break;
		case 'r': a->restore = optarg; break;
		case 'l': a->ctl_listen = optarg; break;
		case 'd': a->daemonize = 1; break;
		case 'x': a->xstate_port = 1; break;
		case 'b':
			if (a->nr_disks >= VMM_MAX_DISKS)
				return -E2BIG;
			a->disks[a->nr_disks++] = optarg;
			break;
		case 'I': a->inspect = optarg; break;
		case 'L': a->no_dirty_log = 1; break;
		case 'V': a->fork_verify = 1; break;
		case 'S': a->seccomp = SYSFILTER_OFF; break;
		case 'R': a->seccomp = SYSFILTER_REPORT; break;
		case 'J': a->no_jail = 1; break;
		case 'M': a->memory_cache = optarg; break;
		case 'E': a->memory_extents = optarg; break;
		case 'p':
			if (a->nr_passt >= PASST_MAX_ARGS)
				return -E2BIG;
			a->passt[a->nr_passt++] = optarg;
			break;
		case 'F':
		case 'D':
		case 'C':
		case 'H':
			if (vmm_parse_policy(a, c, optarg) < 0)
				return -EINVAL;
			break;
		default: return -EINVAL;
		}
	}
	if (a->filter && !a->nr_passt) {
		fprintf(stderr, "smolvm-vmm: --net-filter needs a NIC (--net-passt)\n");
		return -EINVAL;
	}
	if (a->inspect)
		return optind == argc ? 0 : -EINVAL;
	if ((!a->kernel && !a->restore) || !a->vsock_uds)
		return -EINVAL;
	return 0;
}

static void vmm_log(struct vmm *v, const char *key, uint64_t value)
{
	if (v->vm.console_fd >= 0)
		dprintf(v->vm.console_fd, "smolvm-vmm: %s=%llu\n", key, (unsigned long long)value);
}

static void vmm_on_ready(void *opaque)
{
	struct vmm *v = opaque;

	vmm_log(v, "t_ready_us", (vmm_now_ns() - v->vm.t_start_ns) / 1000);
	ctl_notify(v->ctl, "READY");
}

/* A capture's start: the VM paused (unless a PAUSE holds it already), the devices' state in devs. */
static int vmm_capture_begin(struct vmm *v, struct snap_writer *devs, char *err, size_t errlen)
{
	int ret = v->paused ? 0 : vm_pause(&v->vm);

	if (ret) {
		snprintf(err, errlen, "pause failed: %s", strerror(-ret));
		return ret;
	}
	dev_save_all(&v->devs, devs);
	return 0;
}

/* A capture's end: devs freed, the VM running again unless a PAUSE holds it. */
static void vmm_capture_end(struct vmm *v, struct snap_writer *devs)
{
	free(devs->buf);
	if (!v->paused)
		vm_resume(&v->vm);
}

/* Save the paused VM: KVM state, devices, memory. Loop thread, so devices are quiet. */
static int vmm_snapshot(struct vmm *v, const char *dir, char *err, size_t errlen)
{
	struct snap_writer devs = { 0 };
	uint64_t t0 = vmm_now_ns();
	int ret;

	ret = vmm_capture_begin(v, &devs, err, errlen);
	if (ret)
		return ret;
	ret = snapshot_save(&v->vm, dir, &devs, err, errlen);
	vmm_capture_end(v, &devs);
	vmm_log(v, "t_snapshot_us", (vmm_now_ns() - t0) / 1000);
	return ret;
}

/* Capture the VM for forks (fork.h): layered over the memory file it was restored from when it can. */
static int vmm_fork(struct vmm *v, const char *dir, struct fork_stats *st, char *err, size_t errlen)
{
	struct snap_writer devs = { 0 };
	int ret;

	ret = vmm_capture_begin(v, &devs, err, errlen);
	if (ret)
		return ret;
	ret = fork_capture(&v->fork, &v->vm, dir, &devs, st, err, errlen);
	vmm_capture_end(v, &devs);
	vmm_log(v, "t_fork_us", st->t_us);
	return ret;
}

/* Append printf output to out[*used..len): 0 or -ENOSPC. */
static int vmm_put(char *out, size_t len, size_t *used, const char *fmt, ...)
{
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(out + *used, len - *used, fmt, ap);
	va_end(ap);
	if (n < 0 || (size_t)n >= len - *used)
		return -ENOSPC;
	*used += (size_t)n;
	return 0;
}

/* The value of "key:" in a /proc status text buf (NUL-terminated), as [*val, *end), or NULL. */
static char *vmm_field(char *buf, const char *key, char **end)
{
	size_t kl = strlen(key);
	char *p = buf, *val;

	while (p && (strncmp(p, key, kl) || p[kl] != ':'))
		p = (p = strchr(p, '\n')) ? p + 1 : NULL;
	if (!p)
		return NULL;
	val = p + kl + 1;
	val += strspn(val, " \t");
	*end = val + strcspn(val, "\n");
	return val;
}

/* One pread of fd from offset 0 into buf (NUL-terminated). 0 or -errno. */
static int vmm_pread_text(int fd, char *buf, size_t len)
{
	ssize_t n = fd < 0 ? -1 : pread(fd, buf, len - 1, 0);

	if (n < 0)
		return fd < 0 ? -ENOENT : -errno;
	buf[n] = 0;
	return 0;
}

/* " Rlimit<Name>=soft,hard" of each limit the jail sets, from /proc/self/limits. */
static int vmm_status_limits(struct vmm *v, char *out, size_t len, size_t *used)
{
	static const char *const rows[][2] = {
		{ "Max open files", "Nofile" }, { "Max core file size", "Core" }, { "Max address space", "As" },
	};
	char buf[4096], soft[32], hard[32];
	int ret = vmm_pread_text(v->limits_fd, buf, sizeof(buf));

	for (size_t i = 0; !ret && i < sizeof(rows) / sizeof(rows[0]); i++) {
		char *p = strstr(buf, rows[i][0]);

		if (!p || sscanf(p + strlen(rows[i][0]), " %31s %31s", soft, hard) != 2)
			continue;
		ret = vmm_put(out, len, used, " Rlimit%s=%s,%s", rows[i][1], soft, hard);
	}
	return ret;
}

/* " Fds=0,1,2,..." (the numbers of the open fds, the listing's own left out), from /proc/self/fd. */
static int vmm_status_fds(struct vmm *v, char *out, size_t len, size_t *used)
{
	char buf[4096];
	int first = 1, ret = 0;
	long n;

	if (v->fd_dir < 0 || lseek(v->fd_dir, 0, SEEK_SET) < 0)
		return v->fd_dir < 0 ? -ENOENT : -errno;
	ret = vmm_put(out, len, used, " Fds=");
	while (!ret && (n = syscall(SYS_getdents64, v->fd_dir, buf, sizeof(buf))) > 0) {
		for (long off = 0; !ret && off < n;) {
			struct dirent64 *e = (struct dirent64 *)(buf + off);

			off += e->d_reclen;
			if (e->d_name[0] < '0' || e->d_name[0] > '9' || atoi(e->d_name) == v->fd_dir)
				continue;
			ret = vmm_put(out, len, used, "%s%s", first ? "" : ",", e->d_name);
			first = 0;
		}
	}
	return ret ? ret : n < 0 ? -errno : 0;
}

/*
 * "Name=value ..." of how the VMM is confined, as it reads it itself through fds
 * opened before the filters (the host cannot see the VMM's /proc in the nested
 * profile): the loop thread's Seccomp, NoNewPrivs, capability sets, Uid, Gid and
 * Threads from /proc/thread-self/status, then each vCPU thread's Seccomp as
 * vcpuN.Seccomp, the resolver thread's (if any) Seccomp, NoNewPrivs and capability
 * sets as resolver.Seccomp ..., then the jail: Jail (what it did, or "off"), JailSkipped (what
 * it could not do, and why), NsIpc/NsUts and the caller's NsIpcCaller/NsUtsCaller
 * (namespace inodes), Fds (the open fds) and the Rlimit* it set, from
 * /proc/self/limits. Returns 0 or -errno.
 */
static int vmm_status(struct vmm *v, char *out, size_t len)
{
	static const char *const keys[] = { "Seccomp", "NoNewPrivs", "CapEff", "CapPrm", "CapInh", "CapBnd",
					    "CapAmb", "Uid", "Gid", "Threads" };
	char buf[4096], who[24] = "";
	size_t used = 0;
	int ret = 0;

	out[0] = 0;
	/* t: -1 the loop thread (every key), 0.. each vCPU (Seccomp), then the resolver if any (Seccomp..CapBnd) */
	for (int t = -1; !ret && t <= v->vm.nr_vcpus; t++) {
		int fd = t < 0 ? v->status_fd : t < v->vm.nr_vcpus ? v->vm.vcpus[t]->status_fd : v->vm.resolver_status_fd;
		size_t nkeys = t < 0 ? sizeof(keys) / sizeof(keys[0]) : t < v->vm.nr_vcpus ? 1 : 6;

		if (t == v->vm.nr_vcpus && fd < 0)
			break; /* no NIC with an egress policy: no resolver thread */
		if (t >= 0 && t < v->vm.nr_vcpus)
			snprintf(who, sizeof(who), "vcpu%d.", t);
		else if (t >= 0)
			snprintf(who, sizeof(who), "resolver.");
		ret = vmm_pread_text(fd, buf, sizeof(buf));
		for (size_t k = 0; !ret && k < nkeys; k++) {
			char *end, *val = vmm_field(buf, keys[k], &end);

			if (!val)
				continue;
			for (char *c = val; c < end; c++)
				if (*c == '\t' || *c == ' ')
					*c = ','; /* Uid:	0	0	0	0 -> 0,0,0,0 */
			ret = vmm_put(out, len, &used, "%s%s%s=%.*s", used ? " " : "", who, keys[k], (int)(end - val),
				      val);
		}
	}
	if (!ret)
		ret = vmm_put(out, len, &used, " Jail=%s JailSkipped=%s NsIpc=%lu NsUts=%lu NsIpcCaller=%lu NsUtsCaller=%lu",
			      !v->jail.on ? "off" : v->jail.done[0] ? v->jail.done : "-",
			      v->jail.skipped[0] ? v->jail.skipped : "-", v->jail.ns_ipc, v->jail.ns_uts,
			      v->jail.ns_ipc_caller, v->jail.ns_uts_caller);
	if (!ret)
		ret = vmm_status_fds(v, out, len, &used);
	if (!ret)
		ret = vmm_status_limits(v, out, len, &used);
	return ret;
}

/*
 * One control command: PING, PAUSE, RESUME, SNAPSHOT <dir>, FORK <dir>, DETACH (outlive
 * the owner), STOP, FWD ADD|DEL|LIST (csrc/vmm/portfwd.h), STATUS (vmm_status()), RUSAGE.
 * Answers OK [value] or
 * ERR <why> on the asking connection.
 */
static void vmm_on_command(void *opaque, struct ctl_conn *conn, char *line)
{
	struct vmm *v = opaque;
	char err[300] = "";
	int ret = 0;

	if (!strcmp(line, "PING")) {
		ret = 0;
	} else if (!strcmp(line, "PAUSE")) {
		if (!v->paused)
			ret = vm_pause(&v->vm);
		if (!ret)
			v->paused = 1;
		else
			snprintf(err, sizeof(err), "pause failed: %s", strerror(-ret));
	} else if (!strcmp(line, "RESUME")) {
		if (v->paused)
			vm_resume(&v->vm);
		v->paused = 0;
	} else if (!strncmp(line, "SNAPSHOT ", 9) && line[9] == '/') {
		ret = vmm_snapshot(v, line + 9, err, sizeof(err));
	} else if (!strncmp(line, "FORK ", 5) && line[5] == '/') {
		struct fork_stats st;

		ret = vmm_fork(v, line + 5, &st, err, sizeof(err));
		if (!ret) {
			/* OK layered|full pages=N missed=N|- us=N log=N link=N overlay=N state=N [why a full capture] */
			char missed[24] = "-";

			if (st.missed != UINT64_MAX)
				snprintf(missed, sizeof(missed), "%llu", (unsigned long long)st.missed);
			ctl_reply(conn, "OK %s pages=%llu missed=%s us=%llu log=%llu link=%llu overlay=%llu state=%llu%s%s",
				  st.layered ? "layered" : "full", (unsigned long long)st.pages, missed,
				  (unsigned long long)st.t_us, (unsigned long long)st.t_log_us,
				  (unsigned long long)st.t_link_us, (unsigned long long)st.t_overlay_us,
				  (unsigned long long)st.t_state_us, st.layered ? "" : " ",
				  st.layered ? "" : v->fork.why);
			return;
		}
	} else if (!strncmp(line, "FWD ", 4)) {
		char out[PORTFWD_MAX * 12 + 1];

		ret = portfwd_command(v->fwd, line + 4, out, sizeof(out));
		if (!ret) {
			ctl_reply(conn, "OK%s%s", out[0] ? " " : "", out);
			return;
		}
	} else if (!strcmp(line, "RUSAGE")) {
		struct rusage ru;

		/* the whole VMM (vCPU threads' guest time included), for benchmarks/bench_net.py */
		getrusage(RUSAGE_SELF, &ru);
		ctl_reply(conn, "OK %lld %lld",
			  (long long)ru.ru_utime.tv_sec * 1000000 + ru.ru_utime.tv_usec,
			  (long long)ru.ru_stime.tv_sec * 1000000 + ru.ru_stime.tv_usec);
		return;
	} else if (!strcmp(line, "STATUS")) {
		char out[3800]; /* a control line holds 4096 bytes: up to ~340 fds with the rest */

		ret = vmm_status(v, out, sizeof(out));
		if (!ret) {
			ctl_reply(conn, "OK %s", out);
			return;
		}
#ifdef SMOLVM_TEST_HOOKS
	} else if (!strcmp(line, "TEST FORBIDDEN-SYSCALL")) {
		syscall(SYS_getppid); /* test builds only: no filter allows it, so the VMM dies here */
#endif
	} else if (!strcmp(line, "DETACH")) {
		ctl_detach(v->ctl);
	} else if (!strcmp(line, "STOP")) {
		ctl_reply(conn, "OK");
		vm_request_exit(&v->vm, VM_EXIT_STOPPED, "stopped on request");
		return;
	} else {
		ret = -EINVAL;
		snprintf(err, sizeof(err), "unknown command");
	}
	if (ret)
		ctl_reply(conn, "ERR %s", err[0] ? err : strerror(-ret));
	else
		ctl_reply(conn, "OK");
}

static void vmm_on_owner_gone(void *opaque)
{
	struct vmm *v = opaque;

	vm_request_exit(&v->vm, VM_EXIT_STOPPED, "owner closed the control socket");
}

static void vmm_on_signal(void *opaque, int fd, uint32_t revents)
{
	struct vmm *v = opaque;
	struct signalfd_siginfo si;

	(void)revents;
	if (read(fd, &si, sizeof(si)) == (ssize_t)sizeof(si))
		vm_request_exit(&v->vm, VM_EXIT_STOPPED, "VMM got a termination signal");
}

#define VMM_FAIL(ret_, ...)                                                                    \
	do {                                                                                   \
		snprintf(vm->exit_msg, sizeof(vm->exit_msg), __VA_ARGS__);                     \
		ret = (ret_);                                                                  \
		goto out;                                                                      \
	} while (0)

static int vmm_setup(struct vmm *v, char *cmdline, size_t cmdline_len)
{
	struct vm *vm = &v->vm;
	struct snap_reader snap = { 0 };
	struct snap_vm_info info = { (uint64_t)v->a.mem_mib << 20, (uint32_t)v->a.vcpus, 0 };
	struct boot_info bi;
	sigset_t ss;
	int ret, mem_fd = -1, cache_fd = -1;

	vm->console_fd = v->a.console
		? open(v->a.console, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600) : -1;
	if (v->a.restore) {
		ret = snapshot_open(v->a.restore, &snap, &info, vm->exit_msg, sizeof(vm->exit_msg));
		if (ret)
			goto out;
		mem_fd = snapshot_memory_fd(v->a.restore, vm->exit_msg, sizeof(vm->exit_msg));
		if (mem_fd < 0) {
			ret = mem_fd;
			goto out;
		}
		if (v->a.memory_cache) {
			char why[512];
			uint64_t t0 = vmm_now_ns();

			cache_fd = memcache_open(v->a.memory_cache, v->a.memory_extents, mem_fd, why,
						 sizeof(why));
			if (cache_fd < 0)
				fprintf(stderr, "smolvm-vmm: mapping the snapshot's memory directly: %s\n", why);
			else
				vmm_log(v, "t_memcache_us", (vmm_now_ns() - t0) / 1000);
		}
	}
	ret = kvm_vm_create(vm, info.mem_size, cache_fd >= 0 ? -1 : mem_fd);
	if (ret)
		goto out;
	if (cache_fd >= 0) {
		ret = memcache_map(vm, cache_fd, vm->exit_msg, sizeof(vm->exit_msg));
		if (ret)
			goto out;
	}
	if (v->a.restore) {
		v->fork.verify = v->a.fork_verify;
		ret = fork_restore(&v->fork, vm, &snap, v->a.restore, mem_fd, !v->a.no_dirty_log,
				   vm->exit_msg, sizeof(vm->exit_msg));
		if (ret)
			goto out;
	} else {
		snprintf(v->fork.why, sizeof(v->fork.why), "the VM was booted, not restored");
	}
	vm->xstate_port = v->a.xstate_port;
	vm->seccomp_mode = (int)v->a.seccomp;
	ret = evloop_new(&vm->loop);
	if (ret)
		VMM_FAIL(ret, "io_uring setup: %s", strerror(-ret));
	ret = devices_add_legacy(&v->devs, vm, vm->console_fd, vm->exit_msg, sizeof(vm->exit_msg));
	if (ret)
		goto out;
	{
		struct vsock_config vc = {
			.guest_cid = VMM_GUEST_CID, .uds_path = v->a.vsock_uds, .on_ready = vmm_on_ready,
			.opaque = v,
		};

		ret = devices_add_vsock(&v->devs, vm, &vc, &v->vsock, vm->exit_msg, sizeof(vm->exit_msg));
		if (ret)
			goto out;
	}
	ret = portfwd_new(vm->loop, v->vsock, &v->fwd);
	if (ret)
		VMM_FAIL(ret, "port forwards: %s", strerror(-ret));
	for (int i = 0; i < v->a.nr_disks; i++) {
		ret = devices_add_disk(&v->devs, vm, i, v->a.disks[i], vm->exit_msg, sizeof(vm->exit_msg));
		if (ret)
			goto out;
	}
	if (v->a.nr_passt) {
		ret = devices_add_net(&v->devs, vm, v->a.passt, v->a.nr_passt, &v->a.filter, &v->passt, vm->exit_msg,
				      sizeof(vm->exit_msg));
		if (ret)
			goto out;
	}
	if (v->a.restore) {
		ret = dev_restore_all(&v->devs, &snap, v->a.restore, vm->exit_msg, sizeof(vm->exit_msg));
		if (ret)
			goto out;
	} else {
		if ((size_t)snprintf(cmdline, cmdline_len, "%s", v->a.cmdline) >= cmdline_len ||
		    dev_cmdline(&v->devs, cmdline, cmdline_len))
			VMM_FAIL(-E2BIG, "kernel command line too long");
		ret = boot_load(vm, v->a.kernel, v->a.initrd, cmdline, &bi, vm->exit_msg,
				sizeof(vm->exit_msg));
		if (ret)
			goto out;
		ret = mptable_write(vm, (int)info.nr_vcpus);
		if (ret)
			VMM_FAIL(ret, "MP table: %s", strerror(-ret));
	}
	for (uint32_t i = 0; i < info.nr_vcpus; i++) {
		ret = vcpu_create(vm, (int)i, &vm->vcpus[i]);
		if (ret)
			VMM_FAIL(ret, "vCPU %u: %s", i, strerror(-ret));
		vm->nr_vcpus++;
	}
	if (v->a.restore)
		ret = snapshot_restore_kvm(vm, &snap, vm->exit_msg, sizeof(vm->exit_msg));
	else if ((ret = vcpu_setup_long_mode(vm->vcpus[0], bi.entry, bi.zero_page, bi.pml4,
					       bi.gdt, bi.gdt_limit)))
		snprintf(vm->exit_msg, sizeof(vm->exit_msg), "boot registers: %s", strerror(-ret));
	if (ret)
		goto out;

	sigemptyset(&ss);
	sigaddset(&ss, SIGTERM);
	sigaddset(&ss, SIGINT);
	sigaddset(&ss, SIGHUP);
	pthread_sigmask(SIG_BLOCK, &ss, NULL); /* vCPU threads inherit the mask */
	v->sig_fd = signalfd(-1, &ss, SFD_CLOEXEC | SFD_NONBLOCK);
	if (v->sig_fd >= 0)
		evloop_add(vm->loop, v->sig_fd, POLLIN, vmm_on_signal, v);
	if (v->a.ctl_fd >= 0)
		fcntl(v->a.ctl_fd, F_SETFD, FD_CLOEXEC);
	ret = ctl_new(vm->loop, v->a.ctl_fd, v->a.ctl_listen, vmm_on_command, vmm_on_owner_gone, v,
		      &v->ctl);
	if (ret)
		VMM_FAIL(ret, "control socket %s: %s", v->a.ctl_listen ? v->a.ctl_listen : "",
			 strerror(-ret));
out:
	if (cache_fd >= 0)
		close(cache_fd);
	if (mem_fd >= 0)
		close(mem_fd);
	snapshot_reader_free(&snap);
	return ret;
}
#undef VMM_FAIL

/*
 * After set-up: the jail (jail.h), then the vCPU threads (which inherit it and load
 * their own filters before their first KVM_RUN), a restored VM's devices reset, and
 * last the loop thread's seccomp filter. The /proc files STATUS reads are opened
 * first, while open() is allowed.
 */
static int vmm_start(struct vmm *v)
{
	struct vm *vm = &v->vm;
	struct sysfilter_params p = { v->a.seccomp, v->passt, vm->console_fd };
	uint64_t as = 0;
	int ret;

	v->status_fd = open("/proc/thread-self/status", O_RDONLY | O_CLOEXEC);
	v->limits_fd = open("/proc/self/limits", O_RDONLY | O_CLOEXEC);
	v->fd_dir = open("/proc/self/fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
#if !defined(__SANITIZE_ADDRESS__)
	as = (uint64_t)(vm->nr_vcpus + 1) * VMM_AS_PER_THREAD + VMM_AS_SLACK; /* ASan reserves terabytes */
#endif
	ret = jail_enter(&v->jail, VMM_NOFILE_RUNTIME, as, vm->exit_msg, sizeof(vm->exit_msg));
	if (ret)
		return ret;
	for (int i = 0; i < vm->nr_vcpus; i++) {
		ret = vcpu_start(vm->vcpus[i]);
		if (ret) {
			snprintf(vm->exit_msg, sizeof(vm->exit_msg), "vCPU thread: %s", strerror(-ret));
			return ret;
		}
	}
	if (v->a.restore) {
		/* Host-side state the snapshot could not carry is dropped (the vsock device's
		 * connections); then the agent, listening at snapshot time, is ready. */
		ret = dev_reset_all(&v->devs, vm->exit_msg, sizeof(vm->exit_msg));
		if (ret)
			return ret;
		vmm_log(v, "t_restore_us", (vmm_now_ns() - vm->t_start_ns) / 1000);
		vmm_on_ready(v);
	}
	return sysfilter_install(SYSFILTER_ROLE_LOOP, &p, vm->exit_msg, sizeof(vm->exit_msg));
}

static const char *vmm_reason(int r)
{
	switch (r) {
	case VM_EXIT_RESET: return "reset";
	case VM_EXIT_SHUTDOWN: return "shutdown";
	case VM_EXIT_STOPPED: return "stopped";
	default: return "error";
	}
}

int main(int argc, char **argv)
{
	static struct vmm v; /* large; one per process */
	char *cmdline = NULL;
	int ret, status = 1;

	v.vm.t_start_ns = vmm_now_ns();
	v.sig_fd = -1;
	v.fork.base_fd = -1;
	v.fork.pagemap_fd = -1;
	v.passt = -1;
	v.status_fd = -1;
	v.limits_fd = -1;
	v.fd_dir = -1;
	v.vm.resolver_status_fd = -1;
	signal(SIGPIPE, SIG_IGN);
	/* No core files: they would hold guest memory, and a seccomp kill (SIGSYS) dumps core. */
	setrlimit(RLIMIT_CORE, &(struct rlimit){ 0, 0 });
	if (vmm_parse(argc, argv, &v.a)) {
		vmm_usage();
		return 2;
	}
	if (v.a.inspect)
		return inspect_snapshot(v.a.inspect, stdout) ? 1 : 0;
	if (v.a.daemonize && daemonize() < 0)
		return 1;
	if (v.a.ctl_fd >= 0)
		dprintf(v.a.ctl_fd, "PID %d\n", (int)getpid());
	if (vcpu_signals_init() < 0)
		return 1;
	cmdline = malloc(8192);
	if (!cmdline)
		return 1;
	v.jail.on = !v.a.no_jail;
	v.vm.jail = &v.jail;
	ret = jail_early(&v.jail, v.a.ctl_fd, v.vm.exit_msg, sizeof(v.vm.exit_msg));
	if (!ret)
		ret = vmm_setup(&v, cmdline, 8192);
	if (!ret)
		ret = vmm_start(&v);
	if (ret) {
		if (!v.vm.exit_msg[0])
			snprintf(v.vm.exit_msg, sizeof(v.vm.exit_msg), "%s", strerror(-ret));
		v.vm.exit_reason = VM_EXIT_ERROR;
	} else {
		vmm_log(&v, "t_setup_us", (vmm_now_ns() - v.vm.t_start_ns) / 1000);
		ret = evloop_run(v.vm.loop);
		if (ret && v.vm.exit_reason == VM_RUNNING)
			vm_request_exit(&v.vm, VM_EXIT_ERROR, "event loop failed");
		status = v.vm.exit_reason == VM_EXIT_ERROR ? 1 : 0;
	}
	/* Stop vCPUs before devices go away. */
	for (int i = 0; i < v.vm.nr_vcpus; i++)
		vcpu_kick(v.vm.vcpus[i]);
	if (v.vm.console_fd >= 0)
		dprintf(v.vm.console_fd, "\nsmolvm-vmm: exit %s: %s\n", vmm_reason(v.vm.exit_reason),
			v.vm.exit_msg);
	if (v.ctl)
		ctl_notify(v.ctl, "EXIT %s %s", vmm_reason(v.vm.exit_reason), v.vm.exit_msg);
	else if (v.a.ctl_fd >= 0)
		dprintf(v.a.ctl_fd, "EXIT %s %s\n", vmm_reason(v.vm.exit_reason), v.vm.exit_msg);
	for (int i = 0; i < v.vm.nr_vcpus; i++) {
		vcpu_destroy(v.vm.vcpus[i]);
		v.vm.vcpus[i] = NULL;
	}
	v.vm.nr_vcpus = 0;
	ctl_free(v.ctl);
	portfwd_free(v.fwd);
	dev_free_all(&v.devs);
	netf_free(v.a.filter); /* NULL once the NIC took it */
	v.vsock = NULL;
	kvm_vm_destroy(&v.vm);
	fork_free(&v.fork, &v.vm);
	evloop_free(v.vm.loop);
	if (v.sig_fd >= 0)
		close(v.sig_fd);
	if (v.status_fd >= 0)
		close(v.status_fd);
	if (v.limits_fd >= 0)
		close(v.limits_fd);
	if (v.fd_dir >= 0)
		close(v.fd_dir);
	if (v.vm.resolver_status_fd >= 0)
		close(v.vm.resolver_status_fd);
	free(cmdline);
	return status;
}
