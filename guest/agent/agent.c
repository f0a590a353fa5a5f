/* Guest agent: PID 1 of the smolvm guest; runs the host's EXEC requests as `/bin/sh -c`, streams their output back, moves files (PUT/GET) and sets up the overlay root. */
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
#include <limits.h>
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
#include "netcfg.h"
#include "relay.h"

#ifndef BLKGETSIZE64
#define BLKGETSIZE64 _IOR(0x12, 114, size_t) /* <linux/fs.h>, which clashes with <sys/mount.h> */
#endif

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
/*
 * File transfers use buffers of AGENT_XFER_CHUNK bytes from a small pool, so
 * that their pages are touched once, not per transfer. A GET reads the next
 * chunk only when less than one is queued (at most two per connection); a
 * PUT makes at most 3 * AGENT_PUT_BURST reads per wake-up (fairness).
 */
#define AGENT_XFER_CHUNK (256u << 10)
#define AGENT_POOL_MAX 4
#define AGENT_PUT_BURST 4
#define AGENT_PATH_MAX 4096 /* PUT/GET path bytes, NUL included */

/* SETUP with SMOLVM_SETUP_ROOT: where the disks are mounted (init mode). */
#define AGENT_IMAGE_DEV "/dev/vda"
#define AGENT_SCRATCH_DEV "/dev/vdb"
#define AGENT_IMAGE_DIR "/run/smolvm/image"
#define AGENT_SCRATCH_DIR "/run/smolvm/scratch"
#define AGENT_ROOT_DIR "/run/smolvm/root"
#define AGENT_ROOT_WAIT_MS 60000u /* how long /dev/vdb may stay at 0 bytes */
#define AGENT_ROOT_POLL_MS 10u

static const char *const agent_base_env[] = {
	"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
	"HOME=/root",
	"LANG=C.UTF-8",
	"TERM=dumb",
};
#define AGENT_N_BASE_ENV (sizeof(agent_base_env) / sizeof(agent_base_env[0]))

enum agent_watch_kind {
	AGENT_W_LISTEN,
	AGENT_W_SIGNAL,
	AGENT_W_READY,
	AGENT_W_SOCK,
	AGENT_W_STDOUT,
	AGENT_W_STDERR,
	AGENT_W_STDIN,
	AGENT_W_PEER, /* FORWARD: the guest TCP connection, in `out` */
};

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
	bool pooled; /* AGENT_XFER_CHUNK of payload room: goes back to the pool when sent */
	uint8_t data[];
};

enum agent_conn_state {
	AGENT_C_HANDSHAKE, /* --unix only: waiting for "CONNECT <port>\n" */
	AGENT_C_HEADER,    /* reading the request frame header (EXEC, SETUP, PUT, GET) */
	AGENT_C_PAYLOAD,   /* reading the request payload */
	AGENT_C_RUNNING,   /* the shell runs; output is streamed */
	AGENT_C_ROOT_WAIT, /* SETUP ROOT: waiting for the scratch disk to get its size */
	AGENT_C_PUT,       /* READY sent; DATA frames are written to the temporary file */
	AGENT_C_GET,       /* READY sent; the file is streamed in DATA frames as the socket drains */
	AGENT_C_CLOSING,   /* EXIT or ERROR queued; close once the queue is sent */
	AGENT_C_RELAY,     /* FORWARD: bytes relayed between sock and the TCP connection in `out` */
};

struct agent_conn {
	struct agent_conn *next;
	struct agent_watch sock, out, err;
	struct agent_watch in; /* EXEC with SMOLVM_EXEC_STDIN: the write end of the command's stdin; fd -1 once closed */
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
	/* PUT / GET */
	int xfd;              /* the file being written or read; -1 */
	char *tmp_path;       /* PUT: the temporary file until it is renamed; NULL */
	char *path;           /* PUT / GET: the path the host named */
	uint64_t xsize;       /* bytes of DATA announced (PUT) or the file's size (GET) */
	uint64_t xdone;       /* bytes received (PUT) or queued (GET) so far */
	uint32_t xmode;       /* PUT: permission bits */
	uint32_t xframe_left; /* PUT: payload bytes of the current DATA frame still to read; 0 = a header is next */
	int xerr;             /* PUT: the first write error; DATA is then read and dropped */
	struct agent_chunk *xbuf; /* PUT: receive buffer (pooled) */
	/* SETUP ROOT */
	uint64_t poll_at_ms;
	struct relay relay; /* FORWARD (its b is out.fd) */
	/* EXEC with SMOLVM_EXEC_STDIN: the STDIN frame being read and written to the pipe */
	bool stdin_on;            /* STDIN frames follow EXEC */
	bool stdin_eof;           /* the empty STDIN frame came */
	struct smolvm_frame ihdr;
	uint32_t igot;            /* bytes of ihdr read; AGENT_HDR = in a payload */
	uint8_t *ibuf;            /* payload of the current frame (ilen bytes) */
	uint32_t ilen, iread, iwritten;
};

struct agent {
	bool unix_mode;
	int epfd, devnull;
	struct agent_watch listen, sig, ready;
	struct agent_conn *conns, *graveyard;
	int nconns;
	struct agent_conn *root_conn; /* the SETUP waiting for the scratch disk, or NULL */
};

/* What boot (init mode) left for SETUP ROOT. */
static struct {
	bool image_mounted;
	bool root_done;
	int image_err;         /* why the image is not mounted */
	char image_error[200];
} agent_boot;

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

/* mkdir -p: every missing folder of path (absolute). Returns 0 or -errno. */
static int agent_mkdir_p(const char *path, mode_t mode)
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
static bool agent_cmdline_has(const char *word)
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

