/* Host side of one PTY session: the PTY request (builder and handler over agent_conn.h), typing and resizes out, the terminal's output in. */
#ifndef SMOLVM_PTY_CLIENT_H
#define SMOLVM_PTY_CLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Terminal output kept until the caller takes it; beyond this the oldest is dropped (a caller that never reads). */
#define PTY_OUTPUT_CAP (16u << 20)

struct pty_request {
	const char *command;    /* run as `/bin/sh -c COMMAND` on the terminal; required */
	const char *cwd;        /* NULL or "" = "/" */
	const char *const *env; /* n_env "KEY=VALUE" strings over the agent's base environment (TERM=xterm-256color) */
	uint32_t n_env;
	uint32_t timeout_ms;    /* guest-side timeout of the whole session; 0 = none */
	uint16_t rows, cols;    /* 1..SMOLVM_PTY_MAX_DIM */
};

struct pty_status {
	int pid;         /* the session leader in the guest, once READY came; else 0 */
	int exit_code;   /* once done: 128+N when killed by signal N; 124 on timeout */
	int signal;
	int timed_out;
	int guest_err;   /* the errno of an ERROR frame (0: none) */
	int guest_code;  /* what it is about: enum smolvm_error_code, e.g. SMOLVM_ERRC_CWD */
	char error[256]; /* NUL-terminated message of the last failure */
};

/*
 * One session, driven step by step (like exec_stream in exec_client.h):
 * pty_session_open() builds the request and connects to the VMM's vsock Unix
 * socket uds_path (0 with *psp set, or -errno with st->error set); then
 * pty_session_step() (never blocks: sends what the socket takes, parses what
 * came; 1 once EXIT came, 0 while the session runs, or -errno as
 * exec_stream_step(): -ECONNREFUSED, -ECONNRESET, -EPROTO with guest_err,
 * -ETIMEDOUT...) and pty_session_wait() (waits up to max_ms for the socket,
 * never past host_timeout_ms from open; -1: none) in turns.
 *
 * pty_session_write() and pty_session_resize() queue input and a new size
 * (copied; sent by the following steps, a resize before input typed after
 * it); pty_session_pending() is the input not yet handed to the socket.
 * pty_session_output() shows the terminal output that came, which
 * pty_session_consume() takes from the front. st is the caller's and gets
 * the pid on READY and the exit status on EXIT.
 *
 * pty_session_free() closes the connection: the agent kills every process of
 * the session. Safe on NULL. Holds no state outside the struct: any number
 * of sessions at once, one thread each at a time.
 */
struct pty_session;

int pty_session_open(struct pty_session **psp, const char *uds_path, uint32_t port, const struct pty_request *req,
		     int host_timeout_ms, struct pty_status *st);
int pty_session_fd(const struct pty_session *ps);
bool pty_session_wants_write(const struct pty_session *ps);
int pty_session_step(struct pty_session *ps);
int pty_session_wait(struct pty_session *ps, int max_ms);
int pty_session_write(struct pty_session *ps, const uint8_t *p, size_t n);
int pty_session_resize(struct pty_session *ps, uint16_t rows, uint16_t cols);
size_t pty_session_pending(const struct pty_session *ps);
const uint8_t *pty_session_output(const struct pty_session *ps, size_t *len);
void pty_session_consume(struct pty_session *ps, size_t n);
void pty_session_free(struct pty_session *ps);

#endif
