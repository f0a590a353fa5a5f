/* Port forwards: 127.0.0.1 TCP listeners whose accepted connections are handed to vsock with a FORWARD preface. */
#define _GNU_SOURCE
#include "portfwd.h"

#include <arpa/inet.h>
#include <endian.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "evloop.h"
#include "proto.h"
#include "virtio/vsock.h"

#define PORTFWD_ACCEPT_BURST 16

struct portfwd_entry {
	struct portfwd *p;
	int fd; /* listening socket; -1: free slot */
	uint32_t host_port, guest_port;
};

struct portfwd {
	struct evloop *loop;
	struct vsock *vsock;
	struct portfwd_entry e[PORTFWD_MAX];
};

struct portfwd_preface {
	struct smolvm_frame hdr;
	struct smolvm_forward fwd;
} __attribute__((packed));

_Static_assert(sizeof(struct portfwd_preface) <= VSOCK_PREFACE_MAX, "FORWARD preface fits vsock_open()");

int portfwd_new(struct evloop *loop, struct vsock *vsock, struct portfwd **out)
{
	struct portfwd *p = calloc(1, sizeof(*p));

	if (!p)
		return -ENOMEM;
	p->loop = loop;
	p->vsock = vsock;
	for (unsigned i = 0; i < PORTFWD_MAX; i++)
		p->e[i].fd = -1;
	*out = p;
	return 0;
}

static void portfwd_close(struct portfwd_entry *e)
{
	if (e->fd < 0)
		return;
	evloop_del(e->p->loop, e->fd);
	close(e->fd);
	e->fd = -1;
}

void portfwd_free(struct portfwd *p)
{
	if (!p)
		return;
	for (unsigned i = 0; i < PORTFWD_MAX; i++)
		portfwd_close(&p->e[i]);
	free(p);
}

static void portfwd_on_accept(void *opaque, int fd, uint32_t revents)
{
	struct portfwd_entry *e = opaque;
	struct portfwd_preface pre = {
		.hdr = { htole32(SMOLVM_PROTO_MAGIC), htole16(SMOLVM_FORWARD), 0, htole32(sizeof(pre.fwd)) },
		.fwd = { htole32(e->guest_port), 0 },
	};
	int one = 1;

	(void)revents;
	for (int n = 0; n < PORTFWD_ACCEPT_BURST; n++) {
		int cfd = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);

		if (cfd < 0)
			return;
		setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		if (vsock_open(e->p->vsock, cfd, SMOLVM_AGENT_PORT, &pre, sizeof(pre)) < 0)
			close(cfd); /* too many connections: the client sees the connection close */
	}
}

int portfwd_add(struct portfwd *p, uint32_t guest_port, uint32_t host_port, uint32_t *bound)
{
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t sl = sizeof(sa);
	struct portfwd_entry *e = NULL;
	int fd = -1, one = 1, ret;

	if (guest_port < 1 || guest_port > 65535 || host_port > 65535)
		return -EINVAL;
	for (unsigned i = 0; i < PORTFWD_MAX && !e; i++)
		if (p->e[i].fd < 0)
			e = &p->e[i];
	if (!e)
		return -ENOSPC;
	fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	/* SO_REUSEADDR only lets a port in TIME_WAIT be reused; a listening port stays EADDRINUSE */
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	sa.sin_port = htons((uint16_t)host_port);
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(fd, 128) < 0 ||
	    getsockname(fd, (struct sockaddr *)&sa, &sl) < 0) {
		ret = -errno;
		goto fail;
	}
	e->p = p;
	e->fd = fd;
	e->host_port = ntohs(sa.sin_port);
	e->guest_port = guest_port;
	ret = evloop_add(p->loop, fd, POLLIN, portfwd_on_accept, e);
	if (ret) {
		e->fd = -1;
		goto fail;
	}
	*bound = e->host_port;
	return 0;
fail:
	close(fd);
	return ret;
}

int portfwd_del(struct portfwd *p, uint32_t host_port)
{
	for (unsigned i = 0; i < PORTFWD_MAX; i++) {
		if (p->e[i].fd >= 0 && p->e[i].host_port == host_port) {
			portfwd_close(&p->e[i]);
			return 0;
		}
	}
	return -ENOENT;
}

int portfwd_list(const struct portfwd *p, char *buf, size_t len)
{
	size_t n = 0;

	if (!len)
		return -ENOSPC;
	buf[0] = 0;
	for (unsigned i = 0; i < PORTFWD_MAX; i++) {
		int w;

		if (p->e[i].fd < 0)
			continue;
		w = snprintf(buf + n, len - n, "%s%u:%u", n ? " " : "", p->e[i].host_port, p->e[i].guest_port);
		if (w < 0 || (size_t)w >= len - n)
			return -ENOSPC;
		n += (size_t)w;
	}
	return 0;
}

/* A decimal port 0..65535 at *s, followed by a space or the end; advances *s past it. */
static int portfwd_port(const char **s, uint32_t *out)
{
	const char *q = *s;
	uint32_t v = 0;

	if (*q < '0' || *q > '9')
		return -EINVAL;
	for (; *q >= '0' && *q <= '9'; q++) {
		v = v * 10 + (uint32_t)(*q - '0');
		if (v > 65535)
			return -EINVAL;
	}
	if (*q && *q != ' ')
		return -EINVAL;
	*s = *q ? q + 1 : q;
	*out = v;
	return 0;
}

int portfwd_command(struct portfwd *p, const char *args, char *reply, size_t len)
{
	uint32_t guest, host, bound;
	int ret;

	reply[0] = 0;
	if (!strncmp(args, "ADD ", 4)) {
		args += 4;
		if (portfwd_port(&args, &guest) || portfwd_port(&args, &host) || *args)
			return -EINVAL;
		ret = portfwd_add(p, guest, host, &bound);
		if (!ret)
			snprintf(reply, len, "%u", bound);
		return ret;
	}
	if (!strncmp(args, "DEL ", 4)) {
		args += 4;
		if (portfwd_port(&args, &host) || *args)
			return -EINVAL;
		return portfwd_del(p, host);
	}
	if (!strcmp(args, "LIST"))
		return portfwd_list(p, reply, len);
	return -EINVAL;
}
