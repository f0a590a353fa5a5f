/* Host side of one exec: the EXEC request (builder and handler over agent_conn.h), its stdin, and its output collected or streamed. */
#ifndef SMOLVM_EXEC_CLIENT_H
#define SMOLVM_EXEC_CLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Per-stream cap on collected output; bytes beyond it are read and dropped (error[] then says so). */
#define EXEC_OUTPUT_CAP (64u << 20)

struct exec_request {
	const char *command;     /* run as `/bin/sh -c COMMAND` in the guest; required */
	const char *cwd;         /* NULL or "" = "/" */
	const char *const *env;  /* n_env "KEY=VALUE" strings over the agent's base environment */
	uint32_t n_env;
	uint32_t timeout_ms;     /* guest-side timeout; 0 = none */
	bool has_input;          /* the command's stdin is input[0..input_len), then end of file; else /dev/null */
	const uint8_t *input;    /* kept by the caller until the exec ends */
	size_t input_len;
};

struct exec_output {
	uint8_t *out;
	size_t out_len;
	uint8_t *err;
	size_t err_len;
	int exit_code; /* 128+N when killed by signal N; 124 on timeout */
	int signal;
	int timed_out;
	int guest_err;   /* the errno of an ERROR frame (0: none, or the agent named none) */
	int guest_code;  /* what it is about: enum smolvm_error_code (proto.h), e.g. SMOLVM_ERRC_CWD */
	char error[256]; /* NUL-terminated message on failure (or a truncation note on success) */
};

/*
 * Connect to the VMM's vsock Unix socket uds_path (agent_conn_open()), send
 * EXEC (and the input in STDIN frames), collect frames until EXIT:
 * exec_stream_open(), then exec_stream_step() and exec_stream_wait() in
 * turns, then exec_stream_free().
 *
 * Holds no state outside the call, so any number of threads may call it at
 * once; never busy-polls. host_timeout_ms is the
 * overall host-side deadline (-1 = none). Every ~100 ms of waiting it calls
 * interrupted(opaque) if non-NULL; a nonzero return aborts with -EINTR.
 * Returns:
 *   0             an EXIT frame arrived; exit_code/signal/timed_out are set
 *   -ETIMEDOUT    past the host deadline
 *   -ECONNREFUSED / -ENOENT  nothing listens at uds_path, or the guest
 *                 refused the port (agent not up yet): worth retrying
 *   -ECONNRESET   the peer closed before EXIT
 *   -EPROTO       a bad frame, or an ERROR frame from the agent (its message
 *                 in error[], its errno in guest_err)
 *   -E2BIG        the request does not fit in one frame
 *   other -errno
 * On every return out->error holds a message when the return is nonzero,
 * and out->out / out->err hold whatever output arrived (NULL when empty);
 * release them with exec_output_free().
 */
int exec_run(const char *uds_path, uint32_t port, const struct exec_request *req, int host_timeout_ms,
	     int (*interrupted)(void *), void *opaque, struct exec_output *out);

/* Free out->out and out->err and set them to NULL. Safe on a zeroed or already freed struct. */
void exec_output_free(struct exec_output *out);

/*
 * The same exec, step by step, for callers that hand output to their user as
 * it arrives or wait on the socket in their own event loop (module.c).
 *
 * exec_stream_open() builds the request, connects to uds_path (a Unix connect
 * completes at once) and makes the socket nonblocking; it returns 0 with
 * *xsp set, or -errno with out->error set and *xsp NULL. out is the caller's
 * and receives output and exit status as exec_run() describes; req->input
 * must stay valid until exec_stream_free(). flags: EXEC_STREAM_EVENTS also
 * logs each output chunk for exec_stream_events().
 *
 * exec_stream_step() never blocks: it sends what the socket takes (the
 * handshake line, the request, STDIN frames) and parses what has arrived.
 * Returns 1 when the EXIT frame came (done; later calls return 1 again), 0
 * when more is to come (wait for exec_stream_fd() to be readable, or writable
 * while exec_stream_wants_write()), or an exec_run() error code.
 *
 * exec_stream_wait() waits on the socket (agent_conn_wait(): the ring, or
 * poll) for up to max_ms (-1: no limit), never past the host deadline: 0 (ready, or the time passed), -ETIMEDOUT past the
 * deadline, -errno. EINTR returns 0 so the caller can check signals.
 *
 * exec_stream_events() gives the chunks logged since the last
 * exec_stream_events_clear(): records of 1 byte SMOLVM_STDOUT or
 * SMOLVM_STDERR, a host-endian uint32 length, then that many bytes, in
 * arrival order (each chunk is also kept in out as usual).
 *
 * exec_stream_free() closes the connection: the agent then kills a command
 * still running (its whole process group). Safe on NULL.
 */
#define EXEC_STREAM_EVENTS 1u

struct exec_stream;

int exec_stream_open(struct exec_stream **xsp, const char *uds_path, uint32_t port, const struct exec_request *req,
		     int host_timeout_ms, unsigned flags, struct exec_output *out);
int exec_stream_fd(const struct exec_stream *xs);
bool exec_stream_wants_write(const struct exec_stream *xs);
int exec_stream_step(struct exec_stream *xs);
int exec_stream_wait(struct exec_stream *xs, int max_ms);
const uint8_t *exec_stream_events(const struct exec_stream *xs, size_t *len);
void exec_stream_events_clear(struct exec_stream *xs);
void exec_stream_free(struct exec_stream *xs);

#endif
