/* One connection to the guest agent, shared by every request (exec, setup, files): the VMM's vsock Unix socket, the CONNECT handshake, frames out, the one frame reader, and the io_uring that drives its I/O. */
#ifndef SMOLVM_AGENT_CONN_H
#define SMOLVM_AGENT_CONN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "proto.h"

#define AGENT_CONN_SMALL 512      /* payload bytes kept of a control frame (EXIT, ERROR, READY); the rest is read and dropped */
#define AGENT_CONN_HS_MAX 64      /* longest "OK <n>\n" handshake line accepted */
#define AGENT_CONN_SLICE_MS 100   /* agent_conn_run() asks interrupted() at least this often */
#define AGENT_CONN_HDR sizeof(struct smolvm_frame)

struct io_uring;

/*
 * I/O: agent_conn_run() drives the socket with a small io_uring of its own
 * (made on first use, freed by agent_conn_close()): a RECV into the receive
 * buffer, whose bytes then go through the frame reader, and a SEND of the
 * queue's head, both in flight at once, and io_uring_wait_cqe_timeout() for
 * the deadline and the interrupt slices. Whatever is in flight when it
 * returns is cancelled and reaped first. agent_conn_step() uses plain
 * nonblocking send()/recv() on the fd (which stays usable by an event loop)
 * and agent_conn_wait() waits with a POLL_ADD on the same ring. Where
 * io_uring is unavailable (io_uring_queue_init() fails: -ENOSYS, -EPERM
 * under a seccomp filter, RLIMIT_MEMLOCK), both fall back to poll() and
 * behave the same.
 */

/*
 * A request is a builder (it queues the first frame with agent_conn_frame())
 * and a handler: these callbacks, which the frame reader calls with the
 * connection's ctx. Raw frames (STDOUT, STDERR, DATA) reach bytes() in pieces
 * as they arrive; every other frame reaches frame() once, whole (its payload
 * cut at AGENT_CONN_SMALL bytes; len is the real length). ERROR frames never
 * reach the handler: the connection ends with -EPROTO and agent_conn.guest
 * holds the frame's err and code (struct smolvm_error), error[] its message.
 * Every callback returns 0 or -errno (with agent_conn_fail() for a message);
 * frame() returns 1 for the request's last frame. Only refill() (and the
 * builder, before the first step or run) may queue frames: a SEND in flight
 * points into the queue.
 */
struct agent_conn_ops {
	/* A header (magic and length already checked): is this type and length due now? NULL: any. */
	int (*header)(void *ctx, uint16_t type, uint32_t len);
	int (*bytes)(void *ctx, uint16_t type, const uint8_t *p, size_t n);
	int (*frame)(void *ctx, uint16_t type, const uint8_t *payload, size_t kept, uint32_t len);
	/* Called when everything queued has been sent: queue more (STDIN, DATA) or nothing. NULL: nothing. */
	int (*refill)(void *ctx);
};

/* What an ERROR frame said: enum smolvm_error_code and a Linux errno (0: a protocol error, no errno). */
struct agent_error {
	bool set; /* an ERROR frame came */
	int err;
	int code;
};

