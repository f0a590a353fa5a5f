/* Framing, line reading, splicing and connecting for the nested profile's relay and host daemon. */
#include "wire.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* All n bytes of buf written (writing) or read: 0, -errno, or -EPIPE for an end of file first. */
static int wire_io_all(int fd, char *p, size_t n, bool writing)
{
	while (n > 0) {
		ssize_t got = writing ? write(fd, p, n) : read(fd, p, n);

		if (got < 0 && errno == EINTR)
			continue;
		if (got < 0)
			return -errno;
		if (got == 0)
			return -EPIPE;
		p += got;
		n -= (size_t)got;
	}
	return 0;
}

int wire_write_all(int fd, const void *buf, size_t n)
{
	return wire_io_all(fd, (char *)buf, n, true);
}

int wire_read_all(int fd, void *buf, size_t n)
{
	return wire_io_all(fd, buf, n, false);
}

int wire_send(int fd, uint32_t type, const void *data, uint32_t len)
{
	struct wire_hdr h = { .type = type, .len = len };
	int ret;

	if (len > WIRE_FRAME_MAX)
		return -EMSGSIZE;
	ret = wire_write_all(fd, &h, sizeof(h));
	if (ret == 0 && len > 0)
		ret = wire_write_all(fd, data, len);
	return ret;
}

int wire_recv(int fd, uint32_t *type, void *data, uint32_t cap)
{
	struct wire_hdr h;
	int ret = wire_read_all(fd, &h, sizeof(h));

	if (ret)
		return ret;
	if (h.len > cap || h.len > WIRE_FRAME_MAX)
		return -EMSGSIZE;
	ret = wire_read_all(fd, data, h.len);
	if (ret)
		return ret;
	*type = h.type;
	return (int)h.len;
}

int wire_read_line(int fd, char *buf, size_t cap)
{
	size_t n = 0;

	while (n + 1 < cap) {
		char c;
		ssize_t r = read(fd, &c, 1);

		if (r < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (r == 0)
			return -EPIPE;
		if (c == '\n') {
			buf[n] = '\0';
			return (int)n;
		}
		buf[n++] = c;
	}
	return -E2BIG;
}

void wire_splice(int a, int b)
{
	struct pollfd p[2];
	int open_ab = 1, open_ba = 1; /* directions a->b and b->a still flowing */
	char buf[65536];

	while (open_ab || open_ba) {
		p[0] = (struct pollfd){ .fd = open_ab ? a : -1, .events = POLLIN };
		p[1] = (struct pollfd){ .fd = open_ba ? b : -1, .events = POLLIN };
		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			return;
		}
		for (int i = 0; i < 2; i++) {
			int from = i ? b : a, to = i ? a : b;
			int *open = i ? &open_ba : &open_ab;
			ssize_t r;

			if (!*open || !(p[i].revents & (POLLIN | POLLHUP | POLLERR)))
				continue;
			r = read(from, buf, sizeof(buf));
			if (r < 0 && errno == EINTR)
				continue;
			if (r <= 0 || wire_write_all(to, buf, (size_t)r)) {
				*open = 0;
				shutdown(to, SHUT_WR);
				if (r < 0) /* a reset: nothing more comes either way */
					return;
			}
		}
	}
}

static int wire_parse_endpoint(const char *endpoint, struct sockaddr_in *sa)
{
	char host[64];
	const char *colon = strrchr(endpoint, ':');
	long port;
	char *end;

	if (!colon || (size_t)(colon - endpoint) >= sizeof(host))
		return -EINVAL;
	memcpy(host, endpoint, (size_t)(colon - endpoint));
	host[colon - endpoint] = '\0';
	port = strtol(colon + 1, &end, 10);
	*sa = (struct sockaddr_in){ .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
	if (*end || port <= 0 || port > 65535 || inet_pton(AF_INET, host, &sa->sin_addr) != 1)
		return -EINVAL;
	return 0;
}

/* A TCP socket for endpoint "A.B.C.D:PORT" with the option opt (level, name) set to 1: fd or -errno; sa filled. */
static int wire_tcp_socket(const char *endpoint, struct sockaddr_in *sa, int level, int opt)
{
	int fd, one = 1;

	if (wire_parse_endpoint(endpoint, sa))
		return -EINVAL;
	fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	setsockopt(fd, level, opt, &one, sizeof(one));
	return fd;
}

int wire_tcp_listen(const char *endpoint)
{
	struct sockaddr_in sa;
	int fd = wire_tcp_socket(endpoint, &sa, SOL_SOCKET, SO_REUSEADDR);

	if (fd >= 0 && (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(fd, WIRE_BACKLOG) < 0)) {
		int err = errno;

		close(fd);
		return -err;
	}
	return fd;
}

int wire_tcp_connect(const char *endpoint)
{
	struct sockaddr_in sa;
	int fd = wire_tcp_socket(endpoint, &sa, IPPROTO_TCP, TCP_NODELAY);

	while (fd >= 0 && connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		int err = errno;

		if (err == EINTR)
			continue;
		close(fd);
		return -err;
	}
	return fd;
}

int wire_read_token(const char *path, char *buf, size_t cap)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	ssize_t n;

	if (fd < 0)
		return -errno;
	n = read(fd, buf, cap - 1);
	close(fd);
	if (n < 0)
		return -errno;
	buf[n] = '\0';
	buf[strcspn(buf, "\r\n")] = '\0';
	if (buf[0] == '\0' || (size_t)n >= cap - 1)
		return -EINVAL;
	return 0;
}
