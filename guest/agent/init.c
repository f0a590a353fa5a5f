/* PID 1 duties of the guest agent: the boot mounts and the image, the readiness signal, reaping every child. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/vm_sockets.h>
#include <net/if.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "agent.h"

static void init_mount(const char *src, const char *dst, const char *type, unsigned long flags, const char *data)
{
	if (mkdir(dst, 0755) < 0 && errno != EEXIST)
		agent_log("mkdir %s: %s", dst, strerror(errno));
	if (mount(src, dst, type, flags, data) < 0 && errno != EBUSY)
		agent_log("mount %s on %s: %s", type, dst, strerror(errno));
}

static void init_symlink(const char *target, const char *path)
{
	if (symlink(target, path) < 0 && errno != EEXIST)
		agent_log("symlink %s: %s", path, strerror(errno));
}

static void init_lo_up(void)
{
	struct ifreq ifr;
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);

	if (fd < 0)
		fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0); /* dev ioctls work on any socket */
	if (fd < 0) {
		agent_log("lo: socket: %s", strerror(errno));
		return;
	}
	memset(&ifr, 0, sizeof(ifr));
	memcpy(ifr.ifr_name, "lo", 3);
	if (ioctl(fd, SIOCGIFFLAGS, &ifr) < 0) {
		agent_log("lo: SIOCGIFFLAGS: %s", strerror(errno));
	} else if (!(ifr.ifr_flags & IFF_UP)) {
		ifr.ifr_flags |= IFF_UP;
		if (ioctl(fd, SIOCSIFFLAGS, &ifr) < 0)
			agent_log("lo: SIOCSIFFLAGS: %s", strerror(errno));
	}
	close(fd);
}

int init_mkdir_p(const char *path, mode_t mode)
{
	char buf[PATH_MAX];
	size_t len = strlen(path), i;

	if (len == 0 || len >= sizeof(buf))
		return -ENAMETOOLONG;
	memcpy(buf, path, len + 1);
	for (i = 1; i <= len; i++) {
		if (buf[i] != '/' && buf[i] != 0)
			continue;
		buf[i] = 0;
		if (mkdir(buf, mode) < 0 && errno != EEXIST)
			return -errno;
		buf[i] = i < len ? '/' : 0;
	}
	return 0;
}

/* Whether the kernel command line holds word (a whole space-separated word). */
static bool init_cmdline_has(const char *word)
{
	char buf[4096], *tok, *save = NULL;
	int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
	ssize_t n = fd < 0 ? -1 : read(fd, buf, sizeof(buf) - 1);

	if (fd >= 0)
		close(fd);
	if (n <= 0)
		return false;
	buf[n] = 0;
	for (tok = strtok_r(buf, " \t\n", &save); tok; tok = strtok_r(NULL, " \t\n", &save)) {
		if (strcmp(tok, word) == 0)
			return true;
	}
	return false;
}

