/* Guest agent: PID 1 of the smolvm guest; runs the host's EXEC requests as `/bin/sh -c` and streams their output back. */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <linux/random.h>
#include <fcntl.h>
#include <linux/vm_sockets.h>
#include <net/if.h>
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
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "proto.h"

/*
 * Memory is the expensive resource in the guest (every first-touched page is
 * an emulated fault), and so are system calls: buffers are allocated per use,
 * at most 64 KiB each, and the loop avoids needless epoll_ctl/read calls.
 */
#define AGENT_CHUNK (64u << 10)       /* bytes read from a pipe per STDOUT/STDERR frame */
#define AGENT_QUEUE_HIGH (256u << 10) /* stop reading pipes once this much output is queued... */
#define AGENT_QUEUE_LOW (128u << 10)  /* ...and resume below this (hysteresis saves epoll_ctl calls) */
#define AGENT_DRAIN_MAX (1u << 20)    /* per pipe, read at most this much after the shell exited */
#define AGENT_MAX_CONNS 256
#define AGENT_MAX_ENV 4096
#define AGENT_HDR ((uint32_t)sizeof(struct smolvm_frame))

static const char *const agent_base_env[] = {
	"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
	"HOME=/root",
	"LANG=C.UTF-8",
	"TERM=dumb",
};
#define AGENT_N_BASE_ENV (sizeof(agent_base_env) / sizeof(agent_base_env[0]))

enum agent_watch_kind { AGENT_W_LISTEN, AGENT_W_SIGNAL, AGENT_W_READY, AGENT_W_SOCK, AGENT_W_STDOUT, AGENT_W_STDERR };

/* What an epoll event points at. events: the mask registered now (0 = not in the epoll set). */
struct agent_watch {
	enum agent_watch_kind kind;
	int fd;
	uint32_t events;
	struct agent_conn *conn;
};

/* A queued piece of output: a whole frame (header + payload) or raw handshake bytes. */
struct agent_chunk {
	struct agent_chunk *next;
	uint32_t len, off;
	uint8_t data[];
};

enum agent_conn_state {
	AGENT_C_HANDSHAKE, /* --unix only: waiting for "CONNECT <port>\n" */
	AGENT_C_HEADER,    /* reading the EXEC frame header */
	AGENT_C_PAYLOAD,   /* reading the EXEC payload */
	AGENT_C_RUNNING,   /* the shell runs; output is streamed */
	AGENT_C_CLOSING,   /* EXIT or ERROR queued; close once the queue is sent */
};

struct agent_conn {
	struct agent_conn *next;
	struct agent_watch sock, out, err;
	enum agent_conn_state state;
	char line[32]; /* handshake line */
	size_t line_len;
	struct smolvm_frame hdr;
	uint32_t got; /* bytes of hdr or payload read so far */
	uint8_t *payload;
	pid_t pid; /* the shell while it is not reaped, else 0 */
	uint64_t deadline_ms; /* CLOCK_MONOTONIC; 0 = no timeout */
	bool timed_out;
	bool blocked; /* the last send hit EAGAIN: wait for EPOLLOUT */
	bool paused;  /* pipes out of the epoll set: too much output queued */
	bool dead;    /* closed; freed after the current batch of events */
	struct agent_chunk *qhead, *qtail;
	size_t qbytes;
};

struct agent {
	bool unix_mode;
	int epfd, devnull;
	struct agent_watch listen, sig, ready;
	struct agent_conn *conns, *graveyard;
	int nconns;
};

static bool agent_log_to_stderr = true;

/* One line to /dev/kmsg (one record per write) or, in --unix mode or without it, to stderr. */
static void agent_log(const char *fmt, ...)
{
	char line[512];
	int fd = -1;
	int n = snprintf(line, sizeof(line), "smolvm-agent: ");
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(line + n, sizeof(line) - (size_t)n - 1, fmt, ap);
	va_end(ap);
	n = (int)strlen(line);
	line[n++] = '\n';
	if (!agent_log_to_stderr)
		fd = open("/dev/kmsg", O_WRONLY | O_CLOEXEC | O_NOCTTY);
	ssize_t r = write(fd >= 0 ? fd : 2, line, (size_t)n);
	(void)r;
	if (fd >= 0)
		close(fd);
}

static uint64_t agent_now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* ---- system setup (init mode only) ---- */

static void agent_mount(const char *src, const char *dst, const char *type, unsigned long flags, const char *data)
{
	if (mkdir(dst, 0755) < 0 && errno != EEXIST)
		agent_log("mkdir %s: %s", dst, strerror(errno));
	if (mount(src, dst, type, flags, data) < 0 && errno != EBUSY)
		agent_log("mount %s on %s: %s", type, dst, strerror(errno));
}

