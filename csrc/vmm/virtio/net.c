/* virtio-net: checked TX chains and whole-frame RX chains over a length-prefixed frame stream (passt). */
#define _GNU_SOURCE
#include "virtio/net.h"

#include <arpa/inet.h>
#include <errno.h>
#include <poll.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <linux/virtio_ids.h>
#include <linux/virtio_net.h>

#include "dns.h"
#include "evloop.h"
#include "net_filter.h"
#include "resolver.h"
#include "snapshot.h"
#include "virtio/mmio.h"
#include "vm.h"

#define NET_HDR ((uint32_t)sizeof(struct virtio_net_hdr_v1))
#define NET_ETH_HLEN 14u
#define NET_BATCH 256u /* frames per direction per callback, so one VM cannot hog the loop */

_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "virtio-net fields are little-endian");
_Static_assert(sizeof(struct virtio_net_hdr_v1) == 12, "virtio_net_hdr_v1 is 12 bytes");
_Static_assert(NET_BUF >= 4 * (NET_MAX_FRAME + 4), "buffers hold several frames");

enum { NET_RXQ, NET_TXQ, NET_NR_QUEUES };

/* A DNS query handed to the resolver thread: what its answer needs. */
struct net_dns_pending {
	bool used;
	uint32_t gen;
	uint8_t eth[12]; /* the query's MAC addresses */
	struct netf_pkt pkt;
	struct dns_query q;
};

struct net {
	struct virtio_mmio mmio; /* its lock guards everything below */
	struct vm *vm;
	int fd;      /* backend; -1 = none or ended */
	int work_fd; /* eventfd: vCPU-thread ops ask the loop to look again */
	bool fd_watched, work_watched;
	uint32_t mask; /* events asked of the loop for fd */
	struct virtio_net_config config;
	bool rx_wait;  /* a whole frame waits for an RX buffer: do not read the backend */
	bool restored; /* interrupt the guest once the loop runs */
	bool pushed_rx, pushed_tx;
	uint8_t *rx; /* rx[rx_off..rx_len): bytes from the backend not yet given to the guest */
	uint32_t rx_off, rx_len;
	uint8_t *tx; /* tx[tx_off..tx_len): length-prefixed frames not yet written to the backend */
	uint32_t tx_off, tx_len;
	struct net_stats st;
	struct virtq_chain chain;
	struct netf *filter; /* NULL: no policy */
	uint32_t dns_ip;
	struct resolver *res;
	bool res_watched;
	uint32_t dns_gen;
	struct net_dns_pending pending[RESOLVER_QUEUE];
	uint8_t *inj; /* inj[inj_off..inj_len): length-prefixed frames the VMM wrote for the guest */
	uint32_t inj_off, inj_len;
};

static void net_poke(struct net *n)
{
	uint64_t one = 1;

	if (write(n->work_fd, &one, sizeof(one)) < 0) {
		/* saturated: a wake-up is pending anyway */
	}
}

/* The backend is gone or broke the framing: stop using it (the guest's link stays, silent). */
static void net_backend_end(struct net *n, const char *why)
{
	if (n->fd < 0)
		return;
	if (n->vm->console_fd >= 0)
		dprintf(n->vm->console_fd, "smolvm-vmm: net backend ended: %s\n", why);
	if (n->fd_watched)
		evloop_del(n->vm->loop, n->fd);
	n->fd_watched = false;
	close(n->fd);
	n->fd = -1;
	n->rx_off = n->rx_len = n->tx_off = n->tx_len = 0;
}

/* Loop thread: ask for POLLIN while frames may be delivered, POLLOUT while frames wait to be sent. */
static void net_set_mask(struct net *n)
{
	uint32_t want = 0;

	if (n->fd < 0)
		return;
	if (!n->rx_wait && n->rx_len < NET_BUF && virtio_mmio_live(&n->mmio))
		want |= POLLIN; /* not before the driver is live: the activation's poke re-arms it */
	if (n->tx_off < n->tx_len)
		want |= POLLOUT;
	if (want != n->mask && evloop_mod(n->vm->loop, n->fd, want) == 0)
		n->mask = want;
}

/* ---- guest -> backend ---- */

/* The Internet checksum of p[0..len) (RFC 1071), folded, not complemented. */
static uint16_t net_csum(const uint8_t *p, uint32_t len, uint32_t sum)
{
	uint32_t i;

	for (i = 0; i + 1 < len; i += 2)
		sum += (uint32_t)p[i] << 8 | p[i + 1];
	if (len & 1)
		sum += (uint32_t)p[len - 1] << 8;
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)sum;
}

