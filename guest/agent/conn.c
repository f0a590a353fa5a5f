/* Host connections of the guest agent: accepting, the output queue, reading and checking request frames, closing. */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <linux/vm_sockets.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "agent.h"

/*
 * Memory is the expensive resource in the guest (every first-touched page is an emulated
 * fault), and so are system calls: the loop avoids needless epoll_ctl/read calls, and file
 * transfers use AGENT_XFER_CHUNK buffers from a small pool, so that their pages are touched
 * once, not per transfer.
 */
#define CONN_QUEUE_HIGH (256u << 10) /* stop reading pipes once this much output is queued... */
#define CONN_QUEUE_LOW (128u << 10)  /* ...and resume below this (hysteresis saves epoll_ctl calls) */
#define CONN_MAX 256
#define CONN_POOL_MAX 4

/* Free transfer chunks, kept so that their pages stay touched. */
static struct agent_chunk *conn_pool[CONN_POOL_MAX];
static int conn_pool_n;

/* ---- the output queue ---- */

void conn_chunk_free(struct agent_chunk *ch)
{
	if (ch && ch->pooled && conn_pool_n < CONN_POOL_MAX) {
		conn_pool[conn_pool_n++] = ch;
		return;
	}
	free(ch);
}

/* A chunk of size bytes (len = size), not pooled. */
static struct agent_chunk *conn_chunk_alloc(size_t size)
{
	struct agent_chunk *ch = malloc(sizeof(*ch) + size);

	if (!ch)
		return NULL;
	ch->next = NULL;
	ch->off = 0;
	ch->len = (uint32_t)size;
	ch->pooled = false;
	return ch;
}

void conn_chunk_header(struct agent_chunk *ch, uint16_t type, uint32_t len)
{
	struct smolvm_frame hdr = { htole32(SMOLVM_PROTO_MAGIC), htole16(type), 0, htole32(len) };

	memcpy(ch->data, &hdr, AGENT_HDR);
	ch->len = AGENT_HDR + len;
}

struct agent_chunk *conn_chunk_frame(uint16_t type, uint32_t cap)
{
	struct agent_chunk *ch = conn_chunk_alloc(AGENT_HDR + cap);

	if (ch)
		conn_chunk_header(ch, type, cap);
	return ch;
}

struct agent_chunk *conn_chunk_xfer(uint16_t type)
{
	struct agent_chunk *ch = conn_pool_n ? conn_pool[--conn_pool_n] : conn_chunk_alloc(AGENT_HDR + AGENT_XFER_CHUNK);

	if (!ch)
		return NULL;
	ch->next = NULL;
	ch->off = 0;
	ch->pooled = true;
	conn_chunk_header(ch, type, AGENT_XFER_CHUNK);
	return ch;
}

void conn_enqueue(struct agent_conn *c, struct agent_chunk *ch)
{
	if (c->qtail)
		c->qtail->next = ch;
	else
		c->qhead = ch;
	c->qtail = ch;
	c->qbytes += ch->len;
}

int conn_frame(struct agent_conn *c, uint16_t type, const void *data, uint32_t len)
{
	struct agent_chunk *ch = conn_chunk_frame(type, len);

	if (!ch)
		return -ENOMEM;
	if (len)
		memcpy(ch->data + AGENT_HDR, data, len);
	conn_enqueue(c, ch);
	return 0;
}

int conn_flush(struct agent_conn *c)
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
			conn_chunk_free(ch);
		}
	}
	return 0;
}

/* ---- lifetime ---- */

struct agent_conn *conn_new(struct agent *a, int fd)
{
	struct agent_conn *c = calloc(1, sizeof(*c));

	if (!c)
		return NULL;
	c->sock = (struct agent_watch){ AGENT_W_SOCK, fd, 0, c };
	c->out = (struct agent_watch){ AGENT_W_STDOUT, -1, 0, c };
	c->err = (struct agent_watch){ AGENT_W_STDERR, -1, 0, c };
	c->in = (struct agent_watch){ AGENT_W_STDIN, -1, 0, c };
	c->xfd = -1;
	c->state = a->unix_mode ? AGENT_C_HANDSHAKE : AGENT_C_HEADER;
	c->next = a->conns;
	a->conns = c;
	a->nconns++;
	return c;
}