static void agent_symlink(const char *target, const char *path)
{
	if (symlink(target, path) < 0 && errno != EEXIST)
		agent_log("symlink %s: %s", path, strerror(errno));
}

static void agent_lo_up(void)
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

static void agent_setup_system(void)
{
	const unsigned long nse = MS_NOSUID | MS_NODEV | MS_NOEXEC;

	umask(022);
	if (chdir("/") < 0)
		agent_log("chdir /: %s", strerror(errno));
	agent_mount("proc", "/proc", "proc", nse, NULL);
	agent_mount("sysfs", "/sys", "sysfs", nse, NULL);
	agent_mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
	agent_log_to_stderr = false; /* /dev/kmsg exists from here on */
	/* devtmpfs hides the initramfs's /dev: make its subfolders again */
	agent_mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "mode=620,ptmxmode=666");
	agent_mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
	agent_mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
	if (access("/dev/ptmx", F_OK) < 0)
		agent_symlink("pts/ptmx", "/dev/ptmx");
	agent_symlink("/proc/self/fd", "/dev/fd");
	agent_symlink("/proc/self/fd/0", "/dev/stdin");
	agent_symlink("/proc/self/fd/1", "/dev/stdout");
	agent_symlink("/proc/self/fd/2", "/dev/stderr");
	if (sethostname("smolvm", 6) < 0)
		agent_log("sethostname: %s", strerror(errno));
	agent_lo_up();
}

/* ---- epoll helpers ---- */

/* Register w with `events` (0 = take it out of the epoll set); only calls epoll_ctl on a change. */
static int agent_watch_set(struct agent *a, struct agent_watch *w, uint32_t events)
{
	struct epoll_event ev = { .events = events, .data.ptr = w };
	int op;

	if (w->fd < 0 || events == w->events)
		return 0;
	/* paused fds leave the set: EPOLLHUP would otherwise fire on every wait */
	op = events == 0 ? EPOLL_CTL_DEL : w->events == 0 ? EPOLL_CTL_ADD : EPOLL_CTL_MOD;
	if (epoll_ctl(a->epfd, op, w->fd, &ev) < 0) {
		int err = errno;
		agent_log("epoll_ctl(%d, fd %d): %s", op, w->fd, strerror(err));
		return -err;
	}
	w->events = events;
	return 0;
}

static void agent_watch_close(struct agent *a, struct agent_watch *w)
{
	if (w->fd < 0)
		return;
	agent_watch_set(a, w, 0);
	close(w->fd);
	w->fd = -1;
}

/* ---- per-connection output queue ---- */

static struct agent_chunk *agent_chunk_frame(uint16_t type, uint32_t cap)
{
	struct agent_chunk *ch = malloc(sizeof(*ch) + AGENT_HDR + cap);
	struct smolvm_frame hdr = { htole32(SMOLVM_PROTO_MAGIC), htole16(type), 0, htole32(cap) };

	if (!ch)
		return NULL;
	ch->next = NULL;
	ch->off = 0;
	ch->len = AGENT_HDR + cap;
	memcpy(ch->data, &hdr, AGENT_HDR);
	return ch;
}

static void agent_conn_enqueue(struct agent_conn *c, struct agent_chunk *ch)
{
	if (c->qtail)
		c->qtail->next = ch;
	else
		c->qhead = ch;
	c->qtail = ch;
	c->qbytes += ch->len;
}

/* Queue one frame with a copy of data. */
static int agent_conn_frame(struct agent_conn *c, uint16_t type, const void *data, uint32_t len)
{
	struct agent_chunk *ch = agent_chunk_frame(type, len);

	if (!ch)
		return -ENOMEM;
	memcpy(ch->data + AGENT_HDR, data, len);
	agent_conn_enqueue(c, ch);
	return 0;
}

/* Send as much of the queue as the socket takes now. Returns 0 or -errno (connection lost). */
static int agent_conn_flush(struct agent_conn *c)
{
	while (c->qhead) {
		struct iovec iov[16];
		struct msghdr mh = { .msg_iov = iov };
		struct agent_chunk *ch;
		ssize_t n;

		for (ch = c->qhead; ch && mh.msg_iovlen < 16; ch = ch->next) {
			iov[mh.msg_iovlen].iov_base = ch->data + ch->off;
			iov[mh.msg_iovlen].iov_len = ch->len - ch->off;
			mh.msg_iovlen++;
		}
		n = sendmsg(c->sock.fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK) {
				c->blocked = true;
				return 0;
			}
			return -errno;
		}
		c->blocked = false;
		c->qbytes -= (size_t)n;
		while (n > 0) {
			ch = c->qhead;
			if ((size_t)n < ch->len - ch->off) {
				ch->off += (uint32_t)n;
				break;
			}
			n -= ch->len - ch->off;
			c->qhead = ch->next;
			if (!c->qhead)
				c->qtail = NULL;
			free(ch);
		}
	}
	return 0;
}

