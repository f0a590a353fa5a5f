/* Guest agent: PID 1 of the smolvm guest (or a test server with --unix); its epoll loop and the dispatch of events and requests. */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"

static bool agent_log_to_stderr = true;

/* One line to /dev/kmsg (one record per write) or, in --unix mode or without it, to stderr. */
void agent_log(const char *fmt, ...)
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

void agent_log_kmsg(void)
{
	agent_log_to_stderr = false;
}

uint64_t agent_now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

int agent_watch_set(struct agent *a, struct agent_watch *w, uint32_t events)
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

void agent_watch_close(struct agent *a, struct agent_watch *w)
{
	if (w->fd < 0)
		return;
	agent_watch_set(a, w, 0);
	close(w->fd);
	w->fd = -1;
}

/* The request frame is complete (conn_read_request): dispatch on its type, which it checked. */
static int agent_request(struct agent *a, struct agent_conn *c)
{
	switch (le16toh(c->hdr.type)) {
	case SMOLVM_SETUP:
		return setup_start(a, c);
	case SMOLVM_PUT:
		return files_put_start(c);
	case SMOLVM_GET:
		return files_get_start(c);
	case SMOLVM_FORWARD:
		return conn_forward(c);
	case SMOLVM_PTY:
		return pty_start(a, c);
	default:
		return exec_start(a, c);
	}
}

static int agent_sock_event(struct agent *a, struct agent_conn *c, uint32_t ev)
{
	int ret = 0;

	if (c->qhead && (ev & (EPOLLOUT | EPOLLERR | EPOLLHUP))) {
		c->blocked = false;
		ret = conn_flush(c);
		if (ret < 0)
			return ret;
	}
	if (!(ev & (EPOLLIN | EPOLLERR | EPOLLHUP)))
		return 0;
	switch (c->state) {
	case AGENT_C_HANDSHAKE:
		return conn_handshake(c);
	case AGENT_C_HEADER:
	case AGENT_C_PAYLOAD:
		ret = conn_read_request(c);
		return ret > 0 ? agent_request(a, c) : ret;
	case AGENT_C_PUT:
		return files_put_read(c);
	case AGENT_C_RUNNING:
		return c->stdin_on ? exec_read_stdin(a, c) : conn_read_idle(c);
	case AGENT_C_ROOT_WAIT:
	case AGENT_C_GET:
		return conn_read_idle(c);
	case AGENT_C_CLOSING:
	case AGENT_C_RELAY: /* agent_dispatch pumps the relay */
		break;
	}
	return 0;
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
		if (setup_root_poll(a, c) < 0)
			conn_close(a, c);
		else
			conn_settle(a, c);
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

void agent_dispatch(struct agent *a, struct agent_watch *w, uint32_t ev)
{
	struct agent_conn *c = w->conn;
	int ret = 0;

	switch (w->kind) {
	case AGENT_W_LISTEN:
		conn_accept(a);
		return;
	case AGENT_W_SIGNAL:
		init_reap(a);
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
		ret = agent_sock_event(a, c, ev);
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
		ret = exec_pipe_read(a, c, w);
		if (ret != -ENOMEM)
			ret = 0;
		break;
	case AGENT_W_STDIN:
		if (c->dead || w->fd < 0)
			return;
		exec_stdin_event(a, c);
		break;
	}
	if (ret < 0)
		conn_close(a, c);
	else
		conn_settle(a, c);
}

int agent_run(struct agent *a, const char *unix_path)
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
	ret = conn_listen(a, unix_path);
	if (ret < 0) {
		agent_log("listen on %s: %s", unix_path ? unix_path : "vsock port 52", strerror(-ret));
		goto out;
	}
	if (!unix_path)
		init_signal_ready(a);
	init_reap(a); /* children that exited before the signalfd existed */
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
			conn_free(c);
		}
	}
out:
	return ret;
}

int main(int argc, char **argv)
{
	static struct agent a = AGENT_INIT;
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
		init_system(&a);
	}
	init_std_fds();
	return agent_run(&a, unix_path) < 0 ? 1 : 0;
}