/*
 * VIRTIO_NET_HDR_F_NEEDS_CSUM: the guest left the checksum to us. The
 * pseudo-header sum is already in the checksum field, so the sum over
 * frame[start..] completed and inverted is the checksum. False if the
 * offsets point outside the frame.
 */
static bool net_fill_csum(uint8_t *frame, uint32_t len, const struct virtio_net_hdr_v1 *h)
{
	uint32_t start = h->csum_start, off = h->csum_offset;
	uint16_t c;

	if (start >= len || off > len - start || 2 > len - start - off)
		return false;
	c = (uint16_t)~net_csum(frame + start, len - start, 0);
	frame[start + off] = (uint8_t)(c >> 8);
	frame[start + off + 1] = (uint8_t)c;
	return true;
}

/* Write out what the backend takes now. */
static void net_flush(struct net *n)
{
	while (n->fd >= 0 && n->tx_off < n->tx_len) {
		ssize_t w = send(n->fd, n->tx + n->tx_off, n->tx_len - n->tx_off, MSG_NOSIGNAL | MSG_DONTWAIT);

		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			break;
		if (w <= 0) {
			net_backend_end(n, w < 0 ? strerror(errno) : "write returned 0");
			return;
		}
		n->tx_off += (uint32_t)w;
	}
	if (n->tx_off == n->tx_len)
		n->tx_off = n->tx_len = 0;
}

/* ---- the egress policy ---- */

static uint64_t net_now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec;
}

/* Room for one crafted frame of up to NETF_MAX_REPLY bytes (its length prefix first), or NULL. */
static uint8_t *net_inj_slot(struct net *n)
{
	if (NET_INJ_BUF - n->inj_len < NETF_MAX_REPLY + 4 && n->inj_off) {
		memmove(n->inj, n->inj + n->inj_off, n->inj_len - n->inj_off);
		n->inj_len -= n->inj_off;
		n->inj_off = 0;
	}
	if (NET_INJ_BUF - n->inj_len < NETF_MAX_REPLY + 4)
		return NULL;
	return n->inj + n->inj_len;
}

static void net_inj_commit(struct net *n, uint32_t len)
{
	uint32_t be = htonl(len);

	if (len == 0 || len > NETF_MAX_REPLY)
		return;
	memcpy(n->inj + n->inj_len, &be, 4);
	n->inj_len += 4 + len;
}

static void net_dns_reply(struct net *n, const uint8_t *eth, const struct netf_pkt *p, const struct dns_query *q,
			  int rcode, const uint32_t *addrs, unsigned na)
{
	uint8_t msg[DNS_MAX_REPLY];
	uint32_t ml = dns_build_answer(q, rcode, addrs, na, NETF_TTL_S, msg, sizeof(msg));
	uint8_t *slot = net_inj_slot(n);

	if (!slot || !ml) {
		n->st.rx_dropped++;
		return;
	}
	net_inj_commit(n, netf_build_udp_reply(eth, p, msg, ml, slot + 4, NETF_MAX_REPLY));
	n->st.dns_answered++;
}

/* A guest query to dns_ip:53: answered now, or once the resolver thread has the addresses. */
static void net_dns_query(struct net *n, const uint8_t *frame, const struct netf_pkt *p)
{
	struct dns_query q;
	uint32_t ip;

	if (dns_parse_query(frame + p->l4 + 8, p->l4_len - 8, &q))
		return; /* not a query worth an answer */
	if (!q.name_ok || !netf_name_allowed(n->filter, q.name)) {
		net_dns_reply(n, frame, p, &q, DNS_NXDOMAIN, NULL, 0);
		return;
	}
	if (q.qclass != DNS_CLASS_IN || q.qtype != DNS_TYPE_A) {
		net_dns_reply(n, frame, p, &q, DNS_NOERROR, NULL, 0); /* no data: the guest speaks IPv4 only */
		return;
	}
	if (netf_host_lookup(n->filter, q.name, &ip)) {
		netf_learn(n->filter, ip, net_now_s());
		net_dns_reply(n, frame, p, &q, DNS_NOERROR, &ip, 1);
		return;
	}
	for (unsigned i = 0; i < RESOLVER_QUEUE; i++) {
		struct net_dns_pending *d = &n->pending[i];

		if (d->used)
			continue;
		d->gen = ++n->dns_gen;
		if (n->res && resolver_submit(n->res, q.name, (uint64_t)d->gen << 8 | i) == 0) {
			d->used = true;
			memcpy(d->eth, frame, sizeof(d->eth));
			d->pkt = *p;
			d->q = q;
			return;
		}
		break;
	}
	net_dns_reply(n, frame, p, &q, DNS_SERVFAIL, NULL, 0); /* too many lookups at once: the guest retries */
}

