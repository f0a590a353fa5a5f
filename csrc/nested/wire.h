/* The nested profile's wire between smolvm-vmm-relay (host) and smolvm-hostd (host VM). */
#ifndef SMOLVM_NESTED_WIRE_H
#define SMOLVM_NESTED_WIRE_H

#include <stddef.h>
#include <stdint.h>

/*
 * Every TCP connection to smolvm-hostd opens with one line: "<token> <VERB>[ <arg>]\n",
 * the token being the hex secret in the host VM's token file. Verbs:
 *   PING           -> "PONG\n", then close.
 *   CONNECT <path> -> "OK\n" and the connection becomes a byte stream to the Unix socket
 *                     <path> inside the host VM, or "ERR <why>\n".
 *   TCP <port>     -> the same, to 127.0.0.1:<port> inside the host VM.
 *   SPAWN          -> "OK\n", then frames both ways (below) until the VMM has exited.
 * A SPAWN connection's first frame from the relay is WIRE_ARGV: NUL-terminated strings
 * run_dir, stderr_path, N (decimal, at most 8), N environment strings, argv[0], argv[1], ...
 * The hostd makes run_dir (mode 0700), starts argv with exactly that environment, its fd 3
 * on a socketpair and its stderr appended to stderr_path ("" = none),
 * answers WIRE_PID, relays fd 3 as WIRE_DATA/WIRE_EOF, and ends with WIRE_EXIT. If the
 * relay's connection ends first, the VMM is killed.
 */
#define WIRE_TOKEN_MAX 128
#define WIRE_LINE_MAX 4096
#define WIRE_FRAME_MAX (64 * 1024)
#define WIRE_BACKLOG 1024 /* listen(): every VM's exec connections pass one hostd */

enum wire_type {
	WIRE_ARGV = 1, /* relay -> hostd: see above */
	WIRE_DATA = 2, /* both ways: bytes of the VMM's fd 3 */
	WIRE_EOF = 3, /* both ways: that direction of fd 3 ended (shutdown(SHUT_WR)) */
	WIRE_PID = 4, /* hostd -> relay: u32 pid of the VMM in the host VM */
	WIRE_EXIT = 5, /* hostd -> relay: i32 wait status of the VMM */
	WIRE_KILL = 6, /* relay -> hostd: u32 signal to send to the VMM */
};

struct wire_hdr {
	uint32_t type;
	uint32_t len; /* bytes following, at most WIRE_FRAME_MAX */
};

/* Write or read exactly n bytes, retrying EINTR. 0, or -errno (-EPIPE on EOF while reading). */
int wire_write_all(int fd, const void *buf, size_t n);
int wire_read_all(int fd, void *buf, size_t n);

/* One frame. wire_recv fills *type and up to cap bytes of data, returns the length or -errno. */
int wire_send(int fd, uint32_t type, const void *data, uint32_t len);
int wire_recv(int fd, uint32_t *type, void *data, uint32_t cap);

/* Read one '\n'-terminated line (stripped) of at most cap-1 bytes. Length, or -errno. */
int wire_read_line(int fd, char *buf, size_t cap);

/* Copy bytes both ways between a and b, passing on half-closes, until both directions end. */
void wire_splice(int a, int b);

/* A TCP connection to, or a listening socket (backlog 64) on, "HOST:PORT" (numeric IPv4). fd, or -errno. */
int wire_tcp_connect(const char *endpoint);
int wire_tcp_listen(const char *endpoint);

/* The first line of a token file, stripped, into buf. 0, or -errno (-EINVAL if empty or too long). */
int wire_read_token(const char *path, char *buf, size_t cap);

#endif
