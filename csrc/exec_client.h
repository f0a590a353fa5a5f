/* Host side of one exec: sends an EXEC frame to the guest agent over the VMM's vsock Unix socket and collects its output. */
#ifndef SMOLVM_EXEC_CLIENT_H
#define SMOLVM_EXEC_CLIENT_H

#include <stddef.h>
#include <stdint.h>

/* Per-stream cap on collected output; bytes beyond it are read and dropped (error[] then says so). */
#define EXEC_OUTPUT_CAP (64u << 20)

/* Per-sandbox identity sent once after boot or restore, before any command. */
struct exec_setup {
	uint64_t wall_ns;        /* host CLOCK_REALTIME; 0 = leave the guest clock */
	const uint8_t *entropy;  /* credited to the guest RNG; <= SMOLVM_SETUP_MAX_ENTROPY */
	uint32_t entropy_len;
	const char *hostname;    /* NULL = leave it; <= SMOLVM_SETUP_MAX_HOSTNAME bytes */
};

struct exec_request {
	const char *command;     /* run as `/bin/sh -c COMMAND` in the guest; required */
	const char *cwd;         /* NULL or "" = "/" */
	const char *const *env;  /* n_env "KEY=VALUE" strings over the agent's base environment */
	uint32_t n_env;
	uint32_t timeout_ms;     /* guest-side timeout; 0 = none */
	const struct exec_setup *setup; /* non-NULL: send SETUP instead of EXEC (command unused) */
};

struct exec_output {
	uint8_t *out;
	size_t out_len;
	uint8_t *err;
	size_t err_len;
	int exit_code; /* 128+N when killed by signal N; 124 on timeout */
	int signal;
	int timed_out;
	char error[256]; /* NUL-terminated message on failure (or a truncation note on success) */
};

/*
 * Connect to the VMM's vsock Unix socket uds_path, write "CONNECT port\n",
 * expect "OK ...\n", send EXEC, collect frames until EXIT.
 *
 * Waits with its own io_uring (set up and torn down per call, so any number
 * of threads may call it at once); never busy-polls. host_timeout_ms is the
 * overall host-side deadline (-1 = none). Every ~100 ms of waiting it calls
 * interrupted(opaque) if non-NULL; a nonzero return aborts with -EINTR.
 * Returns:
 *   0             an EXIT frame arrived; exit_code/signal/timed_out are set
 *   -ETIMEDOUT    past the host deadline
 *   -ECONNREFUSED / -ENOENT  nothing listens at uds_path, or the guest
 *                 refused the port (agent not up yet): worth retrying
 *   -ECONNRESET   the peer closed before EXIT
 *   -EPROTO       a bad frame, or an ERROR frame from the agent
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

#endif
