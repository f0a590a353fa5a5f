/* smolvm-hostd: runs inside the nested profile's host VM and starts VMMs and relays sockets for the host. */
#define _GNU_SOURCE
#include "wire.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define HOSTD_MAX_KIDS 1024

struct hostd {
	const char *listen;
	char token[WIRE_TOKEN_MAX];
	int idle_s; /* power off after this long without connections (0: never) */
	pid_t kids[HOSTD_MAX_KIDS];
	int nr_kids;
};

static int token_ok(const char *want, const char *got)
{
	size_t n = strlen(want), m = strlen(got);
	unsigned char diff = (unsigned char)(n != m);

	for (size_t i = 0; i < n; i++)
		diff |= (unsigned char)(want[i] ^ (i < m ? got[i] : 0));
	return diff == 0;
}

/* TCP <port>: a stream to 127.0.0.1:<port> in the host VM (a VMM's port-forward listener). */
static void hostd_tcp(int conn, const char *port)
{
	char endpoint[32];
	int fd;

	snprintf(endpoint, sizeof(endpoint), "127.0.0.1:%s", port);
	fd = wire_tcp_connect(endpoint);
	if (fd < 0) {
		dprintf(conn, "ERR %s\n", strerror(-fd));
		return;
	}
	if (wire_write_all(conn, "OK\n", 3) == 0)
		wire_splice(conn, fd);
	close(fd);
}

static void hostd_connect(int conn, const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int fd;

	if (strlen(path) >= sizeof(sa.sun_path)) {
		dprintf(conn, "ERR path too long\n");
		return;
	}
	strcpy(sa.sun_path, path);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		dprintf(conn, "ERR %s\n", strerror(errno));
		if (fd >= 0)
			close(fd);
		return;
	}
	if (wire_write_all(conn, "OK\n", 3) == 0)
		wire_splice(conn, fd);
	close(fd);
}

/* Split a WIRE_ARGV blob into strings; returns their count or -1. */
static int split_argv(char *blob, int len, char **out, int max)
{
	int n = 0, start = 0;

	if (len <= 0 || blob[len - 1] != '\0')
		return -1;
	for (int i = 0; i < len; i++) {
		if (blob[i] != '\0')
			continue;
		if (n == max - 1)
			return -1;
		out[n++] = blob + start;
		start = i + 1;
	}
	out[n] = NULL;
	return n;
}

static pid_t spawn_vmm(char **argv, char **envp, const char *stderr_path, int ctl)
{
	pid_t pid = fork();

	if (pid != 0)
		return pid;
	/* The child: fd 3 = ctl, 0/1 = /dev/null, 2 = stderr_path. */
	int null = open("/dev/null", O_RDWR);
	int err = stderr_path[0] ? open(stderr_path, O_WRONLY | O_CREAT | O_APPEND, 0600) : null;

	if (null < 0 || err < 0)
		_exit(127);
	dup2(null, 0);
	dup2(null, 1);
	dup2(err, 2);
	dup2(ctl, 3);
	syscall(SYS_close_range, 4U, ~0U, 0U);
	setsid();
	signal(SIGPIPE, SIG_DFL);
	execve(argv[0], argv, envp);
	dprintf(2, "smolvm-hostd: cannot run %s: %s\n", argv[0], strerror(errno));
	_exit(127);
}

/*
 * Pass the VMM's fd-3 output on as frames; its first "PID n" line becomes WIRE_PID.
 * 0: more may come; 1: nothing more (EOF, or EAGAIN when draining non-blocking after exit); -errno.
 */
