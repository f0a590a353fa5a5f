/* PTY in the guest agent: a command on a new pseudo-terminal as a session leader, its output streamed, typing and resizes applied, its session killed with the connection. */
#define _GNU_SOURCE
#include <dirent.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <termios.h>
#include <unistd.h>

#include "agent.h"

#define PTY_TERM "TERM=xterm-256color"

static bool pty_size_ok(uint16_t rows, uint16_t cols)
{
	return rows >= 1 && cols >= 1 && rows <= SMOLVM_PTY_MAX_DIM && cols <= SMOLVM_PTY_MAX_DIM;
}

/* A new pty: *master (nonblocking) and *slave (both close-on-exec). 0 or -errno. */
static int pty_open(int *master, int *slave, uint16_t rows, uint16_t cols)
{
	struct winsize ws = { .ws_row = rows, .ws_col = cols };
	int unlock = 0, m, s;

	*master = *slave = -1;
	m = open("/dev/ptmx", O_RDWR | O_NOCTTY | O_NONBLOCK | O_CLOEXEC);
	if (m < 0)
		return -errno;
	if (ioctl(m, TIOCSPTLCK, &unlock) < 0 || ioctl(m, TIOCSWINSZ, &ws) < 0)
		goto fail;
	s = ioctl(m, TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (s < 0)
		goto fail;
	*master = m;
	*slave = s;
	return 0;
fail:
	s = -errno;
	close(m);
	return s;
}

/* In the child, before exec: a new session with the pty as its controlling terminal and stdio. Never returns. */
static void pty_child(int slave, const struct exec_req *req)
{
	char *argv[] = { "sh", "-c", (char *)req->cmd, NULL };
	sigset_t set;
	int sig;

	sigemptyset(&set);
	sigprocmask(SIG_SETMASK, &set, NULL);
	for (sig = 1; sig < NSIG; sig++)
		signal(sig, SIG_DFL); /* the agent ignores SIGPIPE: the command gets a clean slate */
	if (setsid() < 0 || ioctl(slave, TIOCSCTTY, 0) < 0 || dup2(slave, 0) < 0 || dup2(slave, 1) < 0 ||
	    dup2(slave, 2) < 0 || chdir(req->cwd) < 0)
		_exit(127);
	if (slave > 2)
		close(slave);
	execve("/bin/sh", argv, (char *const *)req->envp);
	_exit(127);
}

int pty_start(struct agent *a, struct agent_conn *c)
{
	struct exec_req req = { 0 };
	struct smolvm_pty_ready ready = { 0, 0 };
	struct smolvm_pty p;
	int master = -1, slave = -1, in = -1, ret;
	pid_t pid;

	(void)a;
	memcpy(&p, c->payload, sizeof(p));
	ret = exec_parse_strings(c, "PTY", sizeof(p), le32toh(p.n_env), PTY_TERM, &req);
	if (ret < 0 || c->state == AGENT_C_CLOSING)
		goto out;
	if (le32toh(p.flags)) {
		ret = conn_fail(c, EINVAL, "bad PTY frame: unknown flags 0x%x", le32toh(p.flags));
		goto out;
	}
	if (!pty_size_ok(le16toh(p.rows), le16toh(p.cols))) {
		ret = conn_fail(c, EINVAL, "bad PTY frame: size %ux%u, want rows and cols in 1..%u", le16toh(p.rows),
				le16toh(p.cols), SMOLVM_PTY_MAX_DIM);
		goto out;
	}
	ret = pty_open(&master, &slave, le16toh(p.rows), le16toh(p.cols));
	if (ret == 0 && (in = fcntl(master, F_DUPFD_CLOEXEC, 3)) < 0)
		ret = -errno;
	if (ret < 0) {
		ret = conn_fail(c, -ret, "cannot open a pty (is devpts mounted on /dev/pts?): %s", strerror(-ret));
		goto out;
	}
	pid = fork();
	if (pid < 0) {
		ret = conn_fail(c, errno, "cannot start /bin/sh: %s", strerror(errno));
		goto out;
	}
	if (pid == 0)
		pty_child(slave, &req);
	c->pid = c->pty_sid = pid;
	c->pty = c->stdin_on = true;
	c->out = (struct agent_watch){ AGENT_W_STDOUT, master, 0, c };
	c->in = (struct agent_watch){ AGENT_W_STDIN, in, 0, c };
	master = in = -1;
	if (le32toh(p.timeout_ms))
		c->deadline_ms = agent_now_ms() + le32toh(p.timeout_ms);
	c->state = AGENT_C_RUNNING;
	free(c->payload); /* req's strings are gone with it */
	c->payload = NULL;
	ready.pid = (int32_t)htole32((uint32_t)pid);
	ret = conn_frame(c, SMOLVM_READY, &ready, sizeof(ready));
out:
	free(req.envp);
	if (master >= 0)
		close(master);
	if (slave >= 0)
		close(slave);
	if (in >= 0)
		close(in);
	return ret;
}

int pty_resize(struct agent_conn *c, const uint8_t *payload)
{
	struct smolvm_winsize w;
	struct winsize ws = { 0 };

	memcpy(&w, payload, sizeof(w));
	ws.ws_row = le16toh(w.rows);
	ws.ws_col = le16toh(w.cols);
	if (!pty_size_ok(ws.ws_row, ws.ws_col) || w.reserved)
		return -EINVAL;
	if (c->in.fd >= 0)
		ioctl(c->in.fd, TIOCSWINSZ, &ws); /* the foreground job gets SIGWINCH */
	return 0;
}

/* The session id of /proc/<name>/stat (field 6, after the command's closing parenthesis), or -1. */
static pid_t pty_session_of(const char *name)
{
	char path[64], buf[512];
	int fd, sid;
	ssize_t n;
	char *p;

	snprintf(path, sizeof(path), "/proc/%s/stat", name);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return -1;
	buf[n] = 0;
	p = strrchr(buf, ')');
	if (!p || sscanf(p + 1, " %*c %*d %*d %d", &sid) != 1)
		return -1;
	return sid;
}

void pty_kill_session(pid_t sid)
{
	DIR *d = opendir("/proc");
	struct dirent *e;

	kill(-sid, SIGKILL); /* the leader's group, even if /proc cannot be read */
	if (!d)
		return;
	while ((e = readdir(d)) != NULL) {
		pid_t pid = (pid_t)atoi(e->d_name);

		if (pid > 1 && pty_session_of(e->d_name) == sid)
			kill(pid, SIGKILL);
	}
	closedir(d);
}