static void agent_image_failed(int err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void agent_image_failed(int err, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(agent_boot.image_error, sizeof(agent_boot.image_error), fmt, ap);
	va_end(ap);
	agent_boot.image_err = err;
	agent_log("%s", agent_boot.image_error);
}

/*
 * Read the files the image lists in /etc/smolvm/warm.list (the shell, libc, python3 and
 * its start-up modules) into the page cache before the base snapshot is taken: every VM
 * restored from it then starts its first commands without waiting for those disk reads.
 */
static void agent_warm_image(void)
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
static void agent_mount_image(void)
{
	int ret, tries;

	if (!agent_cmdline_has("smolvm.image=vda")) {
		agent_boot.image_err = ENODEV;
		snprintf(agent_boot.image_error, sizeof(agent_boot.image_error),
			 "the kernel command line has no smolvm.image=vda (the VM was started without an image)");
		return;
	}
	ret = agent_mkdir_p(AGENT_IMAGE_DIR, 0755);
	if (ret < 0) {
		agent_image_failed(-ret, "mkdir -p %s: %s", AGENT_IMAGE_DIR, strerror(-ret));
		return;
	}
	/* The disk is probed before init runs; give a late device node up to 2 s anyway. */
	for (tries = 0;; tries++) {
		if (mount(AGENT_IMAGE_DEV, AGENT_IMAGE_DIR, "ext4", MS_RDONLY, "noload") == 0)
			break;
		if ((errno != ENOENT && errno != ENXIO) || tries >= 200) {
			agent_image_failed(errno, "mount %s (ext4, read-only) on %s: %s", AGENT_IMAGE_DEV, AGENT_IMAGE_DIR,
					   strerror(errno));
			return;
		}
		usleep(10000);
	}
	agent_boot.image_mounted = true;
	agent_warm_image();
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
	if (getpid() == 1)
		agent_mount_image();
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

/* Free transfer chunks, kept so that their pages stay touched. */
static struct agent_chunk *agent_pool[AGENT_POOL_MAX];
static int agent_pool_n;

static void agent_chunk_free(struct agent_chunk *ch)
{
	if (ch && ch->pooled && agent_pool_n < AGENT_POOL_MAX) {
		agent_pool[agent_pool_n++] = ch;
		return;
	}
	free(ch);
}

static void agent_chunk_header(struct agent_chunk *ch, uint16_t type, uint32_t len)
{
	struct smolvm_frame hdr = { htole32(SMOLVM_PROTO_MAGIC), htole16(type), 0, htole32(len) };

	memcpy(ch->data, &hdr, AGENT_HDR);
	ch->len = AGENT_HDR + len;
}

static struct agent_chunk *agent_chunk_frame(uint16_t type, uint32_t cap)
{
	struct agent_chunk *ch = malloc(sizeof(*ch) + AGENT_HDR + cap);

	if (!ch)
		return NULL;
	ch->next = NULL;
	ch->off = 0;
	ch->pooled = false;
	agent_chunk_header(ch, type, cap);
	return ch;
}

/* A chunk with AGENT_XFER_CHUNK bytes of payload room, from the pool when it has one. */
static struct agent_chunk *agent_chunk_xfer(uint16_t type)
{
	struct agent_chunk *ch = agent_pool_n ? agent_pool[--agent_pool_n] : agent_chunk_frame(type, AGENT_XFER_CHUNK);

	if (!ch)
		return NULL;
	ch->next = NULL;
	ch->off = 0;
	ch->pooled = true;
	agent_chunk_header(ch, type, AGENT_XFER_CHUNK);
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
	if (len)
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
			agent_chunk_free(ch);
		}
	}
	return 0;
}

/* ---- connection lifetime ---- */

/* End a transfer's file state: close the file and remove a temporary file not renamed into place. */
static void agent_conn_xfer_drop(struct agent_conn *c)
{
	if (c->xfd >= 0)
		close(c->xfd);
	c->xfd = -1;
	if (c->tmp_path && unlink(c->tmp_path) < 0)
		agent_log("unlink %s: %s", c->tmp_path, strerror(errno));
	free(c->tmp_path);
	c->tmp_path = NULL;
	agent_chunk_free(c->xbuf);
	c->xbuf = NULL;
}

static void agent_conn_close(struct agent *a, struct agent_conn *c)
{
	struct agent_conn **pp;

	if (c->pid > 0)
		kill(-c->pid, SIGKILL); /* the host went away: stop the whole process group */
	c->pid = 0;
	agent_conn_xfer_drop(c); /* a cut PUT leaves no file behind */
	if (a->root_conn == c)
		a->root_conn = NULL;
	if (c->state == AGENT_C_RELAY) {
		c->relay.b = -1; /* closed as `out` below */
		relay_end(&c->relay);
	}
	agent_watch_close(a, &c->sock);
	agent_watch_close(a, &c->out);
	agent_watch_close(a, &c->err);
	agent_watch_close(a, &c->in);
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
		agent_chunk_free(ch);
	}
	agent_conn_xfer_drop(c);
	free(c->path);
	free(c->payload);
	free(c->ibuf);
	free(c);
}

static int agent_conn_get_fill(struct agent_conn *c);

/* A whole STDIN frame waits for the command to read it: read nothing more from the host until it does. */
static bool agent_conn_stdin_full(const struct agent_conn *c)
{
	return c->ibuf && c->iread == c->ilen && c->iwritten < c->ilen;
}

/* After any event: send what is queued, close when finished, and set the epoll masks to the state. */
static void agent_conn_settle(struct agent *a, struct agent_conn *c)
{
	uint32_t sock_ev = 0, pipe_ev = 0;
	bool finished;

	if (c->dead)
		return;
	if (c->state == AGENT_C_RELAY) {
		relay_events(&c->relay, &sock_ev, &pipe_ev);
		if (agent_watch_set(a, &c->sock, sock_ev) < 0 || agent_watch_set(a, &c->out, pipe_ev) < 0)
			agent_conn_close(a, c);
		return;
	}
	/* GET: one more chunk when the socket took the last one (fair: one per wake-up) */
	finished = c->state == AGENT_C_GET && !c->blocked && agent_conn_get_fill(c) < 0;
	finished = finished || (c->qhead && !c->blocked && agent_conn_flush(c) < 0);
	finished = finished || (c->state == AGENT_C_CLOSING && !c->qhead);
	if (!finished) {
		if (c->state != AGENT_C_CLOSING && !agent_conn_stdin_full(c))
			sock_ev |= EPOLLIN;
		if (c->blocked || c->state == AGENT_C_GET)
			sock_ev |= EPOLLOUT; /* GET: level-triggered EPOLLOUT drives the next read of the file */
		/* back-pressure: a slow host pauses the command's pipes (it then blocks writing them) */
		if (c->qbytes >= AGENT_QUEUE_HIGH)
			c->paused = true;
		else if (c->qbytes < AGENT_QUEUE_LOW)
			c->paused = false;
		if (!c->paused)
			pipe_ev = EPOLLIN;
		finished = agent_watch_set(a, &c->sock, sock_ev) < 0 || agent_watch_set(a, &c->out, pipe_ev) < 0 ||
			   agent_watch_set(a, &c->err, pipe_ev) < 0 ||
			   agent_watch_set(a, &c->in, c->iwritten < c->iread ? EPOLLOUT : 0) < 0;
	}
	if (finished)
		agent_conn_close(a, c);
}