static int relay_out(int sv, int conn, int *saw_pid, pid_t pid)
{
	char buf[WIRE_FRAME_MAX];
	ssize_t r = read(sv, buf, sizeof(buf));
	size_t off = 0;

	if (r < 0 && errno == EAGAIN)
		return 1;
	if (r < 0)
		return errno == EINTR ? 0 : -errno;
	if (r == 0) {
		wire_send(conn, WIRE_EOF, NULL, 0);
		return 1;
	}
	if (!*saw_pid && r >= 4 && memcmp(buf, "PID ", 4) == 0) {
		char *nl = memchr(buf, '\n', (size_t)r);
		uint32_t p = (uint32_t)pid;

		if (nl) {
			off = (size_t)(nl - buf) + 1;
			*saw_pid = 1;
			if (wire_send(conn, WIRE_PID, &p, sizeof(p)))
				return -EPIPE;
		}
	}
	if ((size_t)r > off && wire_send(conn, WIRE_DATA, buf + off, (uint32_t)((size_t)r - off)))
		return -EPIPE;
	return 0;
}

static void hostd_spawn(int conn)
{
	static char blob[WIRE_FRAME_MAX + 1];
	char *args[512], *env[9];
	int nargs, nenv;
	uint32_t type;
	int sv[2] = { -1, -1 }, pidfd = -1, n, saw_pid = 0, out_open = 1, status = 0;
	pid_t pid;

	if (wire_write_all(conn, "OK\n", 3))
		return;
	n = wire_recv(conn, &type, blob, WIRE_FRAME_MAX);
	if (n < 0 || type != WIRE_ARGV)
		return;
	blob[n] = '\0';
	nargs = split_argv(blob, n, args, 512);
	if (nargs < 4)
		return;
	nenv = atoi(args[2]);
	if (nenv < 0 || nenv > 8 || 3 + nenv >= nargs)
		return;
	for (int i = 0; i < nenv; i++)
		env[i] = args[3 + i];
	env[nenv] = NULL;
	if (mkdir(args[0], 0700) < 0 && errno != EEXIST)
		dprintf(2, "smolvm-hostd: mkdir %s: %s\n", args[0], strerror(errno));
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
		return;
	pid = spawn_vmm(args + 3 + nenv, env, args[1], sv[1]);
	close(sv[1]);
	if (pid < 0)
		return;
	pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
	for (;;) {
		struct pollfd p[3] = {
			{ .fd = conn, .events = POLLIN },
			{ .fd = out_open ? sv[0] : -1, .events = POLLIN },
			{ .fd = pidfd, .events = POLLIN },
		};
		if (poll(p, 3, pidfd < 0 ? 200 : -1) < 0 && errno != EINTR)
			break;
		if (p[1].revents) {
			int r = relay_out(sv[0], conn, &saw_pid, pid);

			if (r < 0)
				goto gone;
			if (r > 0)
				out_open = 0;
		}
		if (p[0].revents) {
			static char buf[WIRE_FRAME_MAX];
			int len = wire_recv(conn, &type, buf, sizeof(buf));

			if (len < 0)
				goto gone;
			if (type == WIRE_DATA)
				wire_write_all(sv[0], buf, (size_t)len);
			else if (type == WIRE_EOF)
				shutdown(sv[0], SHUT_WR);
			else if (type == WIRE_KILL && len == 4) {
				uint32_t sig;

				memcpy(&sig, buf, sizeof(sig));
				kill(pid, (int)sig);
			}
		}
		if ((pidfd >= 0 && p[2].revents) || (pidfd < 0 && waitpid(pid, &status, WNOHANG) == pid)) {
			if (pidfd >= 0)
				waitpid(pid, &status, 0);
			fcntl(sv[0], F_SETFL, O_NONBLOCK);
			while (out_open && relay_out(sv[0], conn, &saw_pid, pid) == 0)
				;
			wire_send(conn, WIRE_EXIT, &status, sizeof(status));
			rmdir(args[0]);
			return;
		}
	}
gone: /* the relay on the host is gone: so is the VM */
	kill(pid, SIGKILL);
	waitpid(pid, &status, 0);
	rmdir(args[0]);
}