/* ---- connection lifetime ---- */

static void agent_conn_close(struct agent *a, struct agent_conn *c)
{
	struct agent_conn **pp;

	if (c->pid > 0)
		kill(-c->pid, SIGKILL); /* the host went away: stop the whole process group */
	c->pid = 0;
	agent_watch_close(a, &c->sock);
	agent_watch_close(a, &c->out);
	agent_watch_close(a, &c->err);
	for (pp = &a->conns; *pp; pp = &(*pp)->next) {
		if (*pp == c) {
			*pp = c->next;
			break;
		}
	}
	a->nconns--;
	c->dead = true;
	c->next = a->graveyard; /* events of this batch may still point at it */
	a->graveyard = c;
}

static void agent_conn_free(struct agent_conn *c)
{
	while (c->qhead) {
		struct agent_chunk *ch = c->qhead;
		c->qhead = ch->next;
		free(ch);
	}
	free(c->payload);
	free(c);
}

/* After any event: send what is queued, close when finished, and set the epoll masks to the state. */
static void agent_conn_settle(struct agent *a, struct agent_conn *c)
{
	uint32_t sock_ev = 0, pipe_ev = 0;
	bool finished;

	if (c->dead)
		return;
	finished = c->qhead && !c->blocked && agent_conn_flush(c) < 0;
	finished = finished || (c->state == AGENT_C_CLOSING && !c->qhead);
	if (!finished) {
		if (c->state != AGENT_C_CLOSING)
			sock_ev |= EPOLLIN;
		if (c->blocked)
			sock_ev |= EPOLLOUT;
		/* back-pressure: a slow host pauses the command's pipes (it then blocks writing them) */
		if (c->qbytes >= AGENT_QUEUE_HIGH)
			c->paused = true;
		else if (c->qbytes < AGENT_QUEUE_LOW)
			c->paused = false;
		if (!c->paused)
			pipe_ev = EPOLLIN;
		finished = agent_watch_set(a, &c->sock, sock_ev) < 0 || agent_watch_set(a, &c->out, pipe_ev) < 0 ||
			   agent_watch_set(a, &c->err, pipe_ev) < 0;
	}
	if (finished)
		agent_conn_close(a, c);
}

