/* Host <-> guest-agent wire protocol, shared by csrc/ and guest/agent/. Versioned by SMOLVM_PROTO_MAGIC. */
#ifndef SMOLVM_PROTO_H
#define SMOLVM_PROTO_H

#include <stdint.h>

/*
 * Transport: one vsock stream connection per exec. The host reaches the guest
 * through the VMM's Unix socket by writing "CONNECT <port>\n" and reading
 * "OK <n>\n" (Firecracker's convention); after that the stream is the guest's.
 *
 * Every message is a frame: a little-endian header followed by `len` payload
 * bytes, len <= SMOLVM_MAX_PAYLOAD. A peer that receives a bad magic, an
 * unknown type or an oversized length closes the connection.
 */
#define SMOLVM_PROTO_MAGIC 0x31564d53u /* "SMV1": bump the digit on any change */
#define SMOLVM_AGENT_PORT 52u           /* agent listens here (guest side) */
#define SMOLVM_READY_PORT 53u           /* agent connects to host CID 2 here once listening */
#define SMOLVM_MAX_PAYLOAD (1u << 20)

enum smolvm_frame_type {
	SMOLVM_EXEC = 1,   /* host -> guest: struct smolvm_exec + strings */
	SMOLVM_STDOUT = 2, /* guest -> host: raw bytes */
	SMOLVM_STDERR = 3, /* guest -> host: raw bytes */
	SMOLVM_EXIT = 4,   /* guest -> host: struct smolvm_exit; last frame */
	SMOLVM_ERROR = 5,  /* guest -> host: UTF-8 message; last frame */
	SMOLVM_SETUP = 6,  /* host -> guest: struct smolvm_setup + data; answered by EXIT or ERROR */
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
 */
struct smolvm_exec {
	uint32_t timeout_ms; /* 0: no timeout */
	uint32_t n_env;
} __attribute__((packed));

/*
 * SETUP payload: this struct, then entropy_len random bytes (added to the
 * guest RNG and credited), then hostname_len bytes of hostname (no NUL).
 * Sent once after every boot or restore, before the first EXEC, so that
 * sandboxes restored from one snapshot differ. wall_ns 0 leaves the clock.
 */
#define SMOLVM_SETUP_MAX_ENTROPY 512u
#define SMOLVM_SETUP_MAX_HOSTNAME 64u

struct smolvm_setup {
	uint64_t wall_ns; /* CLOCK_REALTIME of the host, ns since the epoch */
	uint32_t entropy_len;
	uint32_t hostname_len;
} __attribute__((packed));

#define SMOLVM_EXIT_TIMED_OUT 1u

struct smolvm_exit {
	int32_t exit_code; /* shell convention: 128+N when killed by signal N; 124 on timeout */
	int32_t signal;    /* terminating signal or 0 */
	uint32_t flags;    /* SMOLVM_EXIT_* */
} __attribute__((packed));

#endif