/*
 * Queue an ERROR frame (err: the errno the message is about, or 0 for a
 * protocol error), end any transfer, and close the connection once it is sent.
 */
static int agent_conn_fail_code(struct agent_conn *c, int err, enum smolvm_error_code code, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
static int agent_conn_fail_code(struct agent_conn *c, int err, enum smolvm_error_code code, const char *fmt, ...)
{
	struct smolvm_error e = { (int32_t)htole32((uint32_t)err), htole32((uint32_t)code) };
	uint8_t msg[sizeof(e) + 256];
	va_list ap;

	memcpy(msg, &e, sizeof(e));
	va_start(ap, fmt);
	vsnprintf((char *)msg + sizeof(e), sizeof(msg) - sizeof(e), fmt, ap);
	va_end(ap);
	free(c->payload);
	c->payload = NULL;
	agent_conn_xfer_drop(c);
	c->state = AGENT_C_CLOSING;
	return agent_conn_frame(c, SMOLVM_ERROR, msg, (uint32_t)(sizeof(e) + strlen((char *)msg + sizeof(e))));
}

/* agent_conn_fail_code() about the request as a whole. */
#define agent_conn_fail(c, err, ...) agent_conn_fail_code(c, err, SMOLVM_ERRC_REQUEST, __VA_ARGS__)

/* Queue EXIT with exit code 0 (SETUP, PUT and GET done) and close once it is sent. */
static int agent_conn_done(struct agent_conn *c)
{
	struct smolvm_exit ex = { 0, 0, 0 };

	free(c->payload);
	c->payload = NULL;
	c->state = AGENT_C_CLOSING;
	return agent_conn_frame(c, SMOLVM_EXIT, &ex, sizeof(ex));
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
	int po[2] = { -1, -1 }, pe[2] = { -1, -1 }, pi[2] = { -1, -1 };
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
		ret = agent_conn_fail(c, 0, "bad EXEC frame: the command string is not NUL-terminated inside the payload");
		goto out;
	}
	cwd = agent_next_string(p, len, &off);
	if (!cwd) {
		ret = agent_conn_fail(c, 0, "bad EXEC frame: the cwd string is missing or not NUL-terminated");
		goto out;
	}
	if (n_env > AGENT_MAX_ENV) {
		ret = agent_conn_fail(c, 0, "bad EXEC frame: n_env=%u exceeds the limit of %u", n_env, AGENT_MAX_ENV);
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
			ret = agent_conn_fail(c, 0, "bad EXEC frame: n_env=%u but env entry %u is missing or not NUL-terminated",
					      n_env, i);
			goto out;
		}
		eq = strchr(kv, '=');
		if (!eq || eq == kv) {
			ret = agent_conn_fail(c, 0, "bad EXEC frame: env entry %u \"%.60s\" is not KEY=VALUE", i, kv);
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
		ret = agent_conn_fail(c, 0, "bad EXEC frame: %u bytes after the command, cwd and n_env=%u env entries",
				      len - off, n_env);
		goto out;
	}
	if (!cwd[0])
		cwd = "/";
	if (stat(cwd, &st) < 0) {
		ret = agent_conn_fail_code(c, errno, SMOLVM_ERRC_CWD, "cwd %s: %s", cwd, strerror(errno));
		goto out;
	}
	if (!S_ISDIR(st.st_mode)) {
		ret = agent_conn_fail_code(c, ENOTDIR, SMOLVM_ERRC_CWD, "cwd %s: %s", cwd, strerror(ENOTDIR));
		goto out;
	}
	if (le32toh(ex.flags) & ~SMOLVM_EXEC_STDIN) {
		ret = agent_conn_fail(c, EINVAL, "bad EXEC frame: unknown flags 0x%x", le32toh(ex.flags));
		goto out;
	}
	c->stdin_on = le32toh(ex.flags) & SMOLVM_EXEC_STDIN;
	if (c->stdin_on && (pipe2(pi, O_CLOEXEC) < 0 || agent_set_nonblock(pi[1]) < 0)) {
		ret = agent_conn_fail(c, errno, "cannot make the stdin pipe: %s", strerror(errno));
		goto out;
	}

	if (pipe2(po, O_CLOEXEC) < 0 || pipe2(pe, O_CLOEXEC) < 0 || agent_set_nonblock(po[0]) < 0 ||
	    agent_set_nonblock(pe[0]) < 0) {
		ret = agent_conn_fail(c, errno, "cannot make output pipes: %s", strerror(errno));
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
		ret = posix_spawn_file_actions_adddup2(&fa, c->stdin_on ? pi[0] : a->devnull, 0);
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
		ret = agent_conn_fail(c, err, "cannot run /bin/sh in %s: %s", cwd, strerror(err));
		goto out;
	}
	c->pid = pid;
	c->out = (struct agent_watch){ AGENT_W_STDOUT, po[0], 0, c };
	c->err = (struct agent_watch){ AGENT_W_STDERR, pe[0], 0, c };
	c->in = (struct agent_watch){ AGENT_W_STDIN, pi[1], 0, c };
	po[0] = pe[0] = pi[1] = -1;
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
		if (pi[i] >= 0)
			close(pi[i]);
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
	agent_watch_close(a, &c->in); /* input still coming is read and dropped */
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
	raw->pooled = false;
	memcpy(raw->data, reply, (size_t)n);
	agent_conn_enqueue(c, raw);
	c->state = AGENT_C_HEADER;
	return 0;
}