/* Queue an ERROR frame with the message and close the connection once it is sent. */
static int agent_conn_fail(struct agent_conn *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int agent_conn_fail(struct agent_conn *c, const char *fmt, ...)
{
	char msg[256];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	free(c->payload);
	c->payload = NULL;
	c->state = AGENT_C_CLOSING;
	return agent_conn_frame(c, SMOLVM_ERROR, msg, (uint32_t)strlen(msg));
}

/* ---- running the command ---- */

/* The next NUL-terminated string of the payload at *off, or NULL if it runs past the end. */
static const char *agent_next_string(const uint8_t *p, uint32_t len, uint32_t *off)
{
	const uint8_t *nul;

	if (*off >= len)
		return NULL;
	nul = memchr(p + *off, 0, len - *off);
	if (!nul)
		return NULL;
	const char *s = (const char *)p + *off;
	*off = (uint32_t)(nul - p) + 1;
	return s;
}

static int agent_set_nonblock(int fd)
{
	int fl = fcntl(fd, F_GETFL);

	if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
		return -errno;
	return 0;
}

/* Validate the EXEC payload and spawn the shell. Returns 0 (running or ERROR queued) or -errno. */
static int agent_conn_start(struct agent *a, struct agent_conn *c)
{
	const uint8_t *p = c->payload;
	uint32_t len = le32toh(c->hdr.len), off = sizeof(struct smolvm_exec), n_env, nvars, i;
	posix_spawn_file_actions_t fa;
	posix_spawnattr_t attr;
	bool fa_ready = false, attr_ready = false;
	int po[2] = { -1, -1 }, pe[2] = { -1, -1 };
	const char **envp = NULL;
	const char *cmd, *cwd;
	struct smolvm_exec ex;
	struct stat st;
	sigset_t set;
	pid_t pid;
	int ret;

	memcpy(&ex, p, sizeof(ex));
	n_env = le32toh(ex.n_env);
	cmd = agent_next_string(p, len, &off);
	if (!cmd) {
		ret = agent_conn_fail(c, "bad EXEC frame: the command string is not NUL-terminated inside the payload");
		goto out;
	}
	cwd = agent_next_string(p, len, &off);
	if (!cwd) {
		ret = agent_conn_fail(c, "bad EXEC frame: the cwd string is missing or not NUL-terminated");
		goto out;
	}
	if (n_env > AGENT_MAX_ENV) {
		ret = agent_conn_fail(c, "bad EXEC frame: n_env=%u exceeds the limit of %u", n_env, AGENT_MAX_ENV);
		goto out;
	}
	envp = calloc(AGENT_N_BASE_ENV + n_env + 1, sizeof(*envp));
	if (!envp) {
		ret = -ENOMEM;
		goto out;
	}
	memcpy(envp, agent_base_env, sizeof(agent_base_env));
	nvars = AGENT_N_BASE_ENV;
	for (i = 0; i < n_env; i++) {
		const char *kv = agent_next_string(p, len, &off), *eq;
		uint32_t j;

		if (!kv) {
			ret = agent_conn_fail(c, "bad EXEC frame: n_env=%u but env entry %u is missing or not NUL-terminated",
					      n_env, i);
			goto out;
		}
		eq = strchr(kv, '=');
		if (!eq || eq == kv) {
			ret = agent_conn_fail(c, "bad EXEC frame: env entry %u \"%.60s\" is not KEY=VALUE", i, kv);
			goto out;
		}
		for (j = 0; j < nvars; j++) {
			if (strncmp(envp[j], kv, (size_t)(eq - kv) + 1) == 0)
				break;
		}
		envp[j] = kv;
		if (j == nvars)
			nvars++;
	}
	if (off != len) {
		ret = agent_conn_fail(c, "bad EXEC frame: %u bytes after the command, cwd and n_env=%u env entries",
				      len - off, n_env);
		goto out;
	}
	if (!cwd[0])
		cwd = "/";
	if (stat(cwd, &st) < 0) {
		ret = agent_conn_fail(c, "cwd %s: %s", cwd, strerror(errno));
		goto out;
	}
	if (!S_ISDIR(st.st_mode)) {
		ret = agent_conn_fail(c, "cwd %s: %s", cwd, strerror(ENOTDIR));
		goto out;
	}

	if (pipe2(po, O_CLOEXEC) < 0 || pipe2(pe, O_CLOEXEC) < 0 || agent_set_nonblock(po[0]) < 0 ||
	    agent_set_nonblock(pe[0]) < 0) {
		ret = agent_conn_fail(c, "cannot make output pipes: %s", strerror(errno));
		goto out;
	}
	ret = posix_spawn_file_actions_init(&fa);
	if (ret) {
		ret = -ret;
		goto out;
	}
	fa_ready = true;
	ret = posix_spawnattr_init(&attr);
	if (ret) {
		ret = -ret;
		goto out;
	}
	attr_ready = true;
	/* the agent blocks SIGCHLD and ignores SIGPIPE: the command gets a clean slate */
	sigemptyset(&set);
	ret = posix_spawnattr_setsigmask(&attr, &set);
	sigfillset(&set);
	if (!ret)
		ret = posix_spawnattr_setsigdefault(&attr, &set);
	if (!ret)
		ret = posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
	if (!ret)
		ret = posix_spawn_file_actions_adddup2(&fa, a->devnull, 0);
	if (!ret)
		ret = posix_spawn_file_actions_adddup2(&fa, po[1], 1);
	if (!ret)
		ret = posix_spawn_file_actions_adddup2(&fa, pe[1], 2);
	if (!ret)
		ret = posix_spawn_file_actions_addchdir_np(&fa, cwd);
	if (ret) {
		ret = -ret;
		goto out;
	}
	{
		char *argv[] = { "sh", "-c", (char *)cmd, NULL };
		ret = posix_spawn(&pid, "/bin/sh", &fa, &attr, argv, (char *const *)envp);
	}
	if (ret) {
		int err = ret;
		ret = agent_conn_fail(c, "cannot run /bin/sh in %s: %s", cwd, strerror(err));
		goto out;
	}
	c->pid = pid;
	c->out = (struct agent_watch){ AGENT_W_STDOUT, po[0], 0, c };
	c->err = (struct agent_watch){ AGENT_W_STDERR, pe[0], 0, c };
	po[0] = pe[0] = -1;
	if (le32toh(ex.timeout_ms))
		c->deadline_ms = agent_now_ms() + le32toh(ex.timeout_ms);
	c->state = AGENT_C_RUNNING;
	free(c->payload);
	c->payload = NULL;
	ret = 0;
out:
	if (attr_ready)
		posix_spawnattr_destroy(&attr);
	if (fa_ready)
		posix_spawn_file_actions_destroy(&fa);
	for (i = 0; i < 2; i++) {
		if (po[i] >= 0)
			close(po[i]);
		if (pe[i] >= 0)
			close(pe[i]);
	}
	free(envp);
	return ret;
}

/* One read from an output pipe into a new frame. Returns bytes read, 0 at EOF (pipe closed), -EAGAIN, or -errno. */
static int agent_conn_pipe_read(struct agent *a, struct agent_conn *c, struct agent_watch *w)
{
	uint16_t type = w->kind == AGENT_W_STDOUT ? SMOLVM_STDOUT : SMOLVM_STDERR;
	struct agent_chunk *ch = agent_chunk_frame(type, AGENT_CHUNK);
	struct smolvm_frame hdr;
	ssize_t n;

	if (!ch)
		return -ENOMEM;
	do
		n = read(w->fd, ch->data + AGENT_HDR, AGENT_CHUNK);
	while (n < 0 && errno == EINTR);
	if (n <= 0) {
		int err = n < 0 ? errno : 0;
		free(ch);
		if (err == EAGAIN)
			return -EAGAIN;
		agent_watch_close(a, w); /* EOF, or an error that would repeat */
		return -err;
	}
	if ((size_t)n < AGENT_CHUNK / 2) {
		struct agent_chunk *small = realloc(ch, sizeof(*ch) + AGENT_HDR + (size_t)n);
		if (small)
			ch = small;
	}
	memcpy(&hdr, ch->data, AGENT_HDR);
	hdr.len = htole32((uint32_t)n);
	memcpy(ch->data, &hdr, AGENT_HDR);
	ch->len = AGENT_HDR + (uint32_t)n;
	agent_conn_enqueue(c, ch);
	return (int)n;
}

/* The shell was reaped: take what is in the pipes now (not waiting for EOF), then queue EXIT. */
static int agent_conn_exited(struct agent *a, struct agent_conn *c, int status)
{
	struct agent_watch *ws[2] = { &c->out, &c->err };
	struct smolvm_exit ex = { 0, 0, 0 };
	int i, ret = 0;

	c->pid = 0;
	for (i = 0; i < 2; i++) {
		size_t total = 0;
		while (ws[i]->fd >= 0 && total < AGENT_DRAIN_MAX) {
			ret = agent_conn_pipe_read(a, c, ws[i]);
			if (ret <= 0)
				break;
			total += (size_t)ret;
		}
		if (ret == -ENOMEM)
			return ret;
		agent_watch_close(a, ws[i]);
	}
	if (WIFSIGNALED(status)) {
		ex.signal = WTERMSIG(status);
		ex.exit_code = 128 + ex.signal;
	} else if (WIFEXITED(status)) {
		ex.exit_code = WEXITSTATUS(status);
	}
	if (c->timed_out) {
		ex.exit_code = 124;
		ex.flags = SMOLVM_EXIT_TIMED_OUT;
	}
	ex.exit_code = (int32_t)htole32((uint32_t)ex.exit_code);
	ex.signal = (int32_t)htole32((uint32_t)ex.signal);
	ex.flags = htole32(ex.flags);
	c->state = AGENT_C_CLOSING;
	return agent_conn_frame(c, SMOLVM_EXIT, &ex, sizeof(ex));
}

/* ---- reading from the host ---- */

/* --unix mode: the VMM's "CONNECT <port>\n" handshake, answered with "OK <port>\n". */
static int agent_conn_handshake(struct agent_conn *c)
{
	char ch, reply[32];
	unsigned long port;
	char *end;
	ssize_t n;

	for (;;) {
		n = read(c->sock.fd, &ch, 1); /* byte by byte: what follows the line belongs to the frames */
		if (n == 0)
			return -ECONNRESET;
		if (n < 0)
			return errno == EAGAIN || errno == EINTR ? 0 : -errno;
		if (ch == '\n')
			break;
		if (c->line_len >= sizeof(c->line) - 1)
			return -EPROTO;
		c->line[c->line_len++] = ch;
	}
	c->line[c->line_len] = 0;
	if (strncmp(c->line, "CONNECT ", 8) != 0)
		return -EPROTO;
	errno = 0;
	port = strtoul(c->line + 8, &end, 10);
	if (errno || *end || port != SMOLVM_AGENT_PORT)
		return -ECONNREFUSED; /* nothing listens there: the VMM would drop the connection */
	n = snprintf(reply, sizeof(reply), "OK %lu\n", port);
	struct agent_chunk *raw = malloc(sizeof(*raw) + (size_t)n);
	if (!raw)
		return -ENOMEM;
	raw->next = NULL;
	raw->off = 0;
	raw->len = (uint32_t)n;
	memcpy(raw->data, reply, (size_t)n);
	agent_conn_enqueue(c, raw);
	c->state = AGENT_C_HEADER;
	return 0;
}

/*
 * SETUP: fresh entropy (credited), the host's wall clock and the hostname, so
 * that sandboxes restored from one snapshot differ. In --unix test mode the
 * frame is checked but nothing is applied (that would change the host).
 */
static int agent_conn_setup(struct agent_conn *c)
{
	uint32_t len = le32toh(c->hdr.len);
	struct smolvm_setup su;
	struct smolvm_exit ex = { 0, 0, 0 };
	const uint8_t *entropy, *host;
	uint32_t elen, hlen;

	if (len < sizeof(su))
		return agent_conn_fail(c, "bad SETUP frame: %u bytes, shorter than its header", len);
	memcpy(&su, c->payload, sizeof(su));
	elen = le32toh(su.entropy_len);
	hlen = le32toh(su.hostname_len);
	if (elen > SMOLVM_SETUP_MAX_ENTROPY || hlen > SMOLVM_SETUP_MAX_HOSTNAME ||
	    (uint64_t)sizeof(su) + elen + hlen != len)
		return agent_conn_fail(c, "bad SETUP frame: entropy %u, hostname %u, payload %u bytes", elen, hlen,
				       len);
	entropy = c->payload + sizeof(su);
	host = entropy + elen;
	if (getpid() == 1) {
		uint64_t wall = le64toh(su.wall_ns);

		if (elen) {
			struct {
				int entropy_count, buf_size;
				uint8_t buf[SMOLVM_SETUP_MAX_ENTROPY];
			} pool;
			int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);

			pool.entropy_count = (int)elen * 8;
			pool.buf_size = (int)elen;
			memcpy(pool.buf, entropy, elen);
			if (fd < 0 || ioctl(fd, RNDADDENTROPY, &pool) < 0)
				agent_log("RNDADDENTROPY: %s", strerror(errno));
			/* Credited entropy alone waits for the next periodic reseed: force one now. */
			else if (ioctl(fd, RNDRESEEDCRNG) < 0 && errno != ENODATA)
				agent_log("RNDRESEEDCRNG: %s", strerror(errno));
			if (fd >= 0)
				close(fd);
		}
		if (wall) {
			struct timespec ts = { (time_t)(wall / 1000000000u), (long)(wall % 1000000000u) };

			if (clock_settime(CLOCK_REALTIME, &ts) < 0)
				agent_log("clock_settime: %s", strerror(errno));
		}
		if (hlen && sethostname((const char *)host, hlen) < 0)
			agent_log("sethostname: %s", strerror(errno));
	}
	c->state = AGENT_C_CLOSING;
	return agent_conn_frame(c, SMOLVM_EXIT, &ex, sizeof(ex));
}

