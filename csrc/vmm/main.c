/* smolvm-vmm: one VM per process. Parses arguments, wires devices, runs vCPUs and the event loop. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <poll.h>
#include <stdarg.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <time.h>
#include <unistd.h>

#include "boot.h"
#include "daemonize.h"
#include "ctl.h"
#include "dev.h"
#include "devices.h"
#include "evloop.h"
#include "inspect.h"
#include "kvm.h"
#include "memcache.h"
#include "mptable.h"
#include "passt.h"
#include "portfwd.h"
#include "virtio/vsock.h"
#include "proto.h"
#include "snapshot.h"
#include "vcpu.h"
#include "vm.h"

#define VMM_GUEST_CID 3
#define VMM_MAX_DISKS 4
#define VMM_MEM_MIN_MIB 64ul    /* guest memory range: smolvm/_validate.py MEMORY_MIN_MIB..MEMORY_MAX_MIB */
#define VMM_MEM_MAX_MIB 65536ul

struct vmm_args {
	const char *kernel, *initrd, *cmdline, *vsock_uds, *console, *restore, *ctl_listen, *inspect;
	const char *memory_cache, *memory_extents; /* --restore: memcache.h (nested profile) */
	int daemonize, xstate_port;
	unsigned long mem_mib, vcpus;
	int ctl_fd;
	int nr_disks;
	char *disks[VMM_MAX_DISKS]; /* "PATH" or "PATH,ro" */
	int nr_passt;
	char *passt[PASST_MAX_ARGS]; /* --net-passt: passt's path, then its arguments; any = a NIC */
};

struct vmm {
	struct vm vm;
	struct vmm_args a;
	struct dev_table devs; /* every device: save, restore and teardown walk it */
	struct vsock *vsock;   /* in devs; the port forwards and the ready signal use it */
	struct portfwd *fwd;
	int sig_fd;
	int paused; /* paused by a PAUSE command */
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
			"[--net-passt PASST [--net-passt ARG]...]\n"
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
		{ "inspect", required_argument, NULL, 'I' },
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
		case 'M': a->memory_cache = optarg; break;
		case 'E': a->memory_extents = optarg; break;
		case 'p':
			if (a->nr_passt >= PASST_MAX_ARGS)
				return -E2BIG;
			a->passt[a->nr_passt++] = optarg;
			break;
		default: return -EINVAL;
		}
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

/* Save the paused VM: KVM state, devices, memory. Loop thread, so devices are quiet. */
static int vmm_snapshot(struct vmm *v, const char *dir, char *err, size_t errlen)
{
	struct snap_writer devs = { 0 };
	uint64_t t0 = vmm_now_ns();
	int ret;

	if (!v->paused) {
		ret = vm_pause(&v->vm);
		if (ret) {
			snprintf(err, errlen, "pause failed: %s", strerror(-ret));
			return ret;
		}
	}
	dev_save_all(&v->devs, &devs);
	ret = snapshot_save(&v->vm, dir, &devs, err, errlen);
	free(devs.buf);
	if (!v->paused)
		vm_resume(&v->vm);
	vmm_log(v, "t_snapshot_us", (vmm_now_ns() - t0) / 1000);
	return ret;
}

/*
 * One control command: PING, PAUSE, RESUME, SNAPSHOT <dir>, DETACH (outlive
 * the owner), STOP, FWD ADD|DEL|LIST (csrc/vmm/portfwd.h). Answers OK [value] or
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
	} else if (!strncmp(line, "FWD ", 4)) {
		char out[PORTFWD_MAX * 12 + 1];

		ret = portfwd_command(v->fwd, line + 4, out, sizeof(out));
		if (!ret) {
			ctl_reply(conn, "OK%s%s", out[0] ? " " : "", out);
			return;
		}
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
	vm->xstate_port = v->a.xstate_port;
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
		ret = devices_add_net(&v->devs, vm, v->a.passt, v->a.nr_passt, vm->exit_msg,
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
	for (int i = 0; i < vm->nr_vcpus; i++) {
		ret = vcpu_start(vm->vcpus[i]);
		if (ret)
			VMM_FAIL(ret, "vCPU thread: %s", strerror(-ret));
	}
	if (v->a.restore) {
		/* Host-side state the snapshot could not carry is dropped (the vsock device's
		 * connections); then the agent, listening at snapshot time, is ready. */
		ret = dev_reset_all(&v->devs, vm->exit_msg, sizeof(vm->exit_msg));
		if (ret)
			goto out;
		vmm_log(v, "t_restore_us", (vmm_now_ns() - vm->t_start_ns) / 1000);
		vmm_on_ready(v);
	}
out:
	if (cache_fd >= 0)
		close(cache_fd);
	if (mem_fd >= 0)
		close(mem_fd);
	snapshot_reader_free(&snap);
	return ret;
}
#undef VMM_FAIL

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
	signal(SIGPIPE, SIG_IGN);
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
	ret = vmm_setup(&v, cmdline, 8192);
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
	v.vsock = NULL;
	kvm_vm_destroy(&v.vm);
	evloop_free(v.vm.loop);
	if (v.sig_fd >= 0)
		close(v.sig_fd);
	free(cmdline);
	return status;
}
