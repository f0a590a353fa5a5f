/* EXEC in the guest agent: check the request, spawn `/bin/sh -c` in its own session, stream its output, feed its stdin, report its exit. */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "agent.h"

/* Buffers are allocated per use, at most 64 KiB each (every first-touched guest page is a fault). */
#define EXEC_CHUNK (64u << 10)    /* bytes read from a pipe per STDOUT/STDERR frame */
#define EXEC_DRAIN_MAX (1u << 20) /* per pipe, read at most this much after the shell exited */
#define EXEC_MAX_ENV 4096

static const char *const exec_base_env[] = {
	"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
	"HOME=/root",
	"LANG=C.UTF-8",
	"TERM=dumb",
};
#define EXEC_N_BASE_ENV (sizeof(exec_base_env) / sizeof(exec_base_env[0]))

/* The next NUL-terminated string of the payload at *off, or NULL if it runs past the end. */
static const char *exec_next_string(const uint8_t *p, uint32_t len, uint32_t *off)
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

static int exec_set_nonblock(int fd)
{
	int fl = fcntl(fd, F_GETFL);

	if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
		return -errno;
	return 0;
}

int exec_parse_strings(struct agent_conn *c, const char *what, uint32_t off, uint32_t n_env, const char *term,
		       struct exec_req *req)
{
	const uint8_t *p = c->payload;
	uint32_t len = le32toh(c->hdr.len), nvars, i;
	struct stat st;

	req->cmd = exec_next_string(p, len, &off);
	if (!req->cmd)
		return conn_fail(c, 0, "bad %s frame: the command string is not NUL-terminated inside the payload", what);
	req->cwd = exec_next_string(p, len, &off);
	if (!req->cwd)
		return conn_fail(c, 0, "bad %s frame: the cwd string is missing or not NUL-terminated", what);
	if (n_env > EXEC_MAX_ENV)
		return conn_fail(c, 0, "bad %s frame: n_env=%u exceeds the limit of %u", what, n_env, EXEC_MAX_ENV);
	req->envp = calloc(EXEC_N_BASE_ENV + n_env + 1, sizeof(*req->envp));
	if (!req->envp)
		return -ENOMEM;
	memcpy(req->envp, exec_base_env, sizeof(exec_base_env));
	nvars = EXEC_N_BASE_ENV;
	for (i = 0; term && i < nvars; i++) {
		if (strncmp(req->envp[i], "TERM=", 5) == 0)
			req->envp[i] = term;
	}
	for (i = 0; i < n_env; i++) {
		const char *kv = exec_next_string(p, len, &off), *eq;
		uint32_t j;

		if (!kv)
			return conn_fail(c, 0, "bad %s frame: n_env=%u but env entry %u is missing or not NUL-terminated",
					 what, n_env, i);
		eq = strchr(kv, '=');
		if (!eq || eq == kv)
			return conn_fail(c, 0, "bad %s frame: env entry %u \"%.60s\" is not KEY=VALUE", what, i, kv);
		for (j = 0; j < nvars; j++) {
			if (strncmp(req->envp[j], kv, (size_t)(eq - kv) + 1) == 0)
				break;
		}
		req->envp[j] = kv;
		if (j == nvars)
			nvars++;
	}
	if (off != len)
		return conn_fail(c, 0, "bad %s frame: %u bytes after the command, cwd and n_env=%u env entries", what,
				 len - off, n_env);
	if (!req->cwd[0])
		req->cwd = "/";
	if (stat(req->cwd, &st) < 0)
		return conn_fail_code(c, errno, SMOLVM_ERRC_CWD, "cwd %s: %s", req->cwd, strerror(errno));
	if (!S_ISDIR(st.st_mode))
		return conn_fail_code(c, ENOTDIR, SMOLVM_ERRC_CWD, "cwd %s: %s", req->cwd, strerror(ENOTDIR));
	return 0;
}

/*
 * Check the EXEC payload (its length is at least struct smolvm_exec, conn_read_request saw to
 * that) and fill req; the caller frees req->envp. 0, or ERROR queued (AGENT_C_CLOSING), or -ENOMEM.
 */