/* Loop thread, lock held: answers from the resolver thread. */
static void net_dns_results(struct net *n)
{
	struct resolver_result r;

	while (resolver_take(n->res, &r)) {
		unsigned i = (unsigned)(r.cookie & 0xff);
		struct net_dns_pending *d = i < RESOLVER_QUEUE ? &n->pending[i] : NULL;
		uint64_t now = net_now_s();

		if (!d || !d->used || d->gen != (uint32_t)(r.cookie >> 8))
			continue;
		d->used = false;
		for (unsigned k = 0; k < r.n && r.rcode == DNS_NOERROR; k++)
			netf_learn(n->filter, r.addrs[k], now);
		net_dns_reply(n, d->eth, &d->pkt, &d->q, r.rcode, r.addrs, r.rcode == DNS_NOERROR ? r.n : 0);
	}
}

/* The policy's verdict on a guest frame; false: it does not go to the backend. */
static bool net_filter_tx(struct net *n, const uint8_t *frame, uint32_t len)
{
	struct netf_pkt p;
	uint8_t *slot;

	if (netf_parse(frame, len, &p))
		return false;
	switch (netf_check(n->filter, frame, len, &p, n->dns_ip, net_now_s())) {
	case NETF_PASS: return true;
	case NETF_DNS: net_dns_query(n, frame, &p); return false;
	case NETF_REJECT:
		slot = net_inj_slot(n);
		if (slot)
			net_inj_commit(n, netf_build_reject(frame, len, &p, slot + 4, NETF_MAX_REPLY));
		return false;
	case NETF_DROP: break;
	}
	return false;
}

/* One TX chain: append its frame to the buffer (room for NET_MAX_FRAME + 4 was made), or drop it. */
static void net_tx_chain(struct net *n, const struct virtq_chain *c)
{
	struct virtio_net_hdr_v1 h;
	uint64_t len64 = c->read_len >= NET_HDR ? c->read_len - NET_HDR : 0;
	uint32_t len = (uint32_t)(len64 > NET_MAX_FRAME ? 0 : len64), be;
	uint8_t *frame;

	if (c->read_len < NET_HDR || len64 > NET_MAX_FRAME || len < NET_ETH_HLEN || n->fd < 0 ||
	    virtq_chain_from(c, 0, &h, NET_HDR) != NET_HDR) {
		n->st.tx_dropped++;
		return;
	}
	frame = n->tx + n->tx_len + 4;
	if (virtq_chain_from(c, NET_HDR, frame, len) != len ||
	    ((h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) && !net_fill_csum(frame, len, &h)) ||
	    h.gso_type != VIRTIO_NET_HDR_GSO_NONE) {
		n->st.tx_dropped++;
		return;
	}
	if (n->filter && !net_filter_tx(n, frame, len)) {
		n->st.tx_filtered++;
		return;
	}
	be = htonl(len);
	memcpy(n->tx + n->tx_len, &be, 4);
	n->tx_len += 4 + len;
	n->st.tx_frames++;
}

static void net_tx_process(struct net *n)
{
	struct virtq *q = virtio_mmio_queue(&n->mmio, NET_TXQ);
	unsigned done;

	for (done = 0; done < NET_BATCH && virtio_mmio_live(&n->mmio); done++) {
		int r;

		if (NET_BUF - n->tx_len < NET_MAX_FRAME + 4) {
			if (n->tx_off) {
				memmove(n->tx, n->tx + n->tx_off, n->tx_len - n->tx_off);
				n->tx_len -= n->tx_off;
				n->tx_off = 0;
			}
			if (NET_BUF - n->tx_len < NET_MAX_FRAME + 4) {
				net_flush(n);
				if (n->tx_len && NET_BUF - n->tx_len < NET_MAX_FRAME + 4)
					return; /* the backend is slow: POLLOUT resumes TX */
			}
		}
		r = virtq_pop(q, &n->chain);
		if (r == 0)
			break;
		if (r < 0) {
			virtio_mmio_fail(&n->mmio);
			return;
		}
		net_tx_chain(n, &n->chain);
		if (virtq_push(q, n->chain.head, 0) < 0) {
			virtio_mmio_fail(&n->mmio);
			return;
		}
		n->pushed_tx = true;
	}
	net_flush(n);
	if (done == NET_BATCH)
		net_poke(n); /* more may wait: come back after the other watches had their turn */
}

