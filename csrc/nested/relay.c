/* smolvm-vmm-relay: stands in for smolvm-vmm on the host when the VMM runs in the nested profile's host VM. */
#define _GNU_SOURCE
#include "wire.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "daemonize.h"

/*
 * Python starts this exactly as it would start smolvm-vmm (same argv after "--", the owner's
 * control socket on the fd that --ctl-fd names, fd 2 the VMM's stderr file). The relay starts
 * the real VMM in the host VM through smolvm-hostd, moves the VMM's Unix sockets (--vsock-uds,
 * --ctl-listen) to the host VM's /run and listens at their host paths in their place, relays
 * the owner's socket, handles --daemonize itself and exits as the VMM did. Its pid is the VM's
 * pid on the host.
 */

#define RELAY_MAX_SOCKS 4
#define RELAY_MAX_FWDS 64 /* as csrc/vmm/portfwd.h */
#define RELAY_OPEN_TRIES 8 /* about 3 s in all */
#define RELAY_PASS_ENV 8

extern char **environ;

struct relay_sock {
	char host_path[108];
	char vm_path[108];
	int fd;
};

struct relay {
	const char *endpoint;
	char token[WIRE_TOKEN_MAX];
	char run_dir[108];
	struct relay_sock socks[RELAY_MAX_SOCKS];
	int nr_socks;
	int conn; /* the SPAWN connection, -1 before it */
	int owner; /* the owner's control socket (--ctl-fd N; the VMM in the host VM gets it as 3), or -1 */
	/* relay.sock beside --ctl-listen: "LISTEN <port>" / "UNLISTEN <port>" from smolvm/ports.py */
	char ctl_path[108];
	int ctl_fd;
	struct {
		int port, fd;
	} fwds[RELAY_MAX_FWDS]; /* host 127.0.0.1:port -> the host VM's 127.0.0.1:port (the VMM's listener) */
	int nr_fwds;
};

static volatile sig_atomic_t relay_signal;

static void relay_on_signal(int sig)
{
	relay_signal = sig;
}

/* A connection to hostd that has said "<token> VERB[ arg]" and got "OK". fd or -errno. */
static int relay_open(struct relay *r, const char *verb, const char *arg, char *why, size_t cap)
{
	char line[WIRE_LINE_MAX];
	int fd = wire_tcp_connect(r->endpoint), ret;

	if (fd < 0) {
		snprintf(why, cap, "cannot reach the host VM at %s: %s", r->endpoint, strerror(-fd));
		return fd;
	}
	snprintf(line, sizeof(line), "%s %s%s%s\n", r->token, verb, arg ? " " : "", arg ? arg : "");
	ret = wire_write_all(fd, line, strlen(line));
	if (ret == 0)
		ret = wire_read_line(fd, line, sizeof(line));
	if (ret >= 0 && strcmp(line, "OK") != 0) {
		snprintf(why, cap, "the host VM refused %s: %s", verb, line);
		ret = -ECONNREFUSED;
	} else if (ret < 0) {
		snprintf(why, cap, "the host VM closed the connection (%s)", strerror(-ret));
	}
	if (ret < 0) {
		close(fd);
		return ret;
	}
	return fd;
}

/*
 * relay_open, again while the way to hostd broke before its answer: QEMU's user networking
 * accepts on the host at once and drops the connection when the host VM's side was not
 * taken in time (a burst of connections). An answer from hostd ("ERR ...") is final.
 */
static int relay_open_retrying(struct relay *r, const char *verb, const char *arg, char *why, size_t cap)
{
	int fd = -1;

	for (int i = 0; i < RELAY_OPEN_TRIES; i++) {
		fd = relay_open(r, verb, arg, why, cap);
		if (fd >= 0 || (fd != -EPIPE && fd != -ECONNRESET))
			break;
		usleep(20000u << (i < 5 ? i : 5)); /* 20 ms doubling, at most 640 ms */
	}
	return fd;
}

static int relay_listen(struct relay_sock *s)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

	if (fd < 0)
		return -errno;
	strcpy(sa.sun_path, s->host_path);
	unlink(s->host_path);
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(fd, 64) < 0) {
		int err = errno;

		close(fd);
		return -err;
	}
	s->fd = fd;
	return 0;
}

/*
 * A host client connected to listener lfd: carry it, in a child, to hostd's verb arg (a Unix
 * socket or a TCP port in the host VM). Only the VMM's end may hold the owner's socket: its
 * EOF tells the owner the VM ended, so the child closes it and every other relay fd.
 */
