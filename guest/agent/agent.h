/* The guest agent's shared state (one struct agent, one struct agent_conn per host connection) and the contracts between its files. */
#ifndef SMOLVM_AGENT_H
#define SMOLVM_AGENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "proto.h"
#include "relay.h"

/*
 * Files: main.c (the loop, the dispatch, logging: prefix agent_), init.c (PID 1: mounts, reaping,
 * readiness: init_), conn.c (connections, the output queue, request frames: conn_), exec.c (EXEC:
 * exec_), pty.c (PTY: pty_), files.c (PUT/GET: files_), setup.c (SETUP: setup_). Everything runs on one thread, in
 * the epoll loop of agent_run(); no handler waits for the host or for a command.
 *
 * A handler's return value: 0 when the connection goes on (an ERROR or EXIT may be queued, and
 * state is then AGENT_C_CLOSING) or -errno to close it at once (conn_close).
 */

#define AGENT_HDR ((uint32_t)sizeof(struct smolvm_frame))
#define AGENT_XFER_CHUNK (256u << 10) /* PUT/GET buffer: payload bytes of one DATA frame */
#define AGENT_PATH_MAX 4096           /* PUT/GET path bytes, NUL included */

/* The disk image that SETUP ROOT lays the overlay on, mounted at boot (init mode). */
#define AGENT_IMAGE_DEV "/dev/vda"
#define AGENT_IMAGE_DIR "/run/smolvm/image"

enum agent_watch_kind {
	AGENT_W_LISTEN,
	AGENT_W_SIGNAL,
	AGENT_W_READY,
	AGENT_W_SOCK,
	AGENT_W_STDOUT, /* also a PTY's master: its output is STDOUT frames */
	AGENT_W_STDERR,
	AGENT_W_STDIN,
	AGENT_W_PEER, /* FORWARD: the guest TCP connection, in `out` */
};

/* What an epoll event points at. events: the mask registered now (0 = not in the epoll set). */
struct agent_watch {
	enum agent_watch_kind kind;
	int fd;
	uint32_t events;
	struct agent_conn *conn;
};

/* A queued piece of output: a whole frame (header + payload) or raw handshake bytes. */
struct agent_chunk {
	struct agent_chunk *next;
	uint32_t len, off;
	bool pooled; /* AGENT_XFER_CHUNK of payload room: goes back to the pool when sent */
	uint8_t data[];
};

enum agent_conn_state {
	AGENT_C_HANDSHAKE, /* --unix only: waiting for "CONNECT <port>\n" */
	AGENT_C_HEADER,    /* reading the request frame header (EXEC, SETUP, PUT, GET) */
	AGENT_C_PAYLOAD,   /* reading the request payload */
	AGENT_C_RUNNING,   /* the shell runs; output is streamed */
	AGENT_C_ROOT_WAIT, /* SETUP ROOT: waiting for the scratch disk to get its size */
	AGENT_C_PUT,       /* READY sent; DATA frames are written to the temporary file */
	AGENT_C_GET,       /* READY sent; the file is streamed in DATA frames as the socket drains */
	AGENT_C_CLOSING,   /* EXIT or ERROR queued; close once the queue is sent */
	AGENT_C_RELAY,     /* FORWARD: bytes relayed between sock and the TCP connection in `out` */
};

struct agent_conn {
	struct agent_conn *next;
	struct agent_watch sock, out, err;
	struct agent_watch in; /* EXEC with SMOLVM_EXEC_STDIN: the write end of the command's stdin; PTY: a dup of the master; fd -1 once closed */
	enum agent_conn_state state;
	char line[32]; /* handshake line */
	size_t line_len;
	struct smolvm_frame hdr;
	uint32_t got; /* bytes of hdr or payload read so far */
	uint8_t *payload;
	pid_t pid; /* the shell while it is not reaped, else 0 */
	uint64_t deadline_ms; /* CLOCK_MONOTONIC; 0 = no timeout */
	bool timed_out;
	bool blocked; /* the last send hit EAGAIN: wait for EPOLLOUT */
	bool paused;  /* pipes out of the epoll set: too much output queued */
	bool dead;    /* closed; freed after the current batch of events */
	struct agent_chunk *qhead, *qtail;
	size_t qbytes;
	/* PUT / GET */
	int xfd;              /* the file being written or read; -1 */
	char *tmp_path;       /* PUT: the temporary file until it is renamed; NULL */
	char *path;           /* PUT / GET: the path the host named */
	uint64_t xsize;       /* bytes of DATA announced (PUT) or the file's size (GET) */
	uint64_t xdone;       /* bytes received (PUT) or queued (GET) so far */
	uint32_t xmode;       /* PUT: permission bits */
	uint32_t xframe_left; /* PUT: payload bytes of the current DATA frame still to read; 0 = a header is next */
	int xerr;             /* PUT: the first write error; DATA is then read and dropped */
	struct agent_chunk *xbuf; /* PUT: receive buffer (pooled) */
	/* SETUP ROOT */
	uint64_t poll_at_ms;
	struct relay relay; /* FORWARD (its b is out.fd) */
	/* EXEC with SMOLVM_EXEC_STDIN: the STDIN frame being read and written to the pipe */
	bool stdin_on;            /* STDIN frames follow EXEC (always for PTY) */
	bool pty;                 /* a PTY request: RESIZE frames too; its session dies with the connection */
	pid_t pty_sid;            /* PTY: the session to kill on close (the leader's pid), or 0 */
	bool stdin_eof;           /* the empty STDIN frame came */
	struct smolvm_frame ihdr;
	uint32_t igot;            /* bytes of ihdr read; AGENT_HDR = in a payload */
	uint8_t *ibuf;            /* payload of the current frame (ilen bytes) */
	uint32_t ilen, iread, iwritten;
};

