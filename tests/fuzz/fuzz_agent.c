/*
 * libFuzzer harness: the guest agent's frame parser (guest/agent/) facing a
 * hostile host. The agent's files are compiled into this file unchanged (its
 * main() renamed), and each input is one connection: a socketpair whose far
 * end carries the input's bytes (after a first byte choosing --unix mode,
 * where a "CONNECT <port>\n" line comes first), made by the agent's own
 * conn_new() and run through its epoll dispatch until the connection closes. The far end is drained, so
 * replies (ERROR, READY, DATA, EXIT) flow as they would.
 *
 * Side effects are stubbed so that fuzzing runs nothing and writes nothing on
 * the host: posix_spawn fails (no command runs), PUT's temporary file is a
 * memfd and its rename/unlink/fchmod do nothing, GET opens a memfd whose size
 * depends on the path, and log lines are dropped; kill, mount, mkdir, chroot,
 * ioctl, fork and execve fail with EPERM, connect with ECONNREFUSED. stat() of the host's own paths (cwd,
 * PUT target) stays real and read-only. A change to how the agent starts
 * commands or touches the system must be stubbed here too.
 */
#define _GNU_SOURCE
/* every header the agent's files include, before the macros below rename their calls */
#include <arpa/inet.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/random.h>
#include <linux/vm_sockets.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static __attribute__((unused)) int fuzz_posix_spawn(pid_t *pid, const char *path, const posix_spawn_file_actions_t *fa,
			    const posix_spawnattr_t *attr, char *const argv[], char *const envp[])
{
	(void)pid;
	(void)path;
	(void)fa;
	(void)attr;
	(void)argv;
	(void)envp;
	return ENOEXEC;
}

static __attribute__((unused)) int fuzz_mkostemp(char *tmpl, int flags)
{
	(void)tmpl;
	return memfd_create("fuzz-put", (unsigned)(flags & O_CLOEXEC ? MFD_CLOEXEC : 0));
}

static __attribute__((unused)) int fuzz_rename(const char *from, const char *to)
{
	(void)from;
	(void)to;
	return 0;
}

static __attribute__((unused)) int fuzz_unlink(const char *path)
{
	(void)path;
	return 0;
}

static __attribute__((unused)) int fuzz_fchmod(int fd, mode_t mode)
{
	(void)fd;
	(void)mode;
	return 0;
}

/* GET: a regular file of (path length * 997) % 5000 bytes; a path ending in '/' opens "/" (a folder). */
static __attribute__((unused)) int fuzz_open(const char *path, int flags, ...)
{
	static uint8_t fill[5000];
	size_t len = strlen(path), size = (len * 997) % sizeof(fill);
	int fd;

	(void)flags;
	if (len && path[len - 1] == '/')
		return open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	fd = memfd_create("fuzz-get", MFD_CLOEXEC);
	if (fd < 0)
		return -1;
	memset(fill, 'g', sizeof(fill));
	if (write(fd, fill, size) != (ssize_t)size || lseek(fd, 0, SEEK_SET) != 0) {
		close(fd);
		return -1;
	}
	return fd;
}

/* Log lines go to fd 2: drop them (sanitizer reports do not pass through here). */
static __attribute__((unused)) ssize_t fuzz_write(int fd, const void *buf, size_t len)
{
	if (fd == 2)
		return (ssize_t)len;
	return write(fd, buf, len);
}

/*
 * A safety net for code that the agent does not reach from these frames today (boot set-up, the
 * overlay root) or may grow (other ways to start or limit commands): whatever would touch the
 * host's processes, mounts or file system fails with EPERM instead of happening.
 */
static __attribute__((unused)) int fuzz_refuse(void)
{
	errno = EPERM;
	return -1;
}

static __attribute__((unused)) int fuzz_kill(pid_t pid, int sig)
{
	(void)pid;
	(void)sig;
	return fuzz_refuse();
}

static __attribute__((unused)) int fuzz_mount(const char *src, const char *dst, const char *type, unsigned long flags, const void *data)
{
	(void)src;
	(void)dst;
	(void)type;
	(void)flags;
	(void)data;
	return fuzz_refuse();
}

static __attribute__((unused)) int fuzz_umount2(const char *path, int flags)
{
	(void)path;
	(void)flags;
	return fuzz_refuse();
}

static __attribute__((unused)) int fuzz_path_op(const char *path)
{
	(void)path;
	return fuzz_refuse();
}

static __attribute__((unused)) int fuzz_mkdir(const char *path, mode_t mode)
{
	(void)mode;
	return fuzz_path_op(path);
}

static __attribute__((unused)) int fuzz_symlink(const char *target, const char *path)
{
	(void)target;
	return fuzz_path_op(path);
}