/* Read the EXEC frame; start the command when it is complete. */
static int agent_conn_read_exec(struct agent *a, struct agent_conn *c)
{
	ssize_t n;

	while (c->state == AGENT_C_HEADER || c->state == AGENT_C_PAYLOAD) {
		if (c->state == AGENT_C_HEADER)
			n = read(c->sock.fd, (uint8_t *)&c->hdr + c->got, AGENT_HDR - c->got);
		else
			n = read(c->sock.fd, c->payload + c->got, le32toh(c->hdr.len) - c->got);
		if (n == 0)
			return -ECONNRESET;
		if (n < 0)
			return errno == EAGAIN || errno == EINTR ? 0 : -errno;
		c->got += (uint32_t)n;
		if (c->state == AGENT_C_HEADER && c->got == AGENT_HDR) {
			uint32_t magic = le32toh(c->hdr.magic), type = le16toh(c->hdr.type), len = le32toh(c->hdr.len);

			if (magic != SMOLVM_PROTO_MAGIC)
				return agent_conn_fail(c, "bad frame: magic 0x%08x, want 0x%08x (protocol SMV1)", magic,
						       SMOLVM_PROTO_MAGIC);
			if (type != SMOLVM_EXEC && type != SMOLVM_SETUP)
				return agent_conn_fail(c, "bad frame: type %u, want EXEC (%u) or SETUP (%u)", type,
						       SMOLVM_EXEC, SMOLVM_SETUP);
			if (len > SMOLVM_MAX_PAYLOAD)
				return agent_conn_fail(c, "bad EXEC frame: payload of %u bytes is over the limit of %u", len,
						       SMOLVM_MAX_PAYLOAD);
			if (type == SMOLVM_EXEC && len < sizeof(struct smolvm_exec))
				return agent_conn_fail(c, "bad EXEC frame: payload of %u bytes is shorter than its %zu-byte header",
						       len, sizeof(struct smolvm_exec));
			c->payload = malloc(len);
			if (!c->payload)
				return agent_conn_fail(c, "out of memory for an EXEC payload of %u bytes", len);
			c->got = 0;
			c->state = AGENT_C_PAYLOAD;
		} else if (c->state == AGENT_C_PAYLOAD && c->got == le32toh(c->hdr.len)) {
			if (le16toh(c->hdr.type) == SMOLVM_SETUP)
				return agent_conn_setup(c);
			return agent_conn_start(a, c);
		}
	}
	return 0;
}

