/* Host ports into the guest: TCP listeners on 127.0.0.1 whose connections go over vsock to the agent. */
#ifndef SMOLVM_PORTFWD_H
#define SMOLVM_PORTFWD_H

#include <stddef.h>
#include <stdint.h>

struct evloop;
struct vsock;
struct portfwd;

#define PORTFWD_MAX 64u /* forwards per VM */

/*
 * The forward table of one VM. Accepted connections become vsock connections
 * to the agent port (SMOLVM_AGENT_PORT) whose first bytes are a
 * SMOLVM_FORWARD frame naming the guest port (csrc/proto.h); the agent
 * connects to the guest's 127.0.0.1:port and relays. Live state only: not
 * part of snapshots. Loop thread for everything. Returns 0 or -errno.
 */
int portfwd_new(struct evloop *loop, struct vsock *vsock, struct portfwd **out);
/* Close every listener (connections already handed to the guest go on until they end). */
void portfwd_free(struct portfwd *p);

/*
 * Listen on 127.0.0.1:host_port (0: a free port the kernel picks) and forward
 * to guest_port. *bound gets the host port. -EADDRINUSE: the host port is
 * taken (by another program or forward); -EINVAL: a port out of 1..65535;
 * -ENOSPC: PORTFWD_MAX forwards exist.
 */
int portfwd_add(struct portfwd *p, uint32_t guest_port, uint32_t host_port, uint32_t *bound);
/* Close the listener on host_port. -ENOENT: no forward there. */
int portfwd_del(struct portfwd *p, uint32_t host_port);
/* "HOST:GUEST" pairs separated by spaces into buf (NUL-terminated; "" for none). Returns 0 or -ENOSPC. */
int portfwd_list(const struct portfwd *p, char *buf, size_t len);

/* One "FWD ..." control command (ADD guest host | DEL host | LIST): the answer after OK into reply. */
int portfwd_command(struct portfwd *p, const char *args, char *reply, size_t len);

#endif