/* ---- backend -> guest ---- */

/* Hand complete frames in the buffer to RX chains. */
static void net_rx_deliver(struct net *n)
{
	struct virtq *q = virtio_mmio_queue(&n->mmio, NET_RXQ);
	unsigned done;

	for (done = 0; done < NET_BATCH && virtio_mmio_live(&n->mmio) && n->fd >= 0; done++) {
		struct virtio_net_hdr_v1 h = { .num_buffers = 1 };
		uint32_t be, len;
		int r;

		if (n->rx_len - n->rx_off < 4)
			break;
		memcpy(&be, n->rx + n->rx_off, 4);
		len = ntohl(be);
		if (len > NET_MAX_FRAME) {
			net_backend_end(n, "frame length over the limit");
			return;
		}
		if (n->rx_len - n->rx_off - 4 < len)
			break; /* the rest of the frame is still to come */
		r = virtq_pop(q, &n->chain);
		if (r < 0) {
			virtio_mmio_fail(&n->mmio);
			return;
		}
		if (r == 0) {
			n->rx_wait = true; /* the guest's kick resumes us */
			return;
		}
		if (n->chain.write_len < (uint64_t)NET_HDR + len || len < NET_ETH_HLEN) {
			virtq_unpop(q); /* keep the buffer for the next frame; this one is lost */
			n->st.rx_dropped++;
		} else {
			if (n->mmio.drv_features & (1ull << VIRTIO_NET_F_GUEST_CSUM))
				h.flags = VIRTIO_NET_HDR_F_DATA_VALID; /* passt's checksums are right */
			virtq_chain_to(&n->chain, 0, &h, NET_HDR);
			virtq_chain_to(&n->chain, NET_HDR, n->rx + n->rx_off + 4, len);
			if (virtq_push(q, n->chain.head, NET_HDR + len) < 0) {
				virtio_mmio_fail(&n->mmio);
				return;
			}
			n->pushed_rx = true;
			n->st.rx_frames++;
		}
		n->rx_off += 4 + len;
	}
	if (n->rx_off == n->rx_len)
		n->rx_off = n->rx_len = 0;
}

/* Hand the VMM's own frames (DNS answers, refusals) to RX chains. */
static void net_inj_deliver(struct net *n)
{
	struct virtq *q = virtio_mmio_queue(&n->mmio, NET_RXQ);

	while (n->inj_off < n->inj_len && virtio_mmio_live(&n->mmio)) {
		struct virtio_net_hdr_v1 h = { .num_buffers = 1 };
		uint32_t be, len;
		int r;

		memcpy(&be, n->inj + n->inj_off, 4);
		len = ntohl(be);
		r = virtq_pop(q, &n->chain);
		if (r < 0) {
			virtio_mmio_fail(&n->mmio);
			return;
		}
		if (r == 0) {
			n->rx_wait = true;
			return;
		}
		if (n->chain.write_len < (uint64_t)NET_HDR + len) {
			virtq_unpop(q);
			n->st.rx_dropped++;
		} else {
			if (n->mmio.drv_features & (1ull << VIRTIO_NET_F_GUEST_CSUM))
				h.flags = VIRTIO_NET_HDR_F_DATA_VALID; /* net_filter.c's checksums are right */
			virtq_chain_to(&n->chain, 0, &h, NET_HDR);
			virtq_chain_to(&n->chain, NET_HDR, n->inj + n->inj_off + 4, len);
			if (virtq_push(q, n->chain.head, NET_HDR + len) < 0) {
				virtio_mmio_fail(&n->mmio);
				return;
			}
			n->pushed_rx = true;
			n->st.rx_frames++;
		}
		n->inj_off += 4 + len;
	}
	if (n->inj_off == n->inj_len)
		n->inj_off = n->inj_len = 0;
}

