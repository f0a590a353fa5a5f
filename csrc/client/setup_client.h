/* Host side of SETUP: the per-sandbox identity (clock, entropy, hostname, root and network flags) sent once after every boot or restore. */
#ifndef SMOLVM_SETUP_CLIENT_H
#define SMOLVM_SETUP_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#include "agent_conn.h"

struct setup_request {
	uint64_t wall_ns;        /* host CLOCK_REALTIME; 0 = leave the guest clock */
	const uint8_t *entropy;  /* credited to the guest RNG; <= SMOLVM_SETUP_MAX_ENTROPY */
	uint32_t entropy_len;
	const char *hostname;    /* NULL = leave it; <= SMOLVM_SETUP_MAX_HOSTNAME bytes */
	uint32_t flags;          /* SMOLVM_SETUP_* (proto.h), e.g. SMOLVM_SETUP_ROOT */
	const uint8_t *extra;    /* flag data appended after the hostname (SMOLVM_SETUP_NET's) */
	uint32_t extra_len;      /* <= SMOLVM_MAX_PAYLOAD / 2 */
};

/*
 * Send SETUP and wait for its EXIT (exit_code 0) or ERROR, on a connection
 * of its own. Connection, deadline and interrupted() as exec_run()
 * (exec_client.h). Returns 0, or -errno with a message in
 * error[0..error_size): -EINVAL (fields too long: nothing sent), -EPROTO
 * (an ERROR frame: *guest holds its err and code; or a bad frame), or the
 * connection's errors. guest may be NULL.
 */
int setup_run(const char *uds_path, uint32_t port, const struct setup_request *req, int host_timeout_ms,
	      int (*interrupted)(void *), void *opaque, char *error, size_t error_size, struct agent_error *guest);

#endif
