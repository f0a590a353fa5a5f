/* virtio-vsock device (id 19): guest stream sockets <-> host Unix-socket clients ("CONNECT <port>\n"). */
#ifndef SMOLVM_VIRTIO_VSOCK_H
#define SMOLVM_VIRTIO_VSOCK_H

#include <stdint.h>

struct vm;
struct vsock;

#define VSOCK_GUEST_CID 3u
#define VSOCK_MAX_CONNS 128u        /* host clients at once; more are closed on accept */
#define VSOCK_BUF_ALLOC (256u << 10) /* our receive window per connection */

struct vsock_config {
	uint64_t base; /* MMIO window (VIRTIO_MMIO_SIZE bytes) */
	uint32_t gsi;
	uint64_t guest_cid;   /* 0 = VSOCK_GUEST_CID */
	const char *uds_path; /* listening Unix socket; a stale file there is replaced */
	/*
	 * The guest connected to host port SMOLVM_READY_PORT (the agent is up);
	 * the connection itself is refused with RST. Runs on the loop thread with
	 * the device lock held: keep it short and do not call vsock_* from it.
	 */
	void (*on_ready)(void *opaque);
	void *opaque;
};

/*
 * Create the device: listening socket, work eventfd and transport (via
 * virtio_mmio_init, so vm_add_mmio). vm->loop must be set; call before the
 * vCPUs and evloop_run() start. Host clients connect to uds_path, write
 * "CONNECT <guest port>\n", get "OK <host port>\n" once the guest accepts
 * (or a close if it refuses), then the stream is the guest's. Returns 0 or
 * -errno.
 */
int vsock_new(struct vm *vm, const struct vsock_config *cfg, struct vsock **out);

/* Close every connection and the listening socket (unlinked). Only when no vCPU and no loop runs. */
void vsock_free(struct vsock *v);

/*
 * Send VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event queue and close every
 * host connection the guest knows of (clients see EOF; those still waiting
 * for their REQUEST to go out survive, as on a device reset); for snapshot
 * restore. Any thread; the closing happens on the loop thread. Returns 0,
 * -ENOTCONN if the driver is not live, -ENOBUFS if the guest posted no event
 * buffer (connections are dropped anyway).
 */
int vsock_reset_transport(struct vsock *v);

/*
 * Hand an already connected host socket (a TCP client the VMM accepted) to the
 * guest as a connection to guest_port, as if a client had sent "CONNECT": no
 * "OK" line is written to fd; the guest first receives the preface_len
 * (<= VSOCK_PREFACE_MAX) bytes of preface, then what fd sends. fd must be
 * non-blocking; the device owns it from here on, also on failure after
 * success is returned (closed when either side ends; a refusal closes it).
 * On an error the caller keeps fd. Host EOF half-closes (the guest may still
 * answer). Loop thread. Returns 0 or -errno (-EMFILE: VSOCK_MAX_CONNS busy).
 */
#define VSOCK_PREFACE_MAX 32u
int vsock_open(struct vsock *v, int fd, uint32_t guest_port, const void *preface, uint32_t preface_len);

struct snap_writer;
struct snap_reader;

/* Append the device's state (transport + vsock sections, index 0: the VMM makes vsock its first
 * virtio device, csrc/vmm/devices.h). VM paused, loop thread. */
void vsock_save(struct vsock *v, struct snap_writer *w);

/*
 * After vsock_new() in a restoring VMM, before vCPUs run: put the transport
 * and device state back. Host connections of the snapshot are not carried
 * over: call vsock_reset_transport() once the vCPUs run so the guest drops
 * them. Returns 0 or -EINVAL.
 */
int vsock_restore(struct vsock *v, const struct snap_reader *r);

#endif