/* Read from the backend and deliver, while there is room and the guest takes frames. */
static void net_rx_process(struct net *n)
{
	unsigned rounds;

	net_inj_deliver(n);
	if (n->rx_wait)
		return;
	for (rounds = 0; rounds < 8 && n->fd >= 0; rounds++) {
		ssize_t r;

		net_rx_deliver(n);
		if (n->rx_wait || n->fd < 0 || !virtio_mmio_live(&n->mmio))
			return;
		if (n->rx_off) {
			memmove(n->rx, n->rx + n->rx_off, n->rx_len - n->rx_off);
			n->rx_len -= n->rx_off;
			n->rx_off = 0;
		}
		r = recv(n->fd, n->rx + n->rx_len, NET_BUF - n->rx_len, MSG_DONTWAIT);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return;
		if (r <= 0) {
			net_backend_end(n, r < 0 ? strerror(errno) : "EOF");
			return;
		}
		n->rx_len += (uint32_t)r;
	}
}

/* Interrupt the guest once for what was pushed, if it wants it. */
static void net_irq(struct net *n)
{
	bool irq = false;

	if (n->restored)
		n->pushed_rx = n->pushed_tx = true;
	n->restored = false;
	if (n->pushed_rx && virtq_want_irq(virtio_mmio_queue(&n->mmio, NET_RXQ)))
		irq = true;
	if (n->pushed_tx && virtq_want_irq(virtio_mmio_queue(&n->mmio, NET_TXQ)))
		irq = true;
	n->pushed_rx = n->pushed_tx = false;
	if (irq && virtio_mmio_live(&n->mmio))
		virtio_mmio_signal(&n->mmio);
}

/* Loop thread, lock held: everything that may be due. */
static void net_run(struct net *n)
{
	if (virtio_mmio_live(&n->mmio)) {
		net_tx_process(n);
		net_rx_process(n);
		net_irq(n);
	}
	net_set_mask(n);
}

static void net_backend_cb(void *opaque, int fd, uint32_t revents)
{
	struct net *n = opaque;

	(void)fd;
	(void)revents;
	virtio_mmio_lock(&n->mmio);
	net_run(n);
	virtio_mmio_unlock(&n->mmio);
}

static void net_dns_cb(void *opaque, int fd, uint32_t revents)
{
	struct net *n = opaque;

	(void)fd;
	(void)revents;
	virtio_mmio_lock(&n->mmio);
	net_dns_results(n);
	n->rx_wait = false; /* look for RX buffers again: answers wait */
	net_run(n);
	virtio_mmio_unlock(&n->mmio);
}

static void net_work_cb(void *opaque, int fd, uint32_t revents)
{
	struct net *n = opaque;
	uint64_t cnt;

	(void)revents;
	if (read(fd, &cnt, sizeof(cnt)) < 0) {
		/* spurious */
	}
	virtio_mmio_lock(&n->mmio);
	n->rx_wait = false;
	net_run(n);
	virtio_mmio_unlock(&n->mmio);
}

/* ---- transport ops (lock held) ---- */

static void net_config_read(void *dev, uint32_t off, void *data, uint32_t len)
{
	struct net *n = dev;

	memcpy(data, (uint8_t *)&n->config + off, len);
}

static void net_queue_notify(void *dev, unsigned q)
{
	struct net *n = dev;

	if (q == NET_RXQ)
		n->rx_wait = false; /* new buffers */
	net_run(n);
}

static void net_activate(void *dev)
{
	net_poke(dev); /* vCPU thread: the loop looks at the backend */
}

static void net_reset(void *dev)
{
	struct net *n = dev;

	/* vCPU thread: frames buffered either way wait for the driver's next start (framing is kept) */
	n->pushed_rx = n->pushed_tx = false;
	n->rx_wait = true;
	net_poke(n);
}

static const struct virtio_dev_ops net_ops = {
	.device_id = VIRTIO_ID_NET,
	.features = (1ull << VIRTIO_NET_F_MAC) | (1ull << VIRTIO_NET_F_MTU) | (1ull << VIRTIO_NET_F_CSUM) |
		    (1ull << VIRTIO_NET_F_GUEST_CSUM),
	.nr_queues = NET_NR_QUEUES,
	.queue_max = NET_QUEUE_MAX,
	.config_size = offsetof(struct virtio_net_config, mtu) + sizeof(uint16_t),
	.config_read = net_config_read,
	.queue_notify = net_queue_notify,
	.activate = net_activate,
	.reset = net_reset,
};

/* ---- lifetime ---- */