/* ---- SETUP ---- */

/* Move the mount at from to to (mkdir'ing to first). Returns 0 or -errno. */
static int agent_move_mount(const char *from, const char *to)
{
	if (mkdir(to, 0755) < 0 && errno != EEXIST)
		return -errno;
	return mount(from, to, NULL, MS_MOVE, NULL) < 0 ? -errno : 0;
}

/*
 * The scratch disk has its size: mount it, lay the overlay over the image,
 * move /dev, /proc and /sys into it, give it a fresh /run and make it the
 * root of the agent (and so of every later command). On failure msg names the
 * step, what was done is undone as far as it can be, and -errno is returned.
 */
static int agent_root_switch(char *msg, size_t cap)
{
	static const char *const moved[] = { "/dev", "/proc", "/sys" };
	const char *step;
	char dst[64];
	int ret, n_moved = 0;
	bool scratch = false, overlay = false, run = false;

	ret = agent_mkdir_p(AGENT_SCRATCH_DIR, 0755);
	step = "mkdir -p " AGENT_SCRATCH_DIR;
	if (ret < 0)
		goto fail;
	step = "mount " AGENT_SCRATCH_DEV " (ext4) on " AGENT_SCRATCH_DIR;
	/* noinit_itable: the host made the file system with lazy init; zeroing tables here would be slow */
	if (mount(AGENT_SCRATCH_DEV, AGENT_SCRATCH_DIR, "ext4", MS_NOATIME, "noinit_itable") < 0)
		goto fail_errno;
	scratch = true;
	step = "mkdir " AGENT_SCRATCH_DIR "/upper";
	if (mkdir(AGENT_SCRATCH_DIR "/upper", 0755) < 0 && errno != EEXIST)
		goto fail_errno;
	step = "mkdir " AGENT_SCRATCH_DIR "/work";
	if (mkdir(AGENT_SCRATCH_DIR "/work", 0755) < 0 && errno != EEXIST)
		goto fail_errno;
	ret = agent_mkdir_p(AGENT_ROOT_DIR, 0755);
	step = "mkdir -p " AGENT_ROOT_DIR;
	if (ret < 0)
		goto fail;
	step = "mount overlay on " AGENT_ROOT_DIR;
	if (mount("overlay", AGENT_ROOT_DIR, "overlay", 0,
		  "lowerdir=" AGENT_IMAGE_DIR ",upperdir=" AGENT_SCRATCH_DIR "/upper,workdir=" AGENT_SCRATCH_DIR "/work") < 0)
		goto fail_errno;
	overlay = true;
	for (; n_moved < 3; n_moved++) {
		snprintf(dst, sizeof(dst), "%s%s", AGENT_ROOT_DIR, moved[n_moved]);
		ret = agent_move_mount(moved[n_moved], dst);
		step = moved[n_moved];
		if (ret < 0) {
			snprintf(msg, cap, "move %s into the new root: %s", moved[n_moved], strerror(-ret));
			goto undo;
		}
	}
	step = "mount tmpfs on " AGENT_ROOT_DIR "/run";
	if ((mkdir(AGENT_ROOT_DIR "/run", 0755) < 0 && errno != EEXIST) ||
	    mount("tmpfs", AGENT_ROOT_DIR "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755") < 0)
		goto fail_errno;
	run = true;
	/* switch_root: the new root's mount goes over / (not pivot_root: the initramfs cannot be unmounted) */
	step = "chdir " AGENT_ROOT_DIR;
	if (chdir(AGENT_ROOT_DIR) < 0)
		goto fail_errno;
	step = "move " AGENT_ROOT_DIR " to /";
	if (mount(".", "/", NULL, MS_MOVE, NULL) < 0) {
		ret = -errno;
		if (chdir("/") < 0)
			agent_log("chdir /: %s", strerror(errno));
		goto fail;
	}
	/* from here there is no way back: the overlay is mounted over / */
	if (chroot(".") < 0 || chdir("/") < 0) {
		ret = -errno;
		snprintf(msg, cap, "chroot into the new root: %s", strerror(-ret));
		return ret;
	}
	return 0;

fail_errno:
	ret = -errno;
fail:
	snprintf(msg, cap, "%s: %s", step, strerror(-ret));
undo:
	if (run && umount2(AGENT_ROOT_DIR "/run", MNT_DETACH) < 0)
		agent_log("undo: umount %s/run: %s", AGENT_ROOT_DIR, strerror(errno));
	while (n_moved-- > 0) {
		snprintf(dst, sizeof(dst), "%s%s", AGENT_ROOT_DIR, moved[n_moved]);
		if (mount(dst, moved[n_moved], NULL, MS_MOVE, NULL) < 0)
			agent_log("undo: move %s back: %s", moved[n_moved], strerror(errno));
	}
	if (overlay && umount2(AGENT_ROOT_DIR, MNT_DETACH) < 0)
		agent_log("undo: umount %s: %s", AGENT_ROOT_DIR, strerror(errno));
	if (scratch && umount2(AGENT_SCRATCH_DIR, MNT_DETACH) < 0)
		agent_log("undo: umount %s: %s", AGENT_SCRATCH_DIR, strerror(errno));
	return ret;
}

/*
 * SETUP ROOT, waiting for the scratch disk: after a restore it is a 0-byte
 * placeholder until the VMM's config-change interrupt and the kernel's
 * workqueue give it its size. Called at once and then every
 * AGENT_ROOT_POLL_MS from agent_timeouts(). Returns 0 (EXIT or ERROR queued,
 * or still waiting) or -ENOMEM.
 */
/* SETUP NET: what the last SETUP asked for; the files are written once the root is final. */
static struct netcfg agent_net;
static bool agent_net_files_due;

/* Write /etc/resolv.conf and /etc/hosts if a SETUP NET is waiting for them. 0, or ERROR queued. */
static int agent_net_files(struct agent_conn *c)
{
	char msg[200], host[SMOLVM_SETUP_MAX_HOSTNAME + 1] = "";
	int ret;

	if (!agent_net_files_due)
		return 0;
	agent_net_files_due = false;
	gethostname(host, sizeof(host) - 1);
	ret = netcfg_files(&agent_net, host, msg, sizeof(msg));
	return ret ? agent_conn_fail(c, -ret, "SETUP net: %s", msg) : 0;
}