/* While the command runs the host sends nothing; EOF or an error means it gave up. */
static int agent_conn_read_running(struct agent_conn *c)
{
	char buf[256];
	ssize_t n = read(c->sock.fd, buf, sizeof(buf));

	if (n == 0)
		return -ECONNRESET;
	if (n < 0)
		return errno == EAGAIN || errno == EINTR ? 0 : -errno;
	return 0; /* unexpected bytes: ignored */
}

static int agent_conn_sock_event(struct agent *a, struct agent_conn *c, uint32_t ev)
{
	int ret = 0;

	if (c->qhead && (ev & (EPOLLOUT | EPOLLERR | EPOLLHUP))) {
		c->blocked = false;
		ret = agent_conn_flush(c);
		if (ret < 0)
			return ret;
	}
	if (!(ev & (EPOLLIN | EPOLLERR | EPOLLHUP)))
		return 0;
	switch (c->state) {
	case AGENT_C_HANDSHAKE:
		return agent_conn_handshake(c);
	case AGENT_C_HEADER:
	case AGENT_C_PAYLOAD:
		return agent_conn_read_exec(a, c);
	case AGENT_C_RUNNING:
		return agent_conn_read_running(c);
	case AGENT_C_CLOSING:
		break;
	}
	return 0;
}

/* ---- listening, reaping, timeouts ---- */

