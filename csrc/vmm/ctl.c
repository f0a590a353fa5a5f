/* Control channel server: line-buffered clients on the event loop, replies on the asking connection. */
#define _GNU_SOURCE
#include "ctl.h"

#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "evloop.h"

#define CTL_LINE_MAX 4096

struct ctl_conn {
	struct ctl *ctl;
	int fd;
	bool owner;
	size_t len;
	char buf[CTL_LINE_MAX];
};

struct ctl {
	struct evloop *loop;
	int listen_fd;
	char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
	bool detached;
	struct ctl_conn *owner;
	struct ctl_conn *conns[CTL_MAX_CONNS];
	ctl_command_fn on_command;
	void (*on_owner_gone)(void *opaque);
	void *opaque;
};

static void ctl_vwrite(int fd, const char *fmt, va_list ap)
{
	char line[CTL_LINE_MAX];
	int n = vsnprintf(line, sizeof(line) - 1, fmt, ap);

	if (n < 0)
		return;
	if ((size_t)n > sizeof(line) - 2)
		n = (int)sizeof(line) - 2;
	line[n++] = '\n';
	(void)!send(fd, line, (size_t)n, MSG_NOSIGNAL | MSG_DONTWAIT);
}

void ctl_reply(struct ctl_conn *conn, const char *fmt, ...)
{
	va_list ap;

	if (!conn || conn->fd < 0)
		return;
	va_start(ap, fmt);
	ctl_vwrite(conn->fd, fmt, ap);
	va_end(ap);
}

void ctl_notify(struct ctl *c, const char *fmt, ...)
{
	va_list ap;

	if (!c || !c->owner)
		return;
	va_start(ap, fmt);
	ctl_vwrite(c->owner->fd, fmt, ap);
	va_end(ap);
}

void ctl_detach(struct ctl *c)
{
	c->detached = true;
}

static void ctl_conn_close(struct ctl *c, struct ctl_conn *conn)
{
	for (int i = 0; i < CTL_MAX_CONNS; i++)
		if (c->conns[i] == conn)
			c->conns[i] = NULL;
	if (c->owner == conn)
		c->owner = NULL;
	evloop_del(c->loop, conn->fd);
	close(conn->fd);
	free(conn);
}

static void ctl_on_conn(void *opaque, int fd, uint32_t revents)
{
	struct ctl_conn *conn = opaque;
	struct ctl *c = conn->ctl;
	ssize_t n;
	char *nl;

	(void)revents;
	n = read(fd, conn->buf + conn->len, sizeof(conn->buf) - 1 - conn->len);
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (n <= 0) {
		bool owner = conn->owner;

		ctl_conn_close(c, conn);
		if (owner && !c->detached && c->on_owner_gone)
			c->on_owner_gone(c->opaque);
		return;
	}
	conn->len += (size_t)n;
	conn->buf[conn->len] = 0;
	while ((nl = strchr(conn->buf, '\n'))) {
		size_t used = (size_t)(nl - conn->buf) + 1;

		*nl = 0;
		c->on_command(c->opaque, conn, conn->buf);
		memmove(conn->buf, conn->buf + used, conn->len - used + 1);
		conn->len -= used;
	}
	if (conn->len == sizeof(conn->buf) - 1) {
		ctl_reply(conn, "ERR command too long");
		conn->len = 0;
	}
}

static int ctl_add_conn(struct ctl *c, int fd, bool owner)
{
	struct ctl_conn *conn;
	int slot = -1, ret;

	for (int i = 0; i < CTL_MAX_CONNS && slot < 0; i++)
		if (!c->conns[i])
			slot = i;
	if (slot < 0)
		return -ENOSPC;
	conn = calloc(1, sizeof(*conn));
	if (!conn)
		return -ENOMEM;
	conn->ctl = c;
	conn->fd = fd;
	conn->owner = owner;
	ret = evloop_add(c->loop, fd, POLLIN, ctl_on_conn, conn);
	if (ret) {
		free(conn);
		return ret;
	}
	c->conns[slot] = conn;
	if (owner)
		c->owner = conn;
	return 0;
}

static void ctl_on_accept(void *opaque, int fd, uint32_t revents)
{
	struct ctl *c = opaque;
	int cfd = accept4(fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);

	(void)revents;
	if (cfd < 0)
		return;
	if (ctl_add_conn(c, cfd, false) < 0)
		close(cfd);
}

int ctl_new(struct evloop *loop, int owner_fd, const char *listen_path, ctl_command_fn on_command,
	    void (*on_owner_gone)(void *opaque), void *opaque, struct ctl **out)
{
	struct ctl *c = calloc(1, sizeof(*c));
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int ret = 0;

	if (!c)
		return -ENOMEM;
	c->loop = loop;
	c->listen_fd = -1;
	c->on_command = on_command;
	c->on_owner_gone = on_owner_gone;
	c->opaque = opaque;
	if (owner_fd >= 0) {
		ret = ctl_add_conn(c, owner_fd, true);
		if (ret)
			goto fail;
	}
	if (listen_path) {
		if (strlen(listen_path) >= sizeof(sa.sun_path)) {
			ret = -ENAMETOOLONG;
			goto fail;
		}
		strcpy(sa.sun_path, listen_path);
		c->listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
		if (c->listen_fd < 0) {
			ret = -errno;
			goto fail;
		}
		unlink(listen_path);
		if (bind(c->listen_fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 ||
		    listen(c->listen_fd, 8) < 0) {
			ret = -errno;
			goto fail;
		}
		strcpy(c->path, listen_path);
		ret = evloop_add(loop, c->listen_fd, POLLIN, ctl_on_accept, c);
		if (ret)
			goto fail;
	}
	*out = c;
	return 0;
fail:
	ctl_free(c);
	return ret;
}

void ctl_free(struct ctl *c)
{
	if (!c)
		return;
	for (int i = 0; i < CTL_MAX_CONNS; i++) {
		if (!c->conns[i])
			continue;
		evloop_del(c->loop, c->conns[i]->fd);
		if (!c->conns[i]->owner)
			close(c->conns[i]->fd);
		free(c->conns[i]);
	}
	if (c->listen_fd >= 0) {
		evloop_del(c->loop, c->listen_fd);
		close(c->listen_fd);
	}
	if (c->path[0])
		unlink(c->path);
	free(c);
}