static int agent_conn_root_poll(struct agent *a, struct agent_conn *c)
{
	uint64_t size = 0, now;
	char msg[200];
	int fd, err = 0, ret;

	fd = open(AGENT_SCRATCH_DEV, O_RDONLY | O_CLOEXEC);
	if (fd < 0 || ioctl(fd, BLKGETSIZE64, &size) < 0)
		err = errno;
	if (fd >= 0)
		close(fd);
	if (size == 0) {
		now = agent_now_ms();
		if (now < c->deadline_ms) {
			c->poll_at_ms = now + AGENT_ROOT_POLL_MS;
			return 0;
		}
		a->root_conn = NULL;
		return agent_conn_fail(c, err ? err : ETIMEDOUT, "SETUP root: the scratch disk %s %s after %u s",
				       AGENT_SCRATCH_DEV, err ? strerror(err) : "still has 0 bytes",
				       AGENT_ROOT_WAIT_MS / 1000);
	}
	a->root_conn = NULL;
	ret = agent_root_switch(msg, sizeof(msg));
	if (ret < 0)
		return agent_conn_fail(c, -ret, "SETUP root: %s", msg);
	agent_boot.root_done = true;
	agent_log("root: overlay of %s and %s (%llu MiB)", AGENT_IMAGE_DEV, AGENT_SCRATCH_DEV,
		  (unsigned long long)(size >> 20));
	ret = agent_net_files(c);
	if (ret < 0 || c->state == AGENT_C_CLOSING)
		return ret; /* ERROR queued, or no memory for it */
	return agent_conn_done(c);
}