static void agent_accept(struct agent *a)
{
	struct agent_conn *c;
	int fd = accept4(a->listen.fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);

	if (fd < 0) {
		if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED)
			agent_log("accept: %s", strerror(errno));
		return;
	}
	if (a->nconns >= AGENT_MAX_CONNS) {
		agent_log("too many connections (%d): dropping one", a->nconns);
		close(fd);
		return;
	}
	c = calloc(1, sizeof(*c));
	if (!c) {
		close(fd);
		return;
	}
	c->sock = (struct agent_watch){ AGENT_W_SOCK, fd, 0, c };
	c->out = (struct agent_watch){ AGENT_W_STDOUT, -1, 0, c };
	c->err = (struct agent_watch){ AGENT_W_STDERR, -1, 0, c };
	c->state = a->unix_mode ? AGENT_C_HANDSHAKE : AGENT_C_HEADER;
	c->next = a->conns;
	a->conns = c;
	a->nconns++;
	agent_conn_settle(a, c);
}

/* SIGCHLD: reap every child (PID 1 inherits all orphans); report the shells of our connections. */
static void agent_reap(struct agent *a)
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
				if (agent_conn_exited(a, c, status) < 0)
					agent_conn_close(a, c);
				else
					agent_conn_settle(a, c);
				break;
			}
		}
	}
}

/* Kill the process groups whose deadline passed; return the epoll_wait timeout to the next one. */
static int agent_timeouts(struct agent *a)
{
	uint64_t now = agent_now_ms(), next = UINT64_MAX;
	struct agent_conn *c;

	for (c = a->conns; c; c = c->next) {
		if (c->pid <= 0 || !c->deadline_ms || c->timed_out)
			continue;
		if (now >= c->deadline_ms) {
			c->timed_out = true;
			kill(-c->pid, SIGKILL); /* EXIT follows when the shell is reaped */
		} else if (c->deadline_ms < next) {
			next = c->deadline_ms;
		}
	}
	if (next == UINT64_MAX)
		return -1;
	return next - now > INT32_MAX ? INT32_MAX : (int)(next - now);
}

static void agent_dispatch(struct agent *a, struct agent_watch *w, uint32_t ev)
{
	struct agent_conn *c = w->conn;
	int ret = 0;

	switch (w->kind) {
	case AGENT_W_LISTEN:
		agent_accept(a);
		return;
	case AGENT_W_SIGNAL:
		agent_reap(a);
		return;
	case AGENT_W_READY:
		agent_watch_close(a, w); /* refused or accepted: either way the host has seen it */
		return;
	case AGENT_W_SOCK:
		if (c->dead)
			return;
		ret = agent_conn_sock_event(a, c, ev);
		break;
	case AGENT_W_STDOUT:
	case AGENT_W_STDERR:
		if (c->dead || w->fd < 0)
			return;
		ret = agent_conn_pipe_read(a, c, w);
		if (ret != -ENOMEM)
			ret = 0;
		break;
	}
	if (ret < 0)
		agent_conn_close(a, c);
	else
		agent_conn_settle(a, c);
}

