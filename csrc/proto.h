/* Host <-> guest-agent wire protocol, shared by csrc/ and guest/agent/. Versioned by SMOLVM_PROTO_MAGIC. */
#ifndef SMOLVM_PROTO_H
#define SMOLVM_PROTO_H

#include <stdint.h>

/*
 * Transport: one vsock stream connection per request (EXEC, PTY, SETUP,
 * PUT or GET). The host reaches the guest through the VMM's Unix socket by writing
 * "CONNECT <port>\n" and reading "OK <n>\n" (Firecracker's convention);
 * after that the stream is the guest's.
 *
 * Every message is a frame: a little-endian header followed by `len` payload
 * bytes, len <= SMOLVM_MAX_PAYLOAD. A peer that receives a bad magic, an
 * unknown type or an oversized length closes the connection.
 */
#define SMOLVM_PROTO_MAGIC 0x34564d53u /* "SMV4": bump the digit on any change */
#define SMOLVM_AGENT_PORT 52u           /* agent listens here (guest side) */
#define SMOLVM_READY_PORT 53u           /* agent connects to host CID 2 here once listening */
#define SMOLVM_MAX_PAYLOAD (1u << 20)

enum smolvm_frame_type {
	SMOLVM_EXEC = 1,   /* host -> guest: struct smolvm_exec + strings */
	SMOLVM_STDOUT = 2, /* guest -> host: raw bytes */
	SMOLVM_STDERR = 3, /* guest -> host: raw bytes */
	SMOLVM_EXIT = 4,   /* guest -> host: struct smolvm_exit; last frame */
	SMOLVM_ERROR = 5,  /* guest -> host: struct smolvm_error + UTF-8 message; last frame */
	SMOLVM_SETUP = 6,  /* host -> guest: struct smolvm_setup + data; answered by EXIT or ERROR */
	SMOLVM_PUT = 7,    /* host -> guest: struct smolvm_put + NUL-terminated absolute path; see "Files" */
	SMOLVM_READY = 8,  /* guest -> host: PUT accepted (empty) / GET accepted (struct smolvm_file) / PTY started (struct smolvm_pty_ready) */
	SMOLVM_DATA = 9,   /* either way: raw file bytes */
	SMOLVM_GET = 10,   /* host -> guest: NUL-terminated absolute path */
	SMOLVM_STDIN = 11, /* host -> guest: bytes for the command's stdin (EXEC with SMOLVM_EXEC_STDIN); empty = end of input */
	SMOLVM_PTY = 12,   /* host -> guest: struct smolvm_pty + strings; see "PTY" */
	SMOLVM_RESIZE = 13, /* host -> guest: struct smolvm_winsize (PTY only) */
	SMOLVM_FORWARD = 20, /* host -> guest: struct smolvm_forward; then raw TCP bytes both ways */
};

struct smolvm_frame {
	uint32_t magic;
	uint16_t type;
	uint16_t flags; /* 0 */
	uint32_t len;
} __attribute__((packed));

/*
 * EXEC payload: this struct, then NUL-terminated strings: the command (run as
 * `/bin/sh -c COMMAND`), the working directory ("" = "/"), then n_env
 * "KEY=VALUE" entries added to the agent's base environment.
 *
 * stdin is /dev/null unless flags has SMOLVM_EXEC_STDIN: then it is a pipe,
 * and after EXEC the host sends STDIN frames (any sizes) whose bytes the agent
 * writes to it in order, then one empty STDIN frame, on which the agent
 * closes the pipe. The agent stops reading the socket while the pipe is full
 * (the command does not read), so the host must keep reading output while it
 * sends input. Input left when the command exits or closes its stdin is read
 * and dropped. Any other frame after EXEC: ERROR (err 0). Unknown flag bits:
 * ERROR EINVAL.
 */
#define SMOLVM_EXEC_STDIN 1u