struct agent_conn {
	int fd;              /* -1 until connected */
	uint32_t port;
	int64_t deadline_ms; /* CLOCK_MONOTONIC; -1 = none */
	bool handshaken;     /* "OK <n>\n" came: frames flow */
	bool done;           /* the last frame came */
	bool tx_closed;      /* a send hit EPIPE / ECONNRESET: the agent closed, maybe after ERROR; read why */
	bool signalled;      /* a wait was cut by a signal: agent_conn_run() asks interrupted() at once */
	const struct agent_conn_ops *ops;
	void *ctx;
	const char *what;    /* for "the guest agent closed the connection <what>"; "before EXIT" by default */
	char *error;         /* the caller's message buffer */
	size_t error_size;
	struct agent_error guest;
	/* handshake */
	char line[32];
	size_t line_len, line_off;
	char hs[AGENT_CONN_HS_MAX + 1];
	size_t hs_len;
	/* outgoing frames, held until the handshake is done: tx[tx_off..tx_len) */
	uint8_t *tx;
	size_t tx_off, tx_len, tx_cap, tx_open; /* tx_open: payload bytes reserved by agent_conn_frame() */
	/* frame reader */
	uint8_t hdr[AGENT_CONN_HDR];
	size_t hdr_got;
	bool in_payload;
	uint16_t type;
	uint32_t len, left;
	uint8_t small[AGENT_CONN_SMALL];
	size_t small_len;
	uint8_t *rbuf;
	/* io_uring (agent_conn.c): NULL until first used, and where unavailable (ring_failed) */
	struct io_uring *ring;
	bool ring_failed;
	unsigned ring_busy;       /* operations in flight, a bit each */
	unsigned ring_poll_first; /* operations the kernel answered -EAGAIN (it may, on a nonblocking fd): POLL_ADD first */
	unsigned ring_mask;       /* events of agent_conn_wait()'s POLL_ADD in flight */
};

/*
 * Connect to the VMM's Unix socket uds_path (a Unix connect completes at
 * once), make it nonblocking and queue "CONNECT port\n". host_timeout_ms is
 * the deadline of the whole exchange (-1: none). error[0..error_size)
 * receives the message of any failure. Returns 0 or -errno
 * (-ENOENT / -ECONNREFUSED: nothing listens there). Call agent_conn_close()
 * afterwards in every case.
 */
int agent_conn_open(struct agent_conn *c, const char *uds_path, uint32_t port, int host_timeout_ms,
		    const struct agent_conn_ops *ops, void *ctx, char *error, size_t error_size);

/*
 * Reserve a frame of at most max_len payload bytes at the end of the queue
 * and return where its payload goes (NULL: -ENOMEM, message set); then
 * agent_conn_frame_done() with the bytes written. One frame at a time.
 */
uint8_t *agent_conn_frame(struct agent_conn *c, size_t max_len);
void agent_conn_frame_done(struct agent_conn *c, uint16_t type, size_t len);

/*
 * Never blocks: send what the socket takes (refill() when the queue runs
 * dry), read and parse what arrived. Returns 1 once the last frame came
 * (and again on later calls), 0 when more is to come (wait for the fd to be
 * readable, or writable while agent_conn_wants_write()), or -errno:
 *   -ECONNREFUSED  the guest refused the port (agent not up yet): worth retrying
 *   -ECONNRESET    the agent closed before the last frame
 *   -EPROTO        a bad frame, or an ERROR frame (guest.set)
 *   a handler's error
 */
int agent_conn_step(struct agent_conn *c);
bool agent_conn_wants_write(const struct agent_conn *c);

/*
 * Wait for the socket (readable, or writable while agent_conn_wants_write())
 * up to max_ms (-1: no limit; 0: only check the deadline), never past the
 * deadline: 0 (ready, the time passed, or a signal: signalled), -ETIMEDOUT,
 * -errno. A wakeup may be spurious: step() then finds nothing.
 */
int agent_conn_wait(struct agent_conn *c, int max_ms);

/*
 * Blocks until the last frame came: 0, or -errno as agent_conn_step(), or
 * -ETIMEDOUT past the deadline. interrupted(opaque) is asked at least every
 * AGENT_CONN_SLICE_MS and at once after a signal; nonzero aborts with -EINTR.
 * Nothing is left in flight when it returns.
 */
int agent_conn_run(struct agent_conn *c, int (*interrupted)(void *), void *opaque);

/* Cancel and reap what the ring has in flight, free it, close the socket, free the queue. Safe after a failed open, twice. */
void agent_conn_close(struct agent_conn *c);

/* Write a message to c->error and return err. */
int agent_conn_fail(struct agent_conn *c, int err, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

int64_t agent_conn_now_ms(void);

#endif