/* What boot (init mode) left for SETUP ROOT. */
struct agent_boot {
	bool image_mounted;
	bool root_done;
	int image_err;         /* why the image is not mounted */
	char image_error[200];
};

struct agent {
	bool unix_mode;
	int epfd, devnull;
	struct agent_watch listen, sig, ready;
	struct agent_conn *conns, *graveyard;
	int nconns;
	struct agent_conn *root_conn; /* the SETUP waiting for the scratch disk, or NULL */
	struct agent_boot boot;
};

/* A struct agent before agent_run(): no fds. */
#define AGENT_INIT \
	{ .epfd = -1, .devnull = -1, .listen = { AGENT_W_LISTEN, -1, 0, NULL }, \
	  .sig = { AGENT_W_SIGNAL, -1, 0, NULL }, .ready = { AGENT_W_READY, -1, 0, NULL } }

/* ---- main.c ---- */

/* One line to /dev/kmsg (once agent_log_kmsg() was called) or to stderr. */
void agent_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* /dev/kmsg exists from now on: agent_log() writes there. */
void agent_log_kmsg(void);
uint64_t agent_now_ms(void); /* CLOCK_MONOTONIC */
/* Register w with `events` (0 = take it out of the epoll set); epoll_ctl only on a change. 0 or -errno. */
int agent_watch_set(struct agent *a, struct agent_watch *w, uint32_t events);
/* Take w out of the epoll set and close its fd (fd -1 afterwards; nothing if it is -1). */
void agent_watch_close(struct agent *a, struct agent_watch *w);
/* Act on one epoll event of w, then conn_settle() or conn_close() its connection. */
void agent_dispatch(struct agent *a, struct agent_watch *w, uint32_t ev);
/* Listen (vsock port SMOLVM_AGENT_PORT, or unix_path in --unix mode) and serve until an error. -errno. */
int agent_run(struct agent *a, const char *unix_path);

/* ---- init.c ---- */

/* PID 1's start: /proc, /sys, /dev, /tmp, hostname "smolvm", lo up, the image (a->boot). */
void init_system(struct agent *a);
/* Make sure fds 0-2 are open, so that pipes never land there. */
void init_std_fds(void);
/* One connect to the host's READY port (in a->ready until the host refuses it). */
void init_signal_ready(struct agent *a);
/* SIGCHLD: reap every child (PID 1 inherits all orphans); exec_exited() for our shells. */
void init_reap(struct agent *a);
/* mkdir -p: every missing folder of path (absolute). 0 or -errno. */
int init_mkdir_p(const char *path, mode_t mode);

/* ---- conn.c ---- */

/* A new connection on fd (in a->conns, not yet settled), or NULL (fd stays the caller's). */
struct agent_conn *conn_new(struct agent *a, int fd);
/* Accept every waiting connection on a->listen (beyond the limit they are dropped). */
void conn_accept(struct agent *a);
/* Bind and listen (vsock, or unix_path), into a->listen. 0 or -errno. */
int conn_listen(struct agent *a, const char *unix_path);
/* After any event: send what is queued, close when finished, and set the epoll masks to the state. */
void conn_settle(struct agent *a, struct agent_conn *c);
/* Kill its command, drop its transfer, close its fds; freed (conn_free) after this batch of events. */
void conn_close(struct agent *a, struct agent_conn *c);
void conn_free(struct agent_conn *c);
/* Send as much of the queue as the socket takes now. 0 or -errno (connection lost). */
int conn_flush(struct agent_conn *c);

/* Chunks: conn_chunk_frame() has room for cap payload bytes (its header says cap). NULL: no memory. */
struct agent_chunk *conn_chunk_frame(uint16_t type, uint32_t cap);
/* A chunk with AGENT_XFER_CHUNK bytes of payload room, from a small pool of touched pages. */
struct agent_chunk *conn_chunk_xfer(uint16_t type);
/* Rewrite ch's frame header for a payload of len bytes (len <= its room). */
void conn_chunk_header(struct agent_chunk *ch, uint16_t type, uint32_t len);
void conn_chunk_free(struct agent_chunk *ch);
void conn_enqueue(struct agent_conn *c, struct agent_chunk *ch);
/* Queue one frame with a copy of data. 0 or -ENOMEM. */
int conn_frame(struct agent_conn *c, uint16_t type, const void *data, uint32_t len);