struct smolvm_exec {
	uint32_t timeout_ms; /* 0: no timeout */
	uint32_t n_env;
	uint32_t flags; /* SMOLVM_EXEC_* */
} __attribute__((packed));

/*
 * PTY: a command on a new pseudo-terminal, for interactive programs. The
 * payload is this struct, then the strings of EXEC (command run as
 * `/bin/sh -c COMMAND`, cwd, n_env entries; TERM=xterm-256color unless an
 * entry sets it). The agent opens a pty of rows x cols, starts the command
 * as the leader of a new session with the pty as its controlling terminal
 * and stdin/stdout/stderr, and answers READY (struct smolvm_pty_ready), or
 * ERROR (as EXEC: ERRC_CWD for the working directory; EINVAL for a size out
 * of 1..SMOLVM_PTY_MAX_DIM or unknown flags). Then the terminal's output
 * comes in STDOUT frames as it is produced (stdout and stderr are the same
 * terminal), and EXIT ends the connection when the command exits (what it
 * wrote before is sent first). The host sends STDIN frames (bytes typed on
 * the terminal, in order; empty ones are ignored: end of input on a
 * terminal is the byte ^D) and RESIZE frames (a new size, as TIOCSWINSZ:
 * the foreground job gets SIGWINCH) in any order. Any other frame: ERROR
 * (err 0). Closing the connection kills every process of the session.
 */
#define SMOLVM_PTY_MAX_DIM 4096u

struct smolvm_pty {
	uint32_t timeout_ms; /* 0: no timeout; then the session is killed and EXIT says 124 */
	uint32_t n_env;
	uint16_t rows, cols; /* 1..SMOLVM_PTY_MAX_DIM */
	uint32_t flags;      /* 0 */
} __attribute__((packed));

struct smolvm_winsize {
	uint16_t rows, cols; /* 1..SMOLVM_PTY_MAX_DIM; others: ERROR EINVAL */
	uint32_t reserved;   /* 0 */
} __attribute__((packed));

struct smolvm_pty_ready {
	int32_t pid;       /* the session leader (the shell) in the guest */
	uint32_t reserved; /* 0 */
} __attribute__((packed));

/*
 * SETUP payload: this struct, then entropy_len random bytes (added to the
 * guest RNG and credited), then hostname_len bytes of hostname (no NUL).
 * Sent once after every boot or restore, before the first EXEC, so that
 * sandboxes restored from one snapshot differ. wall_ns 0 leaves the clock.
 */
#define SMOLVM_SETUP_MAX_ENTROPY 512u
#define SMOLVM_SETUP_MAX_HOSTNAME 64u

/*
 * SMOLVM_SETUP_ROOT: make the root file system of later commands an overlay:
 * lower = the read-only image (/dev/vda, mounted at boot when the kernel
 * command line has smolvm.image=vda), upper = the ext4 scratch disk /dev/vdb
 * (made by the host; it may show up with 0 sectors until the VMM's
 * config-change interrupt after a restore gives its real size). The agent
 * waits for the size (up to 60 s, then ERROR ETIMEDOUT), mounts, and chroots
 * itself into the overlay; a failed step is an ERROR with its errno. Already
 * done (a VM restored from a snapshot taken after it): nothing happens.
 * Unknown flag bits: ERROR EINVAL.
 */
#define SMOLVM_SETUP_ROOT 1u

/*
 * SMOLVM_SETUP_NET: a struct smolvm_setup_net and its hosts_len bytes follow
 * the hostname. The agent gives eth0 the address, prefix and MTU, brings it
 * up, adds the default route via the gateway, and (after the root switch of
 * SETUP_ROOT, if any) writes /etc/resolv.conf (nameserver dns) and /etc/hosts
 * (localhost, the hostname, `host.smolvm.internal` = gateway, then the
 * hosts text: "ADDRESS NAME" lines). No eth0: ERROR ENODEV.
 */
#define SMOLVM_SETUP_NET (1u << 8)
#define SMOLVM_SETUP_MAX_HOSTS (16u << 10)