static void hostd_serve(struct hostd *h, int conn)
{
	char line[WIRE_LINE_MAX], *verb, *arg;

	alarm(10); /* a connection that never says who it is */
	if (wire_read_line(conn, line, sizeof(line)) < 0)
		return;
	alarm(0);
	verb = strchr(line, ' ');
	if (!verb)
		return;
	*verb++ = '\0';
	if (!token_ok(h->token, line)) {
		dprintf(conn, "ERR bad token\n");
		return;
	}
	arg = strchr(verb, ' ');
	if (arg)
		*arg++ = '\0';
	if (strcmp(verb, "PING") == 0)
		dprintf(conn, "PONG\n");
	else if (strcmp(verb, "CONNECT") == 0 && arg)
		hostd_connect(conn, arg);
	else if (strcmp(verb, "TCP") == 0 && arg)
		hostd_tcp(conn, arg);
	else if (strcmp(verb, "SPAWN") == 0)
		hostd_spawn(conn);
	else
		dprintf(conn, "ERR unknown verb\n");
}

static void hostd_reap(struct hostd *h)
{
	pid_t pid;
	int status;

	while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
		for (int i = 0; i < h->nr_kids; i++) {
			if (h->kids[i] == pid) {
				h->kids[i] = h->kids[--h->nr_kids];
				break;
			}
		}
	}
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "listen", required_argument, NULL, 'l' },
		{ "token-file", required_argument, NULL, 't' },
		{ "idle", required_argument, NULL, 'i' },
		{ NULL, 0, NULL, 0 },
	};
	struct hostd h = { .listen = "0.0.0.0:7000", .idle_s = 0 };
	const char *token_file = NULL;
	time_t last = time(NULL);
	int c, lfd, ret;

	while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (c) {
		case 'l': h.listen = optarg; break;
		case 't': token_file = optarg; break;
		case 'i': h.idle_s = atoi(optarg); break;
		default:
			fprintf(stderr, "usage: smolvm-hostd --token-file F [--listen IP:PORT] [--idle S]\n");
			return 2;
		}
	}
	if (!token_file || (ret = wire_read_token(token_file, h.token, sizeof(h.token)))) {
		fprintf(stderr, "smolvm-hostd: no token (--token-file)\n");
		return 2;
	}
	signal(SIGPIPE, SIG_IGN);
	lfd = wire_tcp_listen(h.listen);
	if (lfd >= 0)
		fcntl(lfd, F_SETFL, fcntl(lfd, F_GETFL) | O_NONBLOCK);
	if (lfd < 0) {
		fprintf(stderr, "smolvm-hostd: listen %s: %s\n", h.listen, strerror(-lfd));
		return 1;
	}
	fprintf(stderr, "smolvm-hostd: listening on %s\n", h.listen);
	for (;;) {
		struct pollfd p = { .fd = lfd, .events = POLLIN };
		int r = poll(&p, 1, 1000);

		hostd_reap(&h);
		if (h.nr_kids > 0)
			last = time(NULL);
		if (h.idle_s > 0 && h.nr_kids == 0 && time(NULL) - last >= h.idle_s) {
			fprintf(stderr, "smolvm-hostd: idle for %d s, powering off\n", h.idle_s);
			sync();
			if (getpid() == 1)
				reboot(RB_POWER_OFF);
			return 0;
		}
		if (r <= 0 || !(p.revents & POLLIN))
			continue;
		/* Take every waiting connection now (lfd is non-blocking; accepted sockets are not):
		 * a burst of many VMs' commands must not sit in the backlog. */
		int conn;

		while ((conn = accept4(lfd, NULL, NULL, SOCK_CLOEXEC)) >= 0) {
			if (h.nr_kids >= HOSTD_MAX_KIDS) {
				hostd_reap(&h);
				if (h.nr_kids >= HOSTD_MAX_KIDS) {
					close(conn);
					continue;
				}
			}
			pid_t pid = fork();

			if (pid == 0) {
				close(lfd);
				signal(SIGALRM, SIG_DFL);
				hostd_serve(&h, conn);
				_exit(0);
			}
			if (pid > 0)
				h.kids[h.nr_kids++] = pid;
			close(conn);
		}
		last = time(NULL);
	}
}
