/* virtio-net device (id 1): guest Ethernet frames <-> a stream socket of 4-byte big-endian length-prefixed frames (passt, QEMU's -netdev stream). */
#ifndef SMOLVM_VIRTIO_NET_H
#define SMOLVM_VIRTIO_NET_H

#include <stdint.h>

#include "resolver.h"

struct vm;
struct net;
struct netf;

#define NET_QUEUE_MAX 256u
#define NET_MTU 65520u                /* passt's default MTU; offered with VIRTIO_NET_F_MTU */
#define NET_MAX_FRAME (NET_MTU + 14u) /* Ethernet header + MTU: longest frame either way */
#define NET_BUF (1u << 20)            /* bytes buffered per direction */
#define NET_INJ_BUF (64u << 10)       /* frames the VMM itself sends the guest (DNS answers, refusals) */

struct net_config {
	uint64_t base; /* MMIO window (VIRTIO_MMIO_SIZE bytes) */
	uint32_t gsi;
	uint8_t mac[6];
	int backend_fd; /* connected stream socket (the device owns it from here on), or -1: no backend */
	struct netf *filter; /* egress policy (the device owns it on success), or NULL: every frame passes */
	uint32_t dns_ip;     /* with a filter: the address (network order) whose UDP port 53 the VMM answers */
	resolver_confine_fn *confine; /* with a filter: run first thing on the resolver's thread (resolver.h); NULL: none */
	void *confine_arg;
};

/*
 * Create the device and register its transport (virtio_mmio_init). vm->loop
 * must be set; call before the vCPUs and evloop_run() start. Returns 0 or
 * -errno; on error the caller still owns backend_fd and filter.
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
 *
 * With a filter, every TX frame is judged by netf_check (net_filter.h) before
 * it is buffered: passing frames go on, rejected ones are answered with the
 * RST / ICMP unreachable netf_build_reject writes, queries to dns_ip:53 are
 * answered by the VMM (names outside the allow-list: NXDOMAIN; extra hosts
 * first, else getaddrinfo on the resolver thread, resolver.h). Those crafted
 * frames wait in their own buffer (NET_INJ_BUF; full: dropped) and reach the
 * guest before the backend's.
 */
int net_new(struct vm *vm, const struct net_config *cfg, struct net **out);

/* Undo net_new and close the backend. Only once no vCPU runs and on/without the loop. */
void net_free(struct net *n);

/* Counters for tests and the console log. Loop thread or after the loop stopped. */
struct net_stats {
	uint64_t tx_frames, rx_frames, tx_dropped, rx_dropped;
	uint64_t tx_filtered, dns_answered; /* frames the policy kept from the backend; DNS answers written */
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