/* Apply entropy, clock and hostname (init mode only). */
static void agent_setup_identity(const uint8_t *entropy, uint32_t elen, const uint8_t *host, uint32_t hlen,
				 uint64_t wall)
{
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

/*
 * SETUP: fresh entropy (credited), the host's wall clock and the hostname, so
 * that sandboxes restored from one snapshot differ; with SMOLVM_SETUP_ROOT
 * also the overlay root. In --unix test mode the frame is checked but nothing
 * is applied (that would change the host).
 */
static int agent_conn_setup(struct agent *a, struct agent_conn *c)
{
	uint32_t len = le32toh(c->hdr.len);
	struct smolvm_setup su;
	const uint8_t *entropy, *host;
	uint32_t elen, hlen, flags;

	if (len < sizeof(su))
		return agent_conn_fail(c, 0, "bad SETUP frame: %u bytes, shorter than its header", len);
	memcpy(&su, c->payload, sizeof(su));
	elen = le32toh(su.entropy_len);
	hlen = le32toh(su.hostname_len);
	flags = le32toh(su.flags);
	if (elen > SMOLVM_SETUP_MAX_ENTROPY || hlen > SMOLVM_SETUP_MAX_HOSTNAME ||
	    (uint64_t)sizeof(su) + elen + hlen > len || (!(flags & SMOLVM_SETUP_NET) && sizeof(su) + elen + hlen != len))
		return agent_conn_fail(c, 0, "bad SETUP frame: entropy %u, hostname %u, payload %u bytes", elen, hlen,
				       len);
	if (flags & ~(SMOLVM_SETUP_ROOT | SMOLVM_SETUP_NET))
		return agent_conn_fail(c, EINVAL, "bad SETUP frame: unknown flags 0x%x",
				       flags & ~(SMOLVM_SETUP_ROOT | SMOLVM_SETUP_NET));
	entropy = c->payload + sizeof(su);
	host = entropy + elen;
	if ((flags & SMOLVM_SETUP_NET) &&
	    netcfg_parse(host + hlen, len - (uint32_t)sizeof(su) - elen - hlen, &agent_net) < 0)
		return agent_conn_fail(c, EINVAL, "bad SETUP frame: the network part is malformed");
	if (getpid() != 1)
		return agent_conn_done(c);
	agent_setup_identity(entropy, elen, host, hlen, le64toh(su.wall_ns));
	if (flags & SMOLVM_SETUP_NET) {
		char msg[200];
		int ret = netcfg_link(&agent_net, msg, sizeof(msg));

		if (ret)
			return agent_conn_fail(c, -ret, "SETUP net: %s", msg);
		agent_net_files_due = true;
	}
	if (!(flags & SMOLVM_SETUP_ROOT) || agent_boot.root_done) {
		int ret = agent_net_files(c);

		if (ret < 0 || c->state == AGENT_C_CLOSING)
			return ret; /* ERROR queued, or no memory for it */
		return agent_conn_done(c);
	}
	if (!agent_boot.image_mounted)
		return agent_conn_fail(c, agent_boot.image_err ? agent_boot.image_err : ENODEV,
				       "SETUP root: the image is not mounted: %s",
				       agent_boot.image_error[0] ? agent_boot.image_error : "unknown reason");
	if (a->root_conn)
		return agent_conn_fail(c, EBUSY, "SETUP root: another SETUP is setting up the root");
	free(c->payload);
	c->payload = NULL;
	a->root_conn = c;
	c->state = AGENT_C_ROOT_WAIT;
	c->deadline_ms = agent_now_ms() + AGENT_ROOT_WAIT_MS;
	return agent_conn_root_poll(a, c);
}

/* ---- PUT / GET ---- */

/* The NUL-terminated absolute path at p[0..len) of a PUT or GET frame; NULL with ERROR queued (*ret set). */
static const char *agent_conn_path(struct agent_conn *c, const char *what, const uint8_t *p, uint32_t len, int *ret)
{
	const char *path = (const char *)p;

	*ret = 0;
	if (len == 0 || p[len - 1] != 0 || strlen(path) != len - 1) {
		*ret = agent_conn_fail(c, 0, "bad %s frame: the path is not one NUL-terminated string", what);
		return NULL;
	}
	if (len > AGENT_PATH_MAX) {
		*ret = agent_conn_fail(c, ENAMETOOLONG, "%s: the path is longer than %u bytes", what, AGENT_PATH_MAX - 1);
		return NULL;
	}
	if (path[0] != '/') {
		*ret = agent_conn_fail(c, EINVAL, "%s %s: the path must be absolute", what, path);
		return NULL;
	}
	return path;
}

/* All DATA arrived: fail with the write error, or set the mode and rename the file into place. */
static int agent_conn_put_finish(struct agent_conn *c)
{
	int err = c->xerr;
	const char *step = "write";

	if (!err && fchmod(c->xfd, c->xmode & 07777) < 0) {
		err = errno;
		step = "chmod";
	}
	if (!err) {
		int fd = c->xfd;

		c->xfd = -1;
		if (close(fd) < 0) {
			err = errno;
			step = "close";
		} else if (rename(c->tmp_path, c->path) < 0) {
			err = errno;
			step = "rename";
		}
	}
	if (err)
		return agent_conn_fail(c, err, "PUT %s: %s: %s", c->path, step, strerror(err));
	free(c->tmp_path); /* renamed: nothing to remove any more */
	c->tmp_path = NULL;
	agent_conn_xfer_drop(c);
	return agent_conn_done(c);
}

/* PUT: validate, create the temporary file beside the path, answer READY. */
static int agent_conn_put_start(struct agent_conn *c)
{
	uint32_t len = le32toh(c->hdr.len);
	struct smolvm_put put;
	const char *path, *base;
	struct stat st;
	int ret, fd, dir_len;

	if (len < sizeof(put) + 2)
		return agent_conn_fail(c, 0, "bad PUT frame: payload of %u bytes has no room for a path", len);
	memcpy(&put, c->payload, sizeof(put));
	path = agent_conn_path(c, "PUT", c->payload + sizeof(put), len - (uint32_t)sizeof(put), &ret);
	if (!path)
		return ret;
	if (le32toh(put.flags))
		return agent_conn_fail(c, EINVAL, "bad PUT frame: flags 0x%x", le32toh(put.flags));
	base = strrchr(path, '/') + 1;
	if (!*base || (stat(path, &st) == 0 && S_ISDIR(st.st_mode)))
		return agent_conn_fail(c, EISDIR, "PUT %s: %s", path, strerror(EISDIR));
	c->path = strdup(path);
	dir_len = (int)(base - 1 - path);
	/* ".NAME.smolvm-XXXXXX" beside the path; NAME cut so that the name stays under NAME_MAX */
	if (!c->path || asprintf(&c->tmp_path, "%.*s/.%.200s.smolvm-XXXXXX", dir_len, path, base) < 0) {
		c->tmp_path = NULL;
		return -ENOMEM;
	}
	fd = mkostemp(c->tmp_path, O_CLOEXEC);
	if (fd < 0) {
		int err = errno;

		free(c->tmp_path);
		c->tmp_path = NULL;
		return agent_conn_fail(c, err, "PUT %s: cannot create a file in %.*s: %s", path, dir_len ? dir_len : 1,
				       dir_len ? path : "/", strerror(err));
	}
	c->xfd = fd;
	c->xsize = le64toh(put.size);
	c->xmode = le32toh(put.mode);
	c->xdone = 0;
	c->xframe_left = 0;
	c->got = 0;
	free(c->payload);
	c->payload = NULL;
	ret = agent_conn_frame(c, SMOLVM_READY, NULL, 0);
	if (ret < 0)
		return ret;
	c->state = AGENT_C_PUT;
	if (c->xsize == 0)
		return agent_conn_put_finish(c);
	c->xbuf = agent_chunk_xfer(SMOLVM_DATA);
	return c->xbuf ? 0 : -ENOMEM;
}

/* Write buf to the PUT's file unless a write already failed; a failure is remembered for the end. */
static void agent_conn_put_write(struct agent_conn *c, const uint8_t *buf, size_t len)
{
	while (len && !c->xerr) {
		ssize_t n = write(c->xfd, buf, len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			c->xerr = n < 0 ? errno : EIO;
			break;
		}
		buf += n;
		len -= (size_t)n;
	}
}

/* PUT: read DATA frames (a bounded number of reads per wake-up) into the file. */
static int agent_conn_read_put(struct agent_conn *c)
{
	uint8_t *buf = c->xbuf->data + AGENT_HDR;
	int burst = 3 * AGENT_PUT_BURST; /* reads, headers included */
	ssize_t n;

	while (c->state == AGENT_C_PUT && burst > 0) {
		if (!c->xframe_left) {
			n = read(c->sock.fd, (uint8_t *)&c->hdr + c->got, AGENT_HDR - c->got);
		} else {
			n = read(c->sock.fd, buf, c->xframe_left < AGENT_XFER_CHUNK ? c->xframe_left : AGENT_XFER_CHUNK);
		}
		burst--;
		if (n == 0)
			return -ECONNRESET; /* the host gave up: agent_conn_close removes the temporary file */
		if (n < 0)
			return errno == EAGAIN || errno == EINTR ? 0 : -errno;
		if (c->xframe_left) {
			c->xframe_left -= (uint32_t)n;
			c->xdone += (uint64_t)n;
			agent_conn_put_write(c, buf, (size_t)n);
		} else {
			uint32_t magic, type, len;

			c->got += (uint32_t)n;
			if (c->got < AGENT_HDR)
				continue;
			c->got = 0;
			magic = le32toh(c->hdr.magic);
			type = le16toh(c->hdr.type);
			len = le32toh(c->hdr.len);
			if (magic != SMOLVM_PROTO_MAGIC || type != SMOLVM_DATA || len > SMOLVM_MAX_PAYLOAD)
				return agent_conn_fail(c, 0, "bad frame during PUT %s: magic 0x%08x type %u length %u", c->path,
						       magic, type, len);
			if (len > c->xsize - c->xdone)
				return agent_conn_fail(c, 0, "bad DATA frame during PUT %s: %u bytes, only %llu announced",
						       c->path, len, (unsigned long long)(c->xsize - c->xdone));
			c->xframe_left = len;
		}
		if (c->xdone == c->xsize && !c->xframe_left)
			return agent_conn_put_finish(c);
	}
	return 0;
}

/* GET: open the file, answer READY with its size and mode (then settle streams it). */
static int agent_conn_get_start(struct agent_conn *c)
{
	struct smolvm_file info;
	const char *path;
	struct stat st;
	int ret, err;

	path = agent_conn_path(c, "GET", c->payload, le32toh(c->hdr.len), &ret);
	if (!path)
		return ret;
	/* O_NONBLOCK: a FIFO must not hang the agent in open(); regular files ignore it */
	c->xfd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
	if (c->xfd < 0 || fstat(c->xfd, &st) < 0) {
		err = errno;
		return agent_conn_fail(c, err, "GET %s: %s", path, strerror(err));
	}
	if (!S_ISREG(st.st_mode)) {
		err = S_ISDIR(st.st_mode) ? EISDIR : EINVAL;
		return agent_conn_fail(c, err, "GET %s: %s", path, S_ISDIR(st.st_mode) ? strerror(err) : "not a regular file");
	}
	c->path = strdup(path);
	if (!c->path)
		return -ENOMEM;
	free(c->payload);
	c->payload = NULL;
	c->xsize = (uint64_t)st.st_size;
	c->xdone = 0;
	info.size = htole64(c->xsize);
	info.mode = htole32((uint32_t)st.st_mode);
	info.reserved = 0;
	c->state = AGENT_C_GET;
	return agent_conn_frame(c, SMOLVM_READY, &info, sizeof(info));
}

/*
 * GET: when less than one chunk is queued, read the next one from the file
 * (bounded memory; EPOLLOUT brings us back); after the last, queue EXIT.
 * Returns 0 (a file error becomes ERROR) or -ENOMEM.
 */
static int agent_conn_get_fill(struct agent_conn *c)
{
	struct agent_chunk *ch;
	uint64_t left = c->xsize - c->xdone;
	ssize_t n;

	if (c->qbytes >= AGENT_XFER_CHUNK)
		return 0;
	if (left == 0) {
		agent_conn_xfer_drop(c);
		return agent_conn_done(c);
	}
	ch = agent_chunk_xfer(SMOLVM_DATA);
	if (!ch)
		return -ENOMEM;
	do
		n = read(c->xfd, ch->data + AGENT_HDR, left < AGENT_XFER_CHUNK ? (size_t)left : AGENT_XFER_CHUNK);
	while (n < 0 && errno == EINTR);
	if (n <= 0) {
		int err = n < 0 ? errno : EIO;

		agent_chunk_free(ch);
		if (n == 0)
			return agent_conn_fail(c, EIO, "GET %s: the file shrank to %llu bytes while it was read (%llu announced)",
					       c->path, (unsigned long long)c->xdone, (unsigned long long)c->xsize);
		return agent_conn_fail(c, err, "GET %s: read: %s", c->path, strerror(err));
	}
	agent_chunk_header(ch, SMOLVM_DATA, (uint32_t)n);
	agent_conn_enqueue(c, ch);
	c->xdone += (uint64_t)n;
	if (c->xdone == c->xsize) {
		agent_conn_xfer_drop(c);
		return agent_conn_done(c);
	}
	return 0;
}

/* ---- port forwards ---- */

/* FORWARD: connect to the guest's 127.0.0.1:port and relay; a refused connect closes the connection. */
static int agent_conn_forward(struct agent_conn *c)
{
	struct smolvm_forward f;
	int ret;

	memcpy(&f, c->payload, sizeof(f));
	free(c->payload);
	c->payload = NULL;
	if (le32toh(f.port) < 1 || le32toh(f.port) > 65535 || f.flags)
		return -EINVAL;
	ret = relay_start(&c->relay, c->sock.fd, (uint16_t)le32toh(f.port));
	if (ret < 0)
		return ret; /* nothing listens there: the host client sees the close */
	c->state = AGENT_C_RELAY;
	c->out = (struct agent_watch){ AGENT_W_PEER, c->relay.b, 0, c };
	return relay_pump(&c->relay) != 0 ? -ECONNRESET : 0;
}

/* ---- reading the request ---- */

/* The request frame is complete: dispatch on its type. */
static int agent_conn_request(struct agent *a, struct agent_conn *c)
{
	switch (le16toh(c->hdr.type)) {
	case SMOLVM_SETUP:
		return agent_conn_setup(a, c);
	case SMOLVM_PUT:
		return agent_conn_put_start(c);
	case SMOLVM_GET:
		return agent_conn_get_start(c);
	case SMOLVM_FORWARD:
		return agent_conn_forward(c);
	default:
		return agent_conn_start(a, c);
	}
}

/* Read the request frame (EXEC, SETUP, PUT or GET); act on it when it is complete. */
static int agent_conn_read_request(struct agent *a, struct agent_conn *c)
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
				return agent_conn_fail(c, 0, "bad frame: magic 0x%08x, want 0x%08x (protocol %.4s)", magic,
						       SMOLVM_PROTO_MAGIC, (const char *)&(uint32_t){ htole32(SMOLVM_PROTO_MAGIC) });
			if (type == SMOLVM_FORWARD && len != sizeof(struct smolvm_forward))
				return -EINVAL; /* FORWARD gets no answer: just close */
			if (type != SMOLVM_EXEC && type != SMOLVM_SETUP && type != SMOLVM_PUT && type != SMOLVM_GET &&
			    type != SMOLVM_FORWARD)
				return agent_conn_fail(c, 0, "bad frame: type %u, want EXEC (%u), SETUP (%u), PUT (%u) or GET (%u)",
						       type, SMOLVM_EXEC, SMOLVM_SETUP, SMOLVM_PUT, SMOLVM_GET);
			if (len > SMOLVM_MAX_PAYLOAD)
				return agent_conn_fail(c, 0, "bad request frame: payload of %u bytes is over the limit of %u", len,
						       SMOLVM_MAX_PAYLOAD);
			if (type == SMOLVM_EXEC && len < sizeof(struct smolvm_exec))
				return agent_conn_fail(c, 0, "bad EXEC frame: payload of %u bytes is shorter than its %zu-byte header",
						       len, sizeof(struct smolvm_exec));
			if ((type == SMOLVM_PUT || type == SMOLVM_GET) && len > sizeof(struct smolvm_put) + AGENT_PATH_MAX)
				return agent_conn_fail(c, ENAMETOOLONG, "bad %s frame: payload of %u bytes, the path is too long",
						       type == SMOLVM_PUT ? "PUT" : "GET", len);
			c->payload = malloc(len ? len : 1);
			if (!c->payload)
				return agent_conn_fail(c, ENOMEM, "out of memory for a request payload of %u bytes", len);
			c->got = 0;
			c->state = AGENT_C_PAYLOAD;
		}
		if (c->state == AGENT_C_PAYLOAD && c->got == le32toh(c->hdr.len))
			return agent_conn_request(a, c);
	}
	return 0;
}