static __attribute__((unused)) int fuzz_sethostname(const char *name, size_t len)
{
	(void)name;
	(void)len;
	return fuzz_refuse();
}

static __attribute__((unused)) int fuzz_ioctl(int fd, unsigned long req, ...)
{
	(void)fd;
	(void)req;
	return fuzz_refuse();
}

static __attribute__((unused)) pid_t fuzz_fork(void)
{
	return fuzz_refuse();
}

static __attribute__((unused)) int fuzz_execve(const char *path, char *const argv[], char *const envp[])
{
	(void)argv;
	(void)envp;
	return fuzz_path_op(path);
}

static __attribute__((unused)) int fuzz_connect(int fd, const struct sockaddr *sa, socklen_t len)
{
	(void)fd;
	(void)sa;
	(void)len;
	errno = ECONNREFUSED; /* nothing listens: no connection leaves the harness */
	return -1;
}

#define connect(...) fuzz_connect(__VA_ARGS__)
#define kill(...) fuzz_kill(__VA_ARGS__)
#define mount(...) fuzz_mount(__VA_ARGS__)
#define umount2(...) fuzz_umount2(__VA_ARGS__)
#define chroot(...) fuzz_path_op(__VA_ARGS__)
#define chdir(...) fuzz_path_op(__VA_ARGS__)
#define mkdir(...) fuzz_mkdir(__VA_ARGS__)
#define symlink(...) fuzz_symlink(__VA_ARGS__)
#define sethostname(...) fuzz_sethostname(__VA_ARGS__)
#define ioctl(...) fuzz_ioctl(__VA_ARGS__)
#define fork(...) fuzz_fork(__VA_ARGS__)
#define execve(...) fuzz_execve(__VA_ARGS__)
#define posix_spawn(...) fuzz_posix_spawn(__VA_ARGS__)
#define mkostemp(...) fuzz_mkostemp(__VA_ARGS__)
#define rename(...) fuzz_rename(__VA_ARGS__)
#define unlink(...) fuzz_unlink(__VA_ARGS__)
#define fchmod(...) fuzz_fchmod(__VA_ARGS__)
#define open(...) fuzz_open(__VA_ARGS__)
#define write(...) fuzz_write(__VA_ARGS__)
#define main agent_main

/* the agent's files (smolvm/_binaries.py: every .c in guest/agent/): one translation unit, so the stubs apply */
#include "../../guest/agent/main.c"
#include "../../guest/agent/conn.c"
#include "../../guest/agent/exec.c"
#include "../../guest/agent/files.c"
#include "../../guest/agent/init.c"
#include "../../guest/agent/netcfg.c"
#include "../../guest/agent/pty.c"
#include "../../guest/agent/relay.c"
#include "../../guest/agent/setup.c"

#undef write
#undef open

static struct agent fa = AGENT_INIT;

static void fuzz_free_graveyard(void)
{
	while (fa.graveyard) {
		struct agent_conn *c = fa.graveyard;

		fa.graveyard = c->next;
		conn_free(c);
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static uint8_t junk[1 << 16];
	struct epoll_event evs[16];
	struct agent_conn *c;
	int sv[2], rounds, n, i;
	size_t off = 0;

	if (fa.epfd < 0) {
		signal(SIGPIPE, SIG_IGN);
		fa.epfd = epoll_create1(EPOLL_CLOEXEC);
		fa.devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
		if (fa.epfd < 0 || fa.devnull < 0)
			abort();
	}
	if (size < 1)
		return 0;
	fa.unix_mode = data[0] & 1;
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0)
		abort();
	c = conn_new(&fa, sv[0]); /* as conn_accept() does */
	if (!c)
		abort();
	conn_settle(&fa, c);

	data++;
	size--;
	for (rounds = 0; fa.conns && rounds < 2000; rounds++) {
		while (off < size) {
			ssize_t w = send(sv[1], data + off, size - off, MSG_NOSIGNAL | MSG_DONTWAIT);

			if (w <= 0)
				break;
			off += (size_t)w;
		}
		if (off == size)
			shutdown(sv[1], SHUT_WR); /* the host is done: EOF after its bytes */
		while (read(sv[1], junk, sizeof(junk)) > 0)
			;
		n = epoll_wait(fa.epfd, evs, 16, 0);
		for (i = 0; i < n; i++)
			agent_dispatch(&fa, evs[i].data.ptr, evs[i].events);
		fuzz_free_graveyard();
	}
	while (fa.conns)
		conn_close(&fa, fa.conns); /* stuck (e.g. waiting for more input): close as on host EOF */
	fuzz_free_graveyard();
	close(sv[1]);
	return 0;
}
