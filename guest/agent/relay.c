/* Byte relay for port forwards: two one-way pumps with a fixed buffer each, EOF passed on as a half-close. */
#define _GNU_SOURCE
#include "relay.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

int relay_start(struct relay *r, int a, uint16_t port)
{
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(port),
				  .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	int one = 1, ret;

	memset(r, 0, sizeof(*r));
	r->a = a;
	r->b = -1;
	r->ab.buf = malloc(RELAY_BUF);
	r->ba.buf = malloc(RELAY_BUF);
	if (!r->ab.buf || !r->ba.buf) {
		ret = -ENOMEM;
		goto fail;
	}
	r->b = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (r->b < 0) {
		ret = -errno;
		goto fail;
	}
	setsockopt(r->b, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (connect(r->b, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		if (errno != EINPROGRESS) {
			ret = -errno;
			goto fail;
		}
		r->connecting = true;
	}
	return 0;
fail:
	relay_end(r);
	return ret;
}

/* src -> dst until one would block. 0 or -errno. */
static int relay_dir_pump(struct relay_dir *d, int src, int dst)
{
	for (;;) {
		bool sending = d->off < d->len;
		ssize_t n;

		if (!sending) {
			d->off = d->len = 0;
			if (d->eof) {
				if (!d->shut) {
					shutdown(dst, SHUT_WR);
					d->shut = true;
				}
				return 0;
			}
		}
		if (sending)
			n = send(dst, d->buf + d->off, d->len - d->off, MSG_NOSIGNAL | MSG_DONTWAIT);
		else
			n = recv(src, d->buf, RELAY_BUF, MSG_DONTWAIT);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return 0;
			return -errno;
		}
		if (sending) {
			d->off += (uint32_t)n;
		} else {
			if (n == 0)
				d->eof = true;
			d->len = (uint32_t)n;
		}
	}
}

int relay_pump(struct relay *r)
{
	int ret;

	if (r->connecting) {
		int err = 0;
		socklen_t sl = sizeof(err);

		if (getsockopt(r->b, SOL_SOCKET, SO_ERROR, &err, &sl) < 0)
			return -errno;
		if (err)
			return -err;
		/* still in progress shows as no error and no peer yet */
		struct sockaddr_in peer;
		sl = sizeof(peer);
		if (getpeername(r->b, (struct sockaddr *)&peer, &sl) < 0)
			return errno == ENOTCONN ? 0 : -errno;
		r->connecting = false;
	}
	ret = relay_dir_pump(&r->ab, r->a, r->b);
	if (ret < 0)
		return ret;
	ret = relay_dir_pump(&r->ba, r->b, r->a);
	if (ret < 0)
		return ret;
	return r->ab.shut && r->ba.shut ? 1 : 0;
}

void relay_events(const struct relay *r, uint32_t *ev_a, uint32_t *ev_b)
{
	*ev_a = *ev_b = 0;
	if (r->connecting) {
		*ev_b = EPOLLOUT;
		return;
	}
	if (r->ab.len == 0 && !r->ab.eof)
		*ev_a |= EPOLLIN;
	if (r->ab.off < r->ab.len)
		*ev_b |= EPOLLOUT;
	if (r->ba.len == 0 && !r->ba.eof)
		*ev_b |= EPOLLIN;
	if (r->ba.off < r->ba.len)
		*ev_a |= EPOLLOUT;
}

void relay_end(struct relay *r)
{
	if (r->b >= 0)
		close(r->b);
	r->b = -1;
	free(r->ab.buf);
	free(r->ba.buf);
	r->ab.buf = r->ba.buf = NULL;
}