/*
 * Queue an ERROR frame (err: the errno the message is about, or 0 for a protocol error), end
 * any transfer, and close the connection once it is sent (AGENT_C_CLOSING). 0 or -ENOMEM.
 */
int conn_fail_code(struct agent_conn *c, int err, enum smolvm_error_code code, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
/* conn_fail_code() about the request as a whole. */
#define conn_fail(c, err, ...) conn_fail_code(c, err, SMOLVM_ERRC_REQUEST, __VA_ARGS__)
/* Queue EXIT with exit code 0 (SETUP, PUT and GET done) and close once it is sent. 0 or -ENOMEM. */
int conn_done(struct agent_conn *c);

/* One read from the host: bytes read (> 0), 0 if none are there now, -ECONNRESET at EOF, or -errno. */
ssize_t conn_read(struct agent_conn *c, void *buf, size_t len);
/* --unix mode: read the "CONNECT <port>\n" line and queue "OK <port>\n"; then AGENT_C_HEADER. */
int conn_handshake(struct agent_conn *c);
/*
 * AGENT_C_HEADER/PAYLOAD: read the request frame and check its header. Returns 1 once the whole
 * frame is in c->hdr and c->payload (state AGENT_C_PAYLOAD), else a handler's value.
 */
int conn_read_request(struct agent_conn *c);
/* A state in which the host sends nothing: EOF or an error means it gave up; stray bytes are dropped. */
int conn_read_idle(struct agent_conn *c);
/* FORWARD request: connect to the guest's 127.0.0.1:port and relay (AGENT_C_RELAY). */
int conn_forward(struct agent_conn *c);

/* ---- exec.c ---- */

/* An EXEC or PTY request, checked. The strings point into the connection's payload. */
struct exec_req {
	const char *cmd, *cwd;
	const char **envp; /* the base environment with the request's entries over it; NULL-terminated, malloc'd */
	bool stdin_on;
	uint32_t timeout_ms;
};

/*
 * The strings of an EXEC or PTY payload from byte off (command, cwd, n_env KEY=VALUE entries
 * over the base environment, whose TERM is term if not NULL) into req, and the cwd checked;
 * what names the frame in messages. The caller frees req->envp. 0, or ERROR queued, or -ENOMEM.
 */
int exec_parse_strings(struct agent_conn *c, const char *what, uint32_t off, uint32_t n_env, const char *term,
		       struct exec_req *req);

/* EXEC request: check the payload (else ERROR) and spawn `/bin/sh -c` (AGENT_C_RUNNING). */
int exec_start(struct agent *a, struct agent_conn *c);
/* One read from an output pipe w into a queued frame. Bytes read, 0 at EOF (w closed), -EAGAIN or -errno. */
int exec_pipe_read(struct agent *a, struct agent_conn *c, struct agent_watch *w);
/* The shell was reaped with status: take what is in the pipes now and queue EXIT. */
int exec_exited(struct agent *a, struct agent_conn *c, int status);
/* SMOLVM_EXEC_STDIN: read STDIN frames and feed them to the command (socket readable). */
int exec_read_stdin(struct agent *a, struct agent_conn *c);
/* The command's stdin can take more (pipe writable). */
void exec_stdin_event(struct agent *a, struct agent_conn *c);
/* A whole STDIN frame waits for the command to read it: read nothing more from the host until it does. */
bool exec_stdin_full(const struct agent_conn *c);

/* ---- pty.c ---- */

/* PTY request: check it, open a pty, start the command as a session leader on it, answer READY (AGENT_C_RUNNING). */
int pty_start(struct agent *a, struct agent_conn *c);
/* A whole RESIZE payload: set the terminal's size. 0, or -EINVAL for a size out of range. */
int pty_resize(struct agent_conn *c, const uint8_t *payload);
/* SIGKILL every process of session sid (the PTY's, when its connection closes). */
void pty_kill_session(pid_t sid);

/* ---- files.c ---- */

/* PUT request: make the temporary file beside the path and answer READY (AGENT_C_PUT). */
int files_put_start(struct agent_conn *c);
/* AGENT_C_PUT, socket readable: DATA frames into the file (a bounded number of reads); EXIT at the end. */
int files_put_read(struct agent_conn *c);
/* GET request: open the file and answer READY with its size and mode (AGENT_C_GET). */
int files_get_start(struct agent_conn *c);
/* AGENT_C_GET: queue the next DATA chunk when less than one is queued; EXIT after the last. */
int files_get_fill(struct agent_conn *c);
/* Close the transfer's file and remove a temporary file that was not renamed into place. */
void files_drop(struct agent_conn *c);

/* ---- setup.c ---- */

/* SETUP request: entropy, clock, hostname, network; with SMOLVM_SETUP_ROOT the overlay root (AGENT_C_ROOT_WAIT). */
int setup_start(struct agent *a, struct agent_conn *c);
/* a->root_conn, at c->poll_at_ms: switch the root once the scratch disk has its size, or time out. */
int setup_root_poll(struct agent *a, struct agent_conn *c);

#endif