static void relay_accept(struct relay *r, int lfd, const char *verb, const char *arg)
{
	char why[256];
	int c = accept4(lfd, NULL, NULL, SOCK_CLOEXEC), t;

	if (c < 0)
		return;
	if (fork() == 0) {
		if (r->owner >= 0)
			close(r->owner);
		if (r->conn >= 0)
			close(r->conn);
		if (r->ctl_fd >= 0)
			close(r->ctl_fd);
		for (int i = 0; i < r->nr_socks; i++)
			close(r->socks[i].fd);
		for (int i = 0; i < r->nr_fwds; i++)
			close(r->fwds[i].fd);
		t = relay_open_retrying(r, verb, arg, why, sizeof(why));
		if (t < 0) {
			/* the client sees its connection closed; the reason goes to the VMM's log */
			fprintf(stderr, "smolvm-vmm-relay: %s %s: %s\n", verb, arg ? arg : "", why);
			_exit(1);
		}
		wire_splice(c, t);
		_exit(0);
	}
	close(c);
}

/* One command on relay.sock: LISTEN <port> or UNLISTEN <port>; answers "OK" or "ERR <why>". */
static void relay_control(struct relay *r)
{
	struct timeval tv = { .tv_sec = 2 };
	char line[128];
	int c = accept4(r->ctl_fd, NULL, NULL, SOCK_CLOEXEC), port, fd;

	if (c < 0)
		return;
	setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	if (wire_read_line(c, line, sizeof(line)) < 0)
		goto out;
	if (sscanf(line, "LISTEN %d", &port) == 1 && port > 0 && port < 65536) {
		if (r->nr_fwds == RELAY_MAX_FWDS) {
			dprintf(c, "ERR %s\n", strerror(ENOSPC));
			goto out;
		}
		snprintf(line, sizeof(line), "127.0.0.1:%d", port);
		fd = wire_tcp_listen(line);
		if (fd < 0) {
			dprintf(c, "ERR %s\n", strerror(-fd));
			goto out;
		}
		r->fwds[r->nr_fwds].port = port;
		r->fwds[r->nr_fwds++].fd = fd;
		dprintf(c, "OK\n");
	} else if (sscanf(line, "UNLISTEN %d", &port) == 1) {
		for (int i = 0; i < r->nr_fwds; i++) {
			if (r->fwds[i].port == port) {
				close(r->fwds[i].fd);
				r->fwds[i] = r->fwds[--r->nr_fwds];
				break;
			}
		}
		dprintf(c, "OK\n");
	} else {
		dprintf(c, "ERR unknown command\n");
	}
out:
	close(c);
}

static void relay_cleanup(struct relay *r)
{
	for (int i = 0; i < r->nr_socks; i++) {
		if (r->socks[i].fd >= 0)
			unlink(r->socks[i].host_path);
	}
	if (r->ctl_fd >= 0)
		unlink(r->ctl_path);
}

/* The VMM ended with wait status st (or the host VM went away, st < 0): end the same way. */
static void __attribute__((noreturn)) relay_exit(struct relay *r, int st, const char *why)
{
	relay_cleanup(r);
	if (why) {
		fprintf(stderr, "smolvm-vmm-relay: %s\n", why);
		if (r->owner >= 0)
			dprintf(r->owner, "EXIT error %s\n", why);
		exit(1);
	}
	if (WIFSIGNALED(st)) {
		/* no core file for signals that dump (SIGSYS: the VMM's seccomp filter killed it) */
		setrlimit(RLIMIT_CORE, &(struct rlimit){ 0, 0 });
		signal(WTERMSIG(st), SIG_DFL);
		raise(WTERMSIG(st));
	}
	exit(WIFEXITED(st) ? WEXITSTATUS(st) : 1);
}