static void init_image_failed(struct agent_boot *b, int err, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void init_image_failed(struct agent_boot *b, int err, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(b->image_error, sizeof(b->image_error), fmt, ap);
	va_end(ap);
	b->image_err = err;
	agent_log("%s", b->image_error);
}

/*
 * Read the files the image lists in /etc/smolvm/warm.list (the shell, libc, python3 and
 * its start-up modules) into the page cache before the base snapshot is taken: every VM
 * restored from it then starts its first commands without waiting for those disk reads.
 */
static void init_warm_image(void)
{
	static char buf[64 * 1024]; /* one buffer for every file: its pages are touched once */
	char line[512], path[sizeof(line) + sizeof(AGENT_IMAGE_DIR)];
	unsigned long files = 0, bytes = 0;
	FILE *list = fopen(AGENT_IMAGE_DIR "/etc/smolvm/warm.list", "re");

	if (!list)
		return;
	while (fgets(line, sizeof(line), list)) {
		size_t len = strcspn(line, "\n");
		ssize_t n;
		int fd;

		line[len] = 0;
		if (line[0] != '/' || strstr(line, "/../"))
			continue;
		snprintf(path, sizeof(path), "%s%s", AGENT_IMAGE_DIR, line);
		fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
		if (fd < 0)
			continue;
		while ((n = read(fd, buf, sizeof(buf))) > 0)
			bytes += (unsigned long)n;
		close(fd);
		files++;
	}
	fclose(list);
	agent_log("image: %lu files (%lu KiB) read ahead", files, bytes / 1024);
}

/* smolvm.image=vda: mount the read-only image that SETUP ROOT lays the overlay on. */
static void init_mount_image(struct agent_boot *b)
{
	int ret, tries;

	if (!init_cmdline_has("smolvm.image=vda")) {
		b->image_err = ENODEV;
		snprintf(b->image_error, sizeof(b->image_error),
			 "the kernel command line has no smolvm.image=vda (the VM was started without an image)");
		return;
	}
	ret = init_mkdir_p(AGENT_IMAGE_DIR, 0755);
	if (ret < 0) {
		init_image_failed(b, -ret, "mkdir -p %s: %s", AGENT_IMAGE_DIR, strerror(-ret));
		return;
	}
	/* The disk is probed before init runs; give a late device node up to 2 s anyway. */
	for (tries = 0;; tries++) {
		if (mount(AGENT_IMAGE_DEV, AGENT_IMAGE_DIR, "ext4", MS_RDONLY, "noload") == 0)
			break;
		if ((errno != ENOENT && errno != ENXIO) || tries >= 200) {
			init_image_failed(b, errno, "mount %s (ext4, read-only) on %s: %s", AGENT_IMAGE_DEV, AGENT_IMAGE_DIR,
					  strerror(errno));
			return;
		}
		usleep(10000);
	}
	b->image_mounted = true;
	init_warm_image();
}

void init_system(struct agent *a)
{
	const unsigned long nse = MS_NOSUID | MS_NODEV | MS_NOEXEC;

	umask(022);
	if (chdir("/") < 0)
		agent_log("chdir /: %s", strerror(errno));
	init_mount("proc", "/proc", "proc", nse, NULL);
	init_mount("sysfs", "/sys", "sysfs", nse, NULL);
	init_mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
	agent_log_kmsg(); /* /dev/kmsg exists from here on */
	/* devtmpfs hides the initramfs's /dev: make its subfolders again */
	init_mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "mode=620,ptmxmode=666");
	init_mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
	init_mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
	if (access("/dev/ptmx", F_OK) < 0)
		init_symlink("pts/ptmx", "/dev/ptmx");
	init_symlink("/proc/self/fd", "/dev/fd");
	init_symlink("/proc/self/fd/0", "/dev/stdin");
	init_symlink("/proc/self/fd/1", "/dev/stdout");
	init_symlink("/proc/self/fd/2", "/dev/stderr");
	if (sethostname("smolvm", 6) < 0)
		agent_log("sethostname: %s", strerror(errno));
	init_lo_up();
	if (getpid() == 1)
		init_mount_image(&a->boot);
}

void init_std_fds(void)
{
	int fd;

	while ((fd = open("/dev/null", O_RDWR)) >= 0 && fd <= 2)
		;
	if (fd > 2)
		close(fd);
}

void init_signal_ready(struct agent *a)
{
	struct sockaddr_vm sa = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_HOST, .svm_port = SMOLVM_READY_PORT };
	int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);

	if (fd < 0) {
		agent_log("ready signal: socket: %s", strerror(errno));
		return;
	}
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 && errno == EINPROGRESS) {
		a->ready.fd = fd; /* keep it until the host answers, so the request is not cut short */
		if (agent_watch_set(a, &a->ready, EPOLLOUT) == 0)
			return;
		a->ready.fd = -1;
	}
	close(fd);
}

void init_reap(struct agent *a)
{
	struct signalfd_siginfo si[8];
	struct agent_conn *c;
	int status;
	pid_t pid;
	ssize_t r = read(a->sig.fd, si, sizeof(si));

	(void)r;
	while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
		for (c = a->conns; c; c = c->next) {
			if (c->pid == pid) {
				if (exec_exited(a, c, status) < 0)
					conn_close(a, c);
				else
					conn_settle(a, c);
				break;
			}
		}
	}
}