int net_new(struct vm *vm, const struct net_config *cfg, struct net **out)
{
	struct net *n;
	int err;

	*out = NULL;
	if (!vm->loop)
		return -EINVAL;
	n = calloc(1, sizeof(*n));
	if (!n)
		return -ENOMEM;
	n->vm = vm;
	n->fd = -1;
	n->work_fd = -1;
	memcpy(n->config.mac, cfg->mac, sizeof(n->config.mac));
	n->config.mtu = NET_MTU;
	n->rx = malloc(NET_BUF);
	n->tx = malloc(NET_BUF);
	n->inj = malloc(NET_INJ_BUF);
	err = -ENOMEM;
	if (!n->rx || !n->tx || !n->inj)
		goto fail;
	if (cfg->filter) {
		err = resolver_new(&n->res, cfg->confine, cfg->confine_arg);
		if (err)
			goto fail;
		err = evloop_add(vm->loop, resolver_fd(n->res), POLLIN, net_dns_cb, n);
		if (err)
			goto fail;
		n->res_watched = true;
		n->filter = cfg->filter; /* ours from here on */
		n->dns_ip = cfg->dns_ip;
	}
	n->work_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (n->work_fd < 0) {
		err = -errno;
		goto fail;
	}
	err = evloop_add(vm->loop, n->work_fd, POLLIN, net_work_cb, n);
	if (err)
		goto fail;
	n->work_watched = true;
	if (cfg->backend_fd >= 0) {
		err = evloop_add(vm->loop, cfg->backend_fd, 0, net_backend_cb, n);
		if (err)
			goto fail;
		n->fd = cfg->backend_fd;
		n->fd_watched = true;
	}
	err = virtio_mmio_init(&n->mmio, vm, cfg->base, cfg->gsi, &net_ops, n);
	if (err) {
		if (n->fd_watched)
			evloop_del(vm->loop, n->fd);
		n->fd = -1; /* the caller keeps it */
		n->fd_watched = false;
		goto fail;
	}
	*out = n;
	return 0;
fail:
	n->filter = NULL; /* on error the caller keeps the filter */
	net_free(n);
	return err;
}

void net_free(struct net *n)
{
	if (!n)
		return;
	virtio_mmio_destroy(&n->mmio);
	if (n->fd >= 0) {
		if (n->fd_watched)
			evloop_del(n->vm->loop, n->fd);
		/* EOF for the backend now: a poll io_uring has not retired yet may keep the file open
		 * until the ring goes, and a jailed VMM cannot signal passt (it runs as nobody). */
		shutdown(n->fd, SHUT_RDWR);
		close(n->fd);
	}
	if (n->work_fd >= 0) {
		if (n->work_watched)
			evloop_del(n->vm->loop, n->work_fd);
		close(n->work_fd);
	}
	if (n->res) {
		if (n->res_watched)
			evloop_del(n->vm->loop, resolver_fd(n->res));
		resolver_free(n->res);
	}
	netf_free(n->filter);
	free(n->rx);
	free(n->tx);
	free(n->inj);
	free(n);
}

void net_get_stats(struct net *n, struct net_stats *st)
{
	*st = n->st;
}

struct net_snap {
	uint8_t mac[6];
	uint16_t mtu;
};

void net_save(struct net *n, struct snap_writer *w, uint32_t index)
{
	struct net_snap s;

	memcpy(s.mac, n->config.mac, sizeof(s.mac));
	s.mtu = n->config.mtu;
	virtio_mmio_lock(&n->mmio);
	virtio_mmio_save(&n->mmio, w, index);
	snap_put(w, SNAP_DEV_NET, index, &s, sizeof(s));
	virtio_mmio_unlock(&n->mmio);
}

int net_restore(struct net *n, const struct snap_reader *r, uint32_t index)
{
	const struct net_snap *s;
	uint32_t len = 0;
	int err;

	s = snap_get(r, SNAP_DEV_NET, index, &len);
	if (!s || len != sizeof(*s) || memcmp(s->mac, n->config.mac, sizeof(s->mac)) || s->mtu != n->config.mtu)
		return -EINVAL;
	virtio_mmio_lock(&n->mmio);
	err = virtio_mmio_restore(&n->mmio, r, index);
	if (!err) {
		n->restored = true;
		n->rx_wait = false;
		net_poke(n);
	}
	virtio_mmio_unlock(&n->mmio);
	return err;
}