void conn_accept(struct agent *a)
{
	struct agent_conn *c;
	int fd = accept4(a->listen.fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);

	if (fd < 0) {
		if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED)
			agent_log("accept: %s", strerror(errno));
		return;
	}
	if (a->nconns >= CONN_MAX) {
		agent_log("too many connections (%d): dropping one", a->nconns);
		close(fd);
		return;
	}
	c = conn_new(a, fd);
	if (!c) {
		close(fd);
		return;
	}
	conn_settle(a, c);
}

int conn_listen(struct agent *a, const char *unix_path)
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

void conn_close(struct agent *a, struct agent_conn *c)
{
	struct agent_conn **pp;

	if (c->pid > 0)
		kill(-c->pid, SIGKILL); /* the host went away: stop the whole process group */
	c->pid = 0;
	if (c->pty_sid > 0)
		pty_kill_session(c->pty_sid); /* a PTY: every job of its shell, in whatever group */
	c->pty_sid = 0;
	files_drop(c); /* a cut PUT leaves no file behind */
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

void conn_free(struct agent_conn *c)
{
	while (c->qhead) {
		struct agent_chunk *ch = c->qhead;
		c->qhead = ch->next;
		conn_chunk_free(ch);
	}
	files_drop(c);
	free(c->path);
	free(c->payload);
	free(c->ibuf);
	free(c);
}

void conn_settle(struct agent *a, struct agent_conn *c)
{
	uint32_t sock_ev = 0, pipe_ev = 0;
	bool finished;

	if (c->dead)
		return;
	if (c->state == AGENT_C_RELAY) {
		relay_events(&c->relay, &sock_ev, &pipe_ev);
		if (agent_watch_set(a, &c->sock, sock_ev) < 0 || agent_watch_set(a, &c->out, pipe_ev) < 0)
			conn_close(a, c);
		return;
	}
	/* GET: one more chunk when the socket took the last one (fair: one per wake-up) */
	finished = c->state == AGENT_C_GET && !c->blocked && files_get_fill(c) < 0;
	finished = finished || (c->qhead && !c->blocked && conn_flush(c) < 0);
	finished = finished || (c->state == AGENT_C_CLOSING && !c->qhead);
	if (!finished) {
		if (c->state != AGENT_C_CLOSING && !exec_stdin_full(c))
			sock_ev |= EPOLLIN;
		if (c->blocked || c->state == AGENT_C_GET)
			sock_ev |= EPOLLOUT; /* GET: level-triggered EPOLLOUT drives the next read of the file */
		/* back-pressure: a slow host pauses the command's pipes (it then blocks writing them) */
		if (c->qbytes >= CONN_QUEUE_HIGH)
			c->paused = true;
		else if (c->qbytes < CONN_QUEUE_LOW)
			c->paused = false;
		if (!c->paused)
			pipe_ev = EPOLLIN;
		finished = agent_watch_set(a, &c->sock, sock_ev) < 0 || agent_watch_set(a, &c->out, pipe_ev) < 0 ||
			   agent_watch_set(a, &c->err, pipe_ev) < 0 ||
			   agent_watch_set(a, &c->in, c->iwritten < c->iread ? EPOLLOUT : 0) < 0;
	}
	if (finished)
		conn_close(a, c);
}

/* ---- answers ---- */

int conn_fail_code(struct agent_conn *c, int err, enum smolvm_error_code code, const char *fmt, ...)
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
	files_drop(c);
	c->state = AGENT_C_CLOSING;
	return conn_frame(c, SMOLVM_ERROR, msg, (uint32_t)(sizeof(e) + strlen((char *)msg + sizeof(e))));
}

int conn_done(struct agent_conn *c)
{
	struct smolvm_exit ex = { 0, 0, 0 };

	free(c->payload);
	c->payload = NULL;
	c->state = AGENT_C_CLOSING;
	return conn_frame(c, SMOLVM_EXIT, &ex, sizeof(ex));
}

/* ---- reading from the host ---- */

ssize_t conn_read(struct agent_conn *c, void *buf, size_t len)
{
	ssize_t n = read(c->sock.fd, buf, len);

	if (n == 0)
		return -ECONNRESET;
	if (n < 0)
		return errno == EAGAIN || errno == EINTR ? 0 : -errno;
	return n;
}

