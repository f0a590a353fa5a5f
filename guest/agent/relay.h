/* Byte relay between two non-blocking stream sockets (the agent's side of a port forward). */
#ifndef SMOLVM_AGENT_RELAY_H
#define SMOLVM_AGENT_RELAY_H

#include <stdbool.h>
#include <stdint.h>

#define RELAY_BUF (32u << 10) /* per direction */

struct relay_dir {
	uint32_t len, off; /* buf[off..len) read from the source, not yet written */
	bool eof;          /* the source said EOF */
	bool shut;         /* shutdown(SHUT_WR) done on the destination */
	uint8_t *buf;
};

/* a <-> b. a is the vsock connection, b the guest TCP connection. */
struct relay {
	int a, b;
	bool connecting; /* b's non-blocking connect is in progress */
	struct relay_dir ab, ba;
};

/*
 * Start relaying: connect b to 127.0.0.1:port (non-blocking). a stays the
 * caller's. Returns 0 (connected or connecting) or -errno (ECONNREFUSED:
 * nothing listens on the port); on an error nothing is left open.
 */
int relay_start(struct relay *r, int a, uint16_t port);

/*
 * Move what can be moved without blocking, both ways, passing EOF on as
 * shutdown(SHUT_WR). Returns 1 once both directions are finished, 0 to go on,
 * -errno when a socket failed (the caller closes both).
 */
int relay_pump(struct relay *r);

/* The epoll masks (EPOLLIN/EPOLLOUT) each side needs now. */
void relay_events(const struct relay *r, uint32_t *ev_a, uint32_t *ev_b);

/* Close b and free the buffers (a is the caller's). */
void relay_end(struct relay *r);

#endif