struct smolvm_setup_net {
	uint8_t addr[4], gateway[4], dns[4]; /* IPv4, network byte order */
	uint8_t prefix;                      /* 1..30 */
	uint8_t reserved;                    /* 0 */
	uint16_t mtu;                        /* 68..65535 */
	uint32_t hosts_len;                  /* <= SMOLVM_SETUP_MAX_HOSTS */
} __attribute__((packed));

struct smolvm_setup {
	uint64_t wall_ns; /* CLOCK_REALTIME of the host, ns since the epoch */
	uint32_t entropy_len;
	uint32_t hostname_len;
	uint32_t flags; /* SMOLVM_SETUP_* */
	uint32_t reserved; /* 0 */
} __attribute__((packed));

/*
 * Files. One connection per transfer; paths are absolute guest paths
 * (NUL-terminated, at most 4096 bytes with the NUL; relative: ERROR EINVAL).
 * PUT: host sends PUT; the agent creates a temporary file beside the path and
 * answers READY, or ERROR (e.g. ENOENT: no such folder, EISDIR: the path is a
 * folder). The host waits for READY before any DATA, then sends
 * exactly `size` bytes in DATA frames (none for an empty file); the agent sets
 * `mode`, renames the file into place and answers EXIT (exit_code 0), or
 * ERROR (e.g. ENOSPC) once all `size` bytes have arrived. A failed or cut PUT
 * leaves no file behind.
 * An existing file at the path is replaced (rename); a connection closed
 * before EXIT removes the temporary file.
 * GET: host sends GET; the agent answers READY with struct smolvm_file, or
 * ERROR (ENOENT, EISDIR, EINVAL: not a regular file, ...); then exactly
 * `size` bytes in DATA frames, then EXIT (exit_code 0), or ERROR (e.g. EIO:
 * the file shrank) after the DATA sent so far if it could not be read to the end.
 * A frame that breaks these rules gets ERROR with err 0.
 */
struct smolvm_put {
	uint64_t size;  /* bytes of DATA that follow READY */
	uint32_t mode;  /* permission bits (07777) of the new file */
	uint32_t flags; /* 0 */
} __attribute__((packed));

struct smolvm_file {
	uint64_t size;
	uint32_t mode; /* st_mode */
	uint32_t reserved;
} __attribute__((packed));

/*
 * Port forwards (the VMM's 127.0.0.1 listeners, csrc/vmm/portfwd.c). The VMM sends
 * FORWARD as the first frame of a connection; the agent connects to the
 * guest's 127.0.0.1:port and from then on the vsock stream carries that TCP
 * connection's bytes both ways, with half-closes passed on. Nothing is
 * answered: if the connect fails (nothing listens there) the agent closes the
 * connection, which the host client sees as an immediate close.
 */
struct smolvm_forward {
	uint32_t port;  /* guest TCP port, 1..65535 */
	uint32_t flags; /* 0 */
} __attribute__((packed));

/*
 * ERROR payload: this struct, then a UTF-8 message (no NUL) for people;
 * programs look at err and code only.
 */
enum smolvm_error_code {
	SMOLVM_ERRC_REQUEST = 0, /* the request as a whole (or a bad frame when err is 0) */
	SMOLVM_ERRC_CWD = 1,     /* EXEC: the working directory (err: ENOENT, ENOTDIR, EACCES...) */
};

struct smolvm_error {
	int32_t err;   /* Linux errno value the message is about, or 0 (a protocol error: bad frame) */
	uint32_t code; /* enum smolvm_error_code: which part of the request err is about */
} __attribute__((packed));

#define SMOLVM_EXIT_TIMED_OUT 1u

struct smolvm_exit {
	int32_t exit_code; /* shell convention: 128+N when killed by signal N; 124 on timeout */
	int32_t signal;    /* terminating signal or 0 */
	uint32_t flags;    /* SMOLVM_EXIT_* */
} __attribute__((packed));

#endif