static int exec_parse(struct agent_conn *c, struct exec_req *req)
{
	struct smolvm_exec ex;
	int ret;

	memcpy(&ex, c->payload, sizeof(ex));
	ret = exec_parse_strings(c, "EXEC", sizeof(ex), le32toh(ex.n_env), NULL, req);
	if (ret < 0 || c->state == AGENT_C_CLOSING)
		return ret;
	if (le32toh(ex.flags) & ~SMOLVM_EXEC_STDIN)
		return conn_fail(c, EINVAL, "bad EXEC frame: unknown flags 0x%x", le32toh(ex.flags));
	req->stdin_on = le32toh(ex.flags) & SMOLVM_EXEC_STDIN;
	req->timeout_ms = le32toh(ex.timeout_ms);
	return 0;
}

/*
 * Make the pipes and spawn `/bin/sh -c CMD` in a new session with a clean signal state;
 * the connection then watches the pipes (AGENT_C_RUNNING). 0, or ERROR queued, or -errno.
 */
static int exec_spawn(struct agent *a, struct agent_conn *c, const struct exec_req *req)
{
	char *argv[] = { "sh", "-c", (char *)req->cmd, NULL };
	posix_spawn_file_actions_t fa;
	posix_spawnattr_t attr;
	bool fa_ready = false, attr_ready = false;
	int po[2] = { -1, -1 }, pe[2] = { -1, -1 }, pi[2] = { -1, -1 };
	sigset_t set;
	pid_t pid;
	int ret, i;

	c->stdin_on = req->stdin_on;
	if (c->stdin_on && (pipe2(pi, O_CLOEXEC) < 0 || exec_set_nonblock(pi[1]) < 0)) {
		ret = conn_fail(c, errno, "cannot make the stdin pipe: %s", strerror(errno));
		goto out;
	}
	if (pipe2(po, O_CLOEXEC) < 0 || pipe2(pe, O_CLOEXEC) < 0 || exec_set_nonblock(po[0]) < 0 ||
	    exec_set_nonblock(pe[0]) < 0) {
		ret = conn_fail(c, errno, "cannot make output pipes: %s", strerror(errno));
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
		ret = posix_spawn_file_actions_addchdir_np(&fa, req->cwd);
	if (ret) {
		ret = -ret;
		goto out;
	}
	ret = posix_spawn(&pid, "/bin/sh", &fa, &attr, argv, (char *const *)req->envp);
	if (ret) {
		int err = ret;
		ret = conn_fail(c, err, "cannot run /bin/sh in %s: %s", req->cwd, strerror(err));
		goto out;
	}
	c->pid = pid;
	c->out = (struct agent_watch){ AGENT_W_STDOUT, po[0], 0, c };
	c->err = (struct agent_watch){ AGENT_W_STDERR, pe[0], 0, c };
	c->in = (struct agent_watch){ AGENT_W_STDIN, pi[1], 0, c };
	po[0] = pe[0] = pi[1] = -1;
	if (req->timeout_ms)
		c->deadline_ms = agent_now_ms() + req->timeout_ms;
	c->state = AGENT_C_RUNNING;
	free(c->payload); /* req's strings are gone with it */
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
	return ret;
}

int exec_start(struct agent *a, struct agent_conn *c)
{
	struct exec_req req = { 0 };
	int ret = exec_parse(c, &req);

	if (ret == 0 && c->state != AGENT_C_CLOSING)
		ret = exec_spawn(a, c, &req);
	free(req.envp);
	return ret;
}

int exec_pipe_read(struct agent *a, struct agent_conn *c, struct agent_watch *w)
{
	uint16_t type = w->kind == AGENT_W_STDOUT ? SMOLVM_STDOUT : SMOLVM_STDERR;
	struct agent_chunk *ch = conn_chunk_frame(type, EXEC_CHUNK);
	ssize_t n;

	if (!ch)
		return -ENOMEM;
	do
		n = read(w->fd, ch->data + AGENT_HDR, EXEC_CHUNK);
	while (n < 0 && errno == EINTR);
	if (n <= 0) {
		int err = n < 0 ? errno : 0;
		free(ch);
		if (err == EAGAIN)
			return -EAGAIN;
		agent_watch_close(a, w); /* EOF, or an error that would repeat */
		return -err;
	}
	if ((size_t)n < EXEC_CHUNK / 2) {
		struct agent_chunk *small = realloc(ch, sizeof(*ch) + AGENT_HDR + (size_t)n);
		if (small)
			ch = small;
	}
	conn_chunk_header(ch, type, (uint32_t)n);
	conn_enqueue(c, ch);
	return (int)n;
}

int exec_exited(struct agent *a, struct agent_conn *c, int status)
{
	struct agent_watch *ws[2] = { &c->out, &c->err };
	struct smolvm_exit ex = { 0, 0, 0 };
	int i, ret = 0;

	c->pid = 0;
	agent_watch_close(a, &c->in); /* input still coming is read and dropped */
	for (i = 0; i < 2; i++) {
		size_t total = 0;
		while (ws[i]->fd >= 0 && total < EXEC_DRAIN_MAX) {
			ret = exec_pipe_read(a, c, ws[i]);
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
	return conn_frame(c, SMOLVM_EXIT, &ex, sizeof(ex));
}

/* ---- stdin ---- */

bool exec_stdin_full(const struct agent_conn *c)
{
	return c->ibuf && c->iread == c->ilen && c->iwritten < c->ilen;
}

/* Write what is buffered of the current STDIN frame to the command's stdin; a closed stdin drops the rest. */
static void exec_stdin_write(struct agent *a, struct agent_conn *c)
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

/* The current STDIN frame is all written: the next one's header comes next. */
static void exec_stdin_frame_end(struct agent_conn *c)
{
	if (c->ibuf && c->iread == c->ilen && c->iwritten == c->ilen) {
		free(c->ibuf);
		c->ibuf = NULL;
		c->ilen = c->iread = c->iwritten = 0;
		c->igot = 0;
	}
}

int exec_read_stdin(struct agent *a, struct agent_conn *c)
{
	bool resize;
	ssize_t n;

	while (!exec_stdin_full(c)) {
		if (c->igot < AGENT_HDR)
			n = conn_read(c, (uint8_t *)&c->ihdr + c->igot, AGENT_HDR - c->igot);
		else
			n = conn_read(c, c->ibuf + c->iread, c->ilen - c->iread);
		if (n <= 0)
			return (int)n;
		if (c->igot < AGENT_HDR) {
			uint32_t len;

			c->igot += (uint32_t)n;
			if (c->igot < AGENT_HDR)
				continue;
			len = le32toh(c->ihdr.len);
			resize = c->pty && le16toh(c->ihdr.type) == SMOLVM_RESIZE;
			if (le32toh(c->ihdr.magic) != SMOLVM_PROTO_MAGIC ||
			    (le16toh(c->ihdr.type) != SMOLVM_STDIN && !resize) || len > SMOLVM_MAX_PAYLOAD ||
			    c->stdin_eof || (resize && len != sizeof(struct smolvm_winsize)))
				return conn_fail(c, 0, "bad frame while the command runs: type %u, length %u (want STDIN%s)",
						 le16toh(c->ihdr.type), len,
						 c->pty ? " or RESIZE" : c->stdin_eof ? ", and none after the empty one" : "");
			if (len == 0 && c->pty) {
				c->igot = 0; /* a terminal's end of input is ^D: nothing to do */
				continue;
			}
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
		if (le16toh(c->ihdr.type) == SMOLVM_RESIZE) {
			if (c->iread < c->ilen)
				continue;
			c->iwritten = c->ilen;
			if (pty_resize(c, c->ibuf) < 0)
				return conn_fail(c, EINVAL, "bad RESIZE frame: a size out of 1..%u", SMOLVM_PTY_MAX_DIM);
		} else {
			exec_stdin_write(a, c);
		}
		exec_stdin_frame_end(c);
	}
	return 0;
}

void exec_stdin_event(struct agent *a, struct agent_conn *c)
{
	exec_stdin_write(a, c);
	exec_stdin_frame_end(c);
}