/* While the command runs (or a GET streams, or SETUP waits) the host sends nothing; EOF or an error means it gave up. */
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

/* Write what is buffered of the current STDIN frame to the command's stdin; a closed stdin drops the rest. */
static void agent_conn_stdin_write(struct agent *a, struct agent_conn *c)
{
	while (c->iwritten < c->iread) {
		ssize_t n = c->in.fd < 0 ? -1 : write(c->in.fd, c->ibuf + c->iwritten, c->iread - c->iwritten);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return;
		if (n < 0) {
			agent_watch_close(a, &c->in); /* EPIPE: the command closed its stdin or exited */
			c->iwritten = c->iread;
			return;
		}
		c->iwritten += (uint32_t)n;
	}
}

/* EXEC with SMOLVM_EXEC_STDIN, while the command runs: read STDIN frames and feed their bytes to the pipe. */
static int agent_conn_read_stdin(struct agent *a, struct agent_conn *c)
{
	ssize_t n;

	while (!agent_conn_stdin_full(c)) {
		if (c->igot < AGENT_HDR) {
			n = read(c->sock.fd, (uint8_t *)&c->ihdr + c->igot, AGENT_HDR - c->igot);
		} else {
			n = read(c->sock.fd, c->ibuf + c->iread, c->ilen - c->iread);
		}
		if (n == 0)
			return -ECONNRESET;
		if (n < 0)
			return errno == EAGAIN || errno == EINTR ? 0 : -errno;
		if (c->igot < AGENT_HDR) {
			uint32_t len;

			c->igot += (uint32_t)n;
			if (c->igot < AGENT_HDR)
				continue;
			len = le32toh(c->ihdr.len);
			if (le32toh(c->ihdr.magic) != SMOLVM_PROTO_MAGIC || le16toh(c->ihdr.type) != SMOLVM_STDIN ||
			    len > SMOLVM_MAX_PAYLOAD || c->stdin_eof)
				return agent_conn_fail(c, 0, "bad frame while the command runs: type %u, length %u (want STDIN%s)",
						       le16toh(c->ihdr.type), len, c->stdin_eof ? ", and none after the empty one" : "");
			if (len == 0) {
				c->stdin_eof = true;
				agent_watch_close(a, &c->in); /* the command sees end of file */
				c->igot = 0;
				continue;
			}
			c->ibuf = malloc(len);
			if (!c->ibuf)
				return -ENOMEM;
			c->ilen = len;
			c->iread = c->iwritten = 0;
			continue;
		}
		c->iread += (uint32_t)n;
		agent_conn_stdin_write(a, c);
		if (c->iread == c->ilen && c->iwritten == c->ilen) {
			free(c->ibuf);
			c->ibuf = NULL;
			c->ilen = c->iread = c->iwritten = 0;
			c->igot = 0;
		}
	}
	return 0;
}