int conn_handshake(struct agent_conn *c)
{
	struct agent_chunk *raw;
	char ch, reply[32];
	unsigned long port;
	char *end;
	ssize_t n;

	for (;;) {
		n = conn_read(c, &ch, 1); /* byte by byte: what follows the line belongs to the frames */
		if (n <= 0)
			return (int)n;
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
	raw = conn_chunk_alloc((size_t)n);
	if (!raw)
		return -ENOMEM;
	memcpy(raw->data, reply, (size_t)n);
	conn_enqueue(c, raw);
	c->state = AGENT_C_HEADER;
	return 0;
}

/* The request header is complete: check it and make room for the payload (AGENT_C_PAYLOAD). */
static int conn_request_header(struct agent_conn *c)
{
	uint32_t magic = le32toh(c->hdr.magic), type = le16toh(c->hdr.type), len = le32toh(c->hdr.len);

	if (magic != SMOLVM_PROTO_MAGIC)
		return conn_fail(c, 0, "bad frame: magic 0x%08x, want 0x%08x (protocol %.4s)", magic, SMOLVM_PROTO_MAGIC,
				 (const char *)&(uint32_t){ htole32(SMOLVM_PROTO_MAGIC) });
	if (type == SMOLVM_FORWARD && len != sizeof(struct smolvm_forward))
		return -EINVAL; /* FORWARD gets no answer: just close */
	if (type != SMOLVM_EXEC && type != SMOLVM_SETUP && type != SMOLVM_PUT && type != SMOLVM_GET &&
	    type != SMOLVM_FORWARD && type != SMOLVM_PTY)
		return conn_fail(c, 0, "bad frame: type %u, want EXEC (%u), SETUP (%u), PUT (%u), GET (%u) or PTY (%u)",
				 type, SMOLVM_EXEC, SMOLVM_SETUP, SMOLVM_PUT, SMOLVM_GET, SMOLVM_PTY);
	if (len > SMOLVM_MAX_PAYLOAD)
		return conn_fail(c, 0, "bad request frame: payload of %u bytes is over the limit of %u", len,
				 SMOLVM_MAX_PAYLOAD);
	if (type == SMOLVM_EXEC && len < sizeof(struct smolvm_exec))
		return conn_fail(c, 0, "bad EXEC frame: payload of %u bytes is shorter than its %zu-byte header", len,
				 sizeof(struct smolvm_exec));
	if (type == SMOLVM_PTY && len < sizeof(struct smolvm_pty))
		return conn_fail(c, 0, "bad PTY frame: payload of %u bytes is shorter than its %zu-byte header", len,
				 sizeof(struct smolvm_pty));
	if ((type == SMOLVM_PUT || type == SMOLVM_GET) && len > sizeof(struct smolvm_put) + AGENT_PATH_MAX)
		return conn_fail(c, ENAMETOOLONG, "bad %s frame: payload of %u bytes, the path is too long",
				 type == SMOLVM_PUT ? "PUT" : "GET", len);
	c->payload = malloc(len ? len : 1);
	if (!c->payload)
		return conn_fail(c, ENOMEM, "out of memory for a request payload of %u bytes", len);
	c->got = 0;
	c->state = AGENT_C_PAYLOAD;
	return 0;
}

int conn_read_request(struct agent_conn *c)
{
	ssize_t n;
	int ret;

	while (c->state == AGENT_C_HEADER || c->state == AGENT_C_PAYLOAD) {
		if (c->state == AGENT_C_HEADER)
			n = conn_read(c, (uint8_t *)&c->hdr + c->got, AGENT_HDR - c->got);
		else
			n = conn_read(c, c->payload + c->got, le32toh(c->hdr.len) - c->got);
		if (n <= 0)
			return (int)n;
		c->got += (uint32_t)n;
		if (c->state == AGENT_C_HEADER && c->got == AGENT_HDR) {
			ret = conn_request_header(c);
			if (ret < 0 || c->state == AGENT_C_CLOSING)
				return ret;
		}
		if (c->state == AGENT_C_PAYLOAD && c->got == le32toh(c->hdr.len))
			return 1;
	}
	return 0;
}

int conn_read_idle(struct agent_conn *c)
{
	char buf[256];
	ssize_t n = conn_read(c, buf, sizeof(buf));

	return n < 0 ? (int)n : 0; /* unexpected bytes: ignored */
}

/* ---- port forwards ---- */

int conn_forward(struct agent_conn *c)
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
