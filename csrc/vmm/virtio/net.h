/* virtio-net device (id 1): guest Ethernet frames <-> a stream socket of 4-byte big-endian length-prefixed frames (passt, QEMU's -netdev stream). */
#ifndef SMOLVM_VIRTIO_NET_H
#define SMOLVM_VIRTIO_NET_H

#include <stdint.h>

struct vm;
struct net;

#define NET_QUEUE_MAX 256u
#define NET_MTU 65520u                /* passt's default MTU; offered with VIRTIO_NET_F_MTU */
#define NET_MAX_FRAME (NET_MTU + 14u) /* Ethernet header + MTU: longest frame either way */
#define NET_BUF (1u << 20)            /* bytes buffered per direction */

struct net_config {
	uint64_t base; /* MMIO window (VIRTIO_MMIO_SIZE bytes) */
	uint32_t gsi;
	uint8_t mac[6];
	int backend_fd; /* connected stream socket (the device owns it from here on), or -1: no backend */
};

/*
 * Create the device and register its transport (virtio_mmio_init). vm->loop
 * must be set; call before the vCPUs and evloop_run() start. Returns 0 or
 * -errno; on error the caller still owns backend_fd.
 *
 * Running (loop thread, transport lock held): TX chains are checked (header
 * present, frame between 14 and NET_MAX_FRAME bytes, a partial checksum
 * inside the frame) and copied, length-prefixed, into a buffer the backend
 * drains; a bad chain is dropped (returned unused), a chain the queue rejects
 * marks the device DEVICE_NEEDS_RESET. Frames from the backend go to one RX
 * chain each, whole (too-small chains lose the frame); while the guest posts
 * no RX buffers the backend is not read, so it is pushed back on. A length
 * prefix over NET_MAX_FRAME, EOF or an error ends the backend: the guest's
 * link stays up but carries nothing. Never exits on any of this.
 */
int net_new(struct vm *vm, const struct net_config *cfg, struct net **out);

/* Undo net_new and close the backend. Only once no vCPU runs and on/without the loop. */
void net_free(struct net *n);

/* Counters for tests and the console log. Loop thread or after the loop stopped. */
struct net_stats {
	uint64_t tx_frames, rx_frames, tx_dropped, rx_dropped;
};
void net_get_stats(struct net *n, struct net_stats *st);

struct snap_writer;
struct snap_reader;

/* Append transport (SNAP_DEV_MMIO/index) and device (SNAP_DEV_NET/index) state. VM paused. Frames in the
 * buffers are not saved: a restored VM talks to a new backend (its TCP connections are gone). */
void net_save(struct net *n, struct snap_writer *w, uint32_t index);

/* After net_new() in a restoring VMM, before vCPUs run. Returns 0 or -EINVAL (missing, other MAC). */
int net_restore(struct net *n, const struct snap_reader *r, uint32_t index);

#endif