/* ---- start-up ---- */

static int agent_listen(struct agent *a, const char *unix_path)
{
	int fd = -1, ret;

	if (unix_path) {
		struct sockaddr_un sa = { .sun_family = AF_UNIX };

		if (strlen(unix_path) >= sizeof(sa.sun_path)) {
			ret = -ENAMETOOLONG;
			goto out;
		}
		strcpy(sa.sun_path, unix_path);
		unlink(unix_path);
		fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
		if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
			ret = -errno;
			goto out;
		}
	} else {
		struct sockaddr_vm sa = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = SMOLVM_AGENT_PORT };

		fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
		if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
			ret = -errno;
			goto out;
		}
	}
	if (listen(fd, 64) < 0) {
		ret = -errno;
		goto out;
	}
	a->listen.fd = fd;
	fd = -1;
	ret = agent_watch_set(a, &a->listen, EPOLLIN);
out:
	if (fd >= 0)
		close(fd);
	return ret;
}

/* The readiness signal: one connect to the host's READY port, which the host refuses. */
static void agent_signal_ready(struct agent *a)
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

/* Make sure fds 0-2 are open so that pipes never land there. */
static void agent_fill_std_fds(void)
{
	int fd;

	while ((fd = open("/dev/null", O_RDWR)) >= 0 && fd <= 2)
		;
	if (fd > 2)
		close(fd);
}

static int agent_run(struct agent *a, const char *unix_path)
{
	struct epoll_event evs[16];
	sigset_t mask;
	int ret, n, i;

	sigemptyset(&mask);
	sigaddset(&mask, SIGCHLD);
	if (sigprocmask(SIG_BLOCK, &mask, NULL) < 0) {
		ret = -errno;
		agent_log("sigprocmask: %s", strerror(errno));
		goto out;
	}
	signal(SIGPIPE, SIG_IGN);
	a->epfd = epoll_create1(EPOLL_CLOEXEC);
	a->sig.fd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
	a->devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
	if (a->epfd < 0 || a->sig.fd < 0 || a->devnull < 0) {
		ret = -errno;
		agent_log("start-up (epoll, signalfd, /dev/null): %s", strerror(errno));
		goto out;
	}
	ret = agent_watch_set(a, &a->sig, EPOLLIN);
	if (ret < 0)
		goto out;
	ret = agent_listen(a, unix_path);
	if (ret < 0) {
		agent_log("listen on %s: %s", unix_path ? unix_path : "vsock port 52", strerror(-ret));
		goto out;
	}
	if (!unix_path)
		agent_signal_ready(a);
	agent_reap(a); /* children that exited before the signalfd existed */
	for (;;) {
		n = epoll_wait(a->epfd, evs, 16, agent_timeouts(a));
		if (n < 0 && errno != EINTR) {
			ret = -errno;
			agent_log("epoll_wait: %s", strerror(errno));
			goto out;
		}
		for (i = 0; i < n; i++)
			agent_dispatch(a, evs[i].data.ptr, evs[i].events);
		while (a->graveyard) {
			struct agent_conn *c = a->graveyard;
			a->graveyard = c->next;
			agent_conn_free(c);
		}
	}
out:
	return ret;
}

int main(int argc, char **argv)
{
	static struct agent a = {
		.epfd = -1,
		.devnull = -1,
		.listen = { AGENT_W_LISTEN, -1, 0, NULL },
		.sig = { AGENT_W_SIGNAL, -1, 0, NULL },
		.ready = { AGENT_W_READY, -1, 0, NULL },
	};
	const char *unix_path = NULL;

	/* As /init the kernel passes unknown command-line words as arguments: only --unix is ours. */
	if (argc >= 2 && strcmp(argv[1], "--unix") == 0) {
		if (argc != 3) {
			fprintf(stderr, "usage: %s [--unix PATH]\n", argv[0]);
			return 2;
		}
		unix_path = argv[2];
		a.unix_mode = true;
		/* stand in for PID 1: orphans of the commands are reparented to us and reaped */
		if (prctl(PR_SET_CHILD_SUBREAPER, 1) < 0)
			agent_log("PR_SET_CHILD_SUBREAPER: %s", strerror(errno));
	} else {
		agent_setup_system();
	}
	agent_fill_std_fds();
	return agent_run(&a, unix_path) < 0 ? 1 : 0;
}