/* argv for the host VM: sockets moved under run_dir, --daemonize dropped (the relay does it). */
static int relay_argv(struct relay *r, char **argv, int argc, char *blob, size_t cap, int *want_daemon)
{
	size_t len = 0;
	char stderr_path[4096] = "";
	ssize_t n = readlink("/proc/self/fd/2", stderr_path, sizeof(stderr_path) - 1);
	const char *head[3 + RELAY_PASS_ENV], *pass[] = { "ASAN_OPTIONS=", "UBSAN_OPTIONS=", "LSAN_OPTIONS=" };
	char count[8];
	int nh = 3, ne = 0;

	if (n > 0 && stderr_path[0] == '/')
		stderr_path[n] = '\0';
	else
		stderr_path[0] = '\0';
	head[0] = r->run_dir;
	head[1] = stderr_path;
	/* The sanitizers' settings reach the VMM (a sanitized build's reports go where the tests look). */
	for (char **e = environ; *e && ne < RELAY_PASS_ENV; e++) {
		for (size_t k = 0; k < sizeof(pass) / sizeof(pass[0]); k++) {
			if (strncmp(*e, pass[k], strlen(pass[k])) == 0)
				head[3 + ne++] = *e;
		}
	}
	snprintf(count, sizeof(count), "%d", ne);
	head[2] = count;
	nh += ne;
	for (int i = 0; i < nh; i++) {
		size_t l = strlen(head[i]) + 1;

		if (len + l > cap)
			return -E2BIG;
		memcpy(blob + len, head[i], l);
		len += l;
	}
	for (int i = 0; i < argc; i++) {
		const char *a = argv[i];

		if (strcmp(a, "--daemonize") == 0) {
			*want_daemon = 1;
			continue;
		}
		if (i > 0 && strcmp(argv[i - 1], "--ctl-fd") == 0) {
			r->owner = atoi(a);
			a = "3";
		}
		if (i > 0 && (strcmp(argv[i - 1], "--vsock-uds") == 0 || strcmp(argv[i - 1], "--ctl-listen") == 0)) {
			struct relay_sock *s = &r->socks[r->nr_socks];
			const char *base = strrchr(a, '/') ? strrchr(a, '/') + 1 : a;

			if (r->nr_socks == RELAY_MAX_SOCKS || strlen(a) >= sizeof(s->host_path))
				return -E2BIG;
			strcpy(s->host_path, a);
			if ((size_t)snprintf(s->vm_path, sizeof(s->vm_path), "%s/%s", r->run_dir, base) >=
			    sizeof(s->vm_path))
				return -E2BIG;
			s->fd = -1;
			r->nr_socks++;
			if (strcmp(argv[i - 1], "--ctl-listen") == 0) {
				int dir = (int)(base - a);

				if ((size_t)snprintf(r->ctl_path, sizeof(r->ctl_path), "%.*srelay.sock", dir, a) >=
				    sizeof(r->ctl_path))
					return -E2BIG;
			}
			a = s->vm_path;
		}
		size_t l = strlen(a) + 1;

		if (len + l > cap)
			return -E2BIG;
		memcpy(blob + len, a, l);
		len += l;
	}
	return (int)len;
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "endpoint", required_argument, NULL, 'e' },
		{ "token-file", required_argument, NULL, 't' },
		{ NULL, 0, NULL, 0 },
	};
	static char blob[WIRE_FRAME_MAX], buf[WIRE_FRAME_MAX];
	struct relay r = { .endpoint = NULL, .conn = -1, .owner = -1, .ctl_fd = -1 };
	const char *token_file = NULL;
	char why[512];
	int c, len, want_daemon = 0, conn, owner_open, ret;
	struct timespec ts;

	while ((c = getopt_long(argc, argv, "+", opts, NULL)) != -1) {
		switch (c) {
		case 'e': r.endpoint = optarg; break;
		case 't': token_file = optarg; break;
		default: goto usage;
		}
	}
	if (!r.endpoint || !token_file || optind >= argc)
		goto usage;
	ret = wire_read_token(token_file, r.token, sizeof(r.token));
	if (ret) {
		fprintf(stderr, "smolvm-vmm-relay: token file %s: %s\n", token_file, strerror(-ret));
		return 1;
	}
	clock_gettime(CLOCK_REALTIME, &ts);
	snprintf(r.run_dir, sizeof(r.run_dir), "/run/smolvm-%d-%lx", (int)getpid(),
		 (unsigned long)(ts.tv_nsec ^ ts.tv_sec));
	len = relay_argv(&r, argv + optind, argc - optind, blob, sizeof(blob), &want_daemon);
	if (len < 0) {
		fprintf(stderr, "smolvm-vmm-relay: arguments too long\n");
		return 2;
	}
	owner_open = r.owner >= 0;
	signal(SIGPIPE, SIG_IGN);
	if (want_daemon && daemonize() < 0) /* as smolvm-vmm does */
		return 1;
	struct sigaction sa = { .sa_handler = relay_on_signal };

	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGHUP, &sa, NULL);
	signal(SIGCHLD, SIG_IGN); /* splice children reap themselves */
	for (int i = 0; i < r.nr_socks; i++) {
		ret = relay_listen(&r.socks[i]);
		if (ret) {
			snprintf(why, sizeof(why), "cannot listen at %s: %s", r.socks[i].host_path, strerror(-ret));
			relay_exit(&r, 0, why);
		}
	}
	if (r.ctl_path[0]) {
		struct relay_sock cs = { .fd = -1 };

		strcpy(cs.host_path, r.ctl_path);
		ret = relay_listen(&cs);
		if (ret) {
			snprintf(why, sizeof(why), "cannot listen at %s: %s", r.ctl_path, strerror(-ret));
			relay_exit(&r, 0, why);
		}
		r.ctl_fd = cs.fd;
	}
	conn = relay_open(&r, "SPAWN", NULL, why, sizeof(why));
	if (conn < 0)
		relay_exit(&r, 0, why);
	r.conn = conn;
	if (wire_send(conn, WIRE_ARGV, blob, (uint32_t)len))
		relay_exit(&r, 0, "the host VM closed the connection while starting the VMM");
	for (;;) {
		struct pollfd p[3 + RELAY_MAX_SOCKS + RELAY_MAX_FWDS];
		uint32_t type;
		int n = 0, nr_fwds = r.nr_fwds;

		p[n++] = (struct pollfd){ .fd = conn, .events = POLLIN };
		p[n++] = (struct pollfd){ .fd = owner_open ? r.owner : -1, .events = POLLIN };
		p[n++] = (struct pollfd){ .fd = r.ctl_fd, .events = POLLIN };
		for (int i = 0; i < r.nr_socks; i++)
			p[n++] = (struct pollfd){ .fd = r.socks[i].fd, .events = POLLIN };
		for (int i = 0; i < nr_fwds; i++)
			p[n++] = (struct pollfd){ .fd = r.fwds[i].fd, .events = POLLIN };
		if (relay_signal) {
			uint32_t sig = (uint32_t)relay_signal;

			relay_signal = 0;
			wire_send(conn, WIRE_KILL, &sig, sizeof(sig));
		}
		if (poll(p, (nfds_t)n, -1) < 0) {
			if (errno == EINTR)
				continue;
			relay_exit(&r, 0, "poll failed");
		}
		if (p[1].revents) {
			ssize_t got = read(r.owner, buf, sizeof(buf));

			if (got < 0 && errno == EINTR)
				continue;
			if (got <= 0) {
				owner_open = 0;
				wire_send(conn, WIRE_EOF, NULL, 0);
			} else if (wire_send(conn, WIRE_DATA, buf, (uint32_t)got)) {
				relay_exit(&r, 0, "the host VM went away (it stopped or was killed)");
			}
		}
		if (p[0].revents) {
			len = wire_recv(conn, &type, buf, sizeof(buf));
			if (len < 0)
				relay_exit(&r, 0, "the host VM went away (it stopped or was killed)");
			if (type == WIRE_DATA) {
				if (r.owner >= 0)
					wire_write_all(r.owner, buf, (size_t)len);
			} else if (type == WIRE_EOF) {
				if (r.owner >= 0)
					shutdown(r.owner, SHUT_WR);
			} else if (type == WIRE_PID) {
				if (r.owner >= 0)
					dprintf(r.owner, "PID %d\n", (int)getpid());
			} else if (type == WIRE_EXIT && len == 4) {
				int st;

				memcpy(&st, buf, sizeof(st));
				relay_exit(&r, st, NULL);
			}
		}
		for (int i = 0; i < r.nr_socks; i++) {
			if (p[3 + i].revents & POLLIN)
				relay_accept(&r, r.socks[i].fd, "CONNECT", r.socks[i].vm_path);
		}
		for (int i = 0; i < nr_fwds && i < r.nr_fwds; i++) {
			char port[16];

			if (!(p[3 + r.nr_socks + i].revents & POLLIN) || p[3 + r.nr_socks + i].fd != r.fwds[i].fd)
				continue;
			snprintf(port, sizeof(port), "%d", r.fwds[i].port);
			relay_accept(&r, r.fwds[i].fd, "TCP", port);
		}
		if (p[2].revents & POLLIN) /* last: it may change fwds */
			relay_control(&r);
	}
usage:
	fprintf(stderr, "usage: smolvm-vmm-relay --endpoint IP:PORT --token-file F -- VMM-ARGV...\n");
	return 2;
}