/* The command's stdin can take more: write, and finish the frame when it is all written. */
static void agent_conn_stdin_event(struct agent *a, struct agent_conn *c)
{
	agent_conn_stdin_write(a, c);
	if (c->ibuf && c->iread == c->ilen && c->iwritten == c->ilen) {
		free(c->ibuf);
		c->ibuf = NULL;
		c->ilen = c->iread = c->iwritten = 0;
		c->igot = 0;
	}
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
		return agent_conn_read_request(a, c);
	case AGENT_C_PUT:
		return agent_conn_read_put(c);
	case AGENT_C_RUNNING:
		return c->stdin_on ? agent_conn_read_stdin(a, c) : agent_conn_read_running(c);
	case AGENT_C_ROOT_WAIT:
	case AGENT_C_GET:
		return agent_conn_read_running(c);
	case AGENT_C_CLOSING:
	case AGENT_C_RELAY: /* agent_dispatch pumps the relay */
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
	c->in = (struct agent_watch){ AGENT_W_STDIN, -1, 0, c };
	c->xfd = -1;
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

/*
 * Kill the process groups whose deadline passed and poll the scratch disk
 * for a waiting SETUP; return the epoll_wait timeout to the next of these.
 */
static int agent_timeouts(struct agent *a)
{
	uint64_t now = agent_now_ms(), next = UINT64_MAX;
	struct agent_conn *c = a->root_conn;

	if (c && now >= c->poll_at_ms) {
		if (agent_conn_root_poll(a, c) < 0)
			agent_conn_close(a, c);
		else
			agent_conn_settle(a, c);
		now = agent_now_ms();
	}
	if (a->root_conn)
		next = a->root_conn->poll_at_ms;
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
	if (next <= now)
		return 0;
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
		if (c->state == AGENT_C_RELAY) {
			ret = relay_pump(&c->relay);
			if (ret > 0)
				ret = -ECONNRESET; /* both ways done */
			break;
		}
		ret = agent_conn_sock_event(a, c, ev);
		break;
	case AGENT_W_PEER:
		if (c->dead)
			return;
		ret = relay_pump(&c->relay);
		if (ret > 0)
			ret = -ECONNRESET;
		break;
	case AGENT_W_STDOUT:
	case AGENT_W_STDERR:
		if (c->dead || w->fd < 0)
			return;
		ret = agent_conn_pipe_read(a, c, w);
		if (ret != -ENOMEM)
			ret = 0;
		break;
	case AGENT_W_STDIN:
		if (c->dead || w->fd < 0)
			return;
		agent_conn_stdin_event(a, c);
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
