/* virtio-mmio version 2: the only place that decodes virtio registers; devices plug in an ops table. */
#define _GNU_SOURCE
#include "virtio/mmio.h"

#include "snapshot.h"

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <linux/kvm.h>
#include <linux/virtio_config.h>
#include <linux/virtio_mmio.h>

#include "evloop.h"
#include "vm.h"

#define VIRTIO_MMIO_MAGIC 0x74726976u  /* "virt" */
#define VIRTIO_MMIO_VENDOR 0x6c6f6d73u /* "smol" */

static uint64_t virtio_mmio_offered(const struct virtio_mmio *m)
{
	return m->ops->features | (1ull << VIRTIO_F_VERSION_1);
}

void virtio_mmio_lock(struct virtio_mmio *m)
{
	pthread_mutex_lock(&m->lock);
}

void virtio_mmio_unlock(struct virtio_mmio *m)
{
	pthread_mutex_unlock(&m->lock);
}

struct virtq *virtio_mmio_queue(struct virtio_mmio *m, unsigned q)
{
	return q < m->ops->nr_queues ? &m->vq[q] : NULL;
}

bool virtio_mmio_live(struct virtio_mmio *m)
{
	return (m->status & VIRTIO_CONFIG_S_DRIVER_OK) && !(m->status & VIRTIO_CONFIG_S_NEEDS_RESET);
}

/* Edge to the guest: irqfd if KVM took it, else a pulse on the irqchip line. */
static void virtio_mmio_raise(struct virtio_mmio *m)
{
	uint64_t one = 1;

	if (m->irq_fd >= 0 && write(m->irq_fd, &one, sizeof(one)) == sizeof(one))
		return;
	vm_irq_line(m->vm, m->gsi, 1);
	vm_irq_line(m->vm, m->gsi, 0);
}

void virtio_mmio_signal(struct virtio_mmio *m)
{
	m->int_status |= VIRTIO_MMIO_INT_VRING;
	virtio_mmio_raise(m);
}

void virtio_mmio_fail(struct virtio_mmio *m)
{
	if (m->status & VIRTIO_CONFIG_S_NEEDS_RESET)
		return;
	m->status |= VIRTIO_CONFIG_S_NEEDS_RESET;
	if (m->status & VIRTIO_CONFIG_S_DRIVER_OK) {
		m->int_status |= VIRTIO_MMIO_INT_CONFIG;
		virtio_mmio_raise(m);
	}
}

void virtio_mmio_config_changed(struct virtio_mmio *m)
{
	m->config_gen++;
	if (m->status & VIRTIO_CONFIG_S_DRIVER_OK) {
		m->int_status |= VIRTIO_MMIO_INT_CONFIG;
		virtio_mmio_raise(m);
	}
}

/* Deliver a kick for queue q; lock held. */
static void virtio_mmio_kick(struct virtio_mmio *m, unsigned q)
{
	if (!virtio_mmio_live(m) || !m->vq[q].ready || !m->ops->queue_notify)
		return;
	m->ops->queue_notify(m->dev, q);
}

/* Loop thread: KVM (or the vCPU fallback) signalled a queue's eventfd. */
static void virtio_mmio_notify_cb(void *opaque, int fd, uint32_t revents)
{
	struct virtio_mmio_notify *n = opaque;
	uint64_t cnt;

	(void)revents;
	if (read(fd, &cnt, sizeof(cnt)) != sizeof(cnt))
		return;
	virtio_mmio_lock(n->m);
	virtio_mmio_kick(n->m, n->q);
	virtio_mmio_unlock(n->m);
}

static void virtio_mmio_reset(struct virtio_mmio *m)
{
	unsigned q;

	m->status = 0;
	m->int_status = 0;
	m->dev_feat_sel = m->drv_feat_sel = m->queue_sel = 0;
	m->drv_features = 0;
	for (q = 0; q < VIRTIO_MMIO_MAX_QUEUES; q++)
		virtq_reset(&m->vq[q]);
	if (m->ops->reset)
		m->ops->reset(m->dev);
}

static void virtio_mmio_set_status(struct virtio_mmio *m, uint32_t v)
{
	uint32_t old = m->status;

	if (v == 0) {
		virtio_mmio_reset(m);
		return;
	}
	if ((v & old & ~VIRTIO_CONFIG_S_NEEDS_RESET) != (old & ~VIRTIO_CONFIG_S_NEEDS_RESET))
		return; /* the driver may only add bits (or write 0) */
	v &= 0xff;
	if ((v & VIRTIO_CONFIG_S_FEATURES_OK) && !(old & VIRTIO_CONFIG_S_FEATURES_OK)) {
		/* accept only a subset of what we offered, and only the modern interface */
		if ((m->drv_features & ~virtio_mmio_offered(m)) ||
		    !(m->drv_features & (1ull << VIRTIO_F_VERSION_1)))
			v &= ~VIRTIO_CONFIG_S_FEATURES_OK;
	}
	if ((v & VIRTIO_CONFIG_S_DRIVER_OK) && !(v & VIRTIO_CONFIG_S_FEATURES_OK))
		v &= ~VIRTIO_CONFIG_S_DRIVER_OK;
	m->status = v | (old & VIRTIO_CONFIG_S_NEEDS_RESET);
	if ((v & VIRTIO_CONFIG_S_DRIVER_OK) && !(old & VIRTIO_CONFIG_S_DRIVER_OK) && m->ops->activate &&
	    !(m->status & VIRTIO_CONFIG_S_NEEDS_RESET))
		m->ops->activate(m->dev);
}

static uint32_t virtio_mmio_read_reg(struct virtio_mmio *m, uint64_t off)
{
	struct virtq *q = m->queue_sel < m->ops->nr_queues ? &m->vq[m->queue_sel] : NULL;
	uint64_t feat = virtio_mmio_offered(m);

	switch (off) {
	case VIRTIO_MMIO_MAGIC_VALUE:
		return VIRTIO_MMIO_MAGIC;
	case VIRTIO_MMIO_VERSION:
		return 2;
	case VIRTIO_MMIO_DEVICE_ID:
		return m->ops->device_id;
	case VIRTIO_MMIO_VENDOR_ID:
		return VIRTIO_MMIO_VENDOR;
	case VIRTIO_MMIO_DEVICE_FEATURES:
		return m->dev_feat_sel == 0 ? (uint32_t)feat : m->dev_feat_sel == 1 ? (uint32_t)(feat >> 32) : 0;
	case VIRTIO_MMIO_QUEUE_NUM_MAX:
		return q ? m->ops->queue_max : 0;
	case VIRTIO_MMIO_QUEUE_READY:
		return q ? q->ready : 0;
	case VIRTIO_MMIO_INTERRUPT_STATUS:
		return m->int_status;
	case VIRTIO_MMIO_STATUS:
		return m->status;
	case VIRTIO_MMIO_CONFIG_GENERATION:
		return m->config_gen;
	case VIRTIO_MMIO_SHM_LEN_LOW:
	case VIRTIO_MMIO_SHM_LEN_HIGH:
	case VIRTIO_MMIO_SHM_BASE_LOW:
	case VIRTIO_MMIO_SHM_BASE_HIGH:
		return 0xffffffffu; /* no shared memory regions */
	default:
		return 0;
	}
}

/* Replace the low or high half of a staged ring address. */
static void virtio_mmio_set_half(uint64_t *gpa, uint32_t v, bool high)
{
	if (high)
		*gpa = (*gpa & 0xffffffffull) | ((uint64_t)v << 32);
	else
		*gpa = (*gpa & ~0xffffffffull) | v;
}

static void virtio_mmio_write_reg(struct virtio_mmio *m, uint64_t off, uint32_t v)
{
	struct virtq *q = m->queue_sel < m->ops->nr_queues ? &m->vq[m->queue_sel] : NULL;
	struct virtq *stage = q && !q->ready ? q : NULL; /* queue layout is fixed while ready */

	switch (off) {
	case VIRTIO_MMIO_DEVICE_FEATURES_SEL:
		m->dev_feat_sel = v;
		break;
	case VIRTIO_MMIO_DRIVER_FEATURES:
		if ((m->status & VIRTIO_CONFIG_S_FEATURES_OK) || m->drv_feat_sel > 1)
			break;
		if (m->drv_feat_sel == 0)
			m->drv_features = (m->drv_features & ~0xffffffffull) | v;
		else
			m->drv_features = (m->drv_features & 0xffffffffull) | ((uint64_t)v << 32);
		break;
	case VIRTIO_MMIO_DRIVER_FEATURES_SEL:
		m->drv_feat_sel = v;
		break;
	case VIRTIO_MMIO_QUEUE_SEL:
		m->queue_sel = v;
		break;
	case VIRTIO_MMIO_QUEUE_NUM:
		if (stage)
			stage->size = v <= 0xffff ? (uint16_t)v : 0; /* 0 fails at QueueReady */
		break;
	case VIRTIO_MMIO_QUEUE_READY:
		if (!q)
			break;
		if (v == 1 && !q->ready) {
			if (virtq_enable(q, m->ops->queue_max) < 0)
				virtio_mmio_fail(m);
		} else if (v == 0) {
			virtq_reset(q);
		}
		break;
	case VIRTIO_MMIO_QUEUE_NOTIFY:
		if (v >= m->ops->nr_queues)
			break;
		if (m->notify_watched) {
			uint64_t one = 1;

			/* the loop thread runs queue_notify, as with a real ioeventfd */
			if (write(m->notify[v].fd, &one, sizeof(one)) == sizeof(one))
				break;
		}
		virtio_mmio_kick(m, v);
		break;
	case VIRTIO_MMIO_INTERRUPT_ACK:
		m->int_status &= ~v;
		break;
	case VIRTIO_MMIO_STATUS:
		virtio_mmio_set_status(m, v);
		break;
	case VIRTIO_MMIO_QUEUE_DESC_LOW:
	case VIRTIO_MMIO_QUEUE_DESC_HIGH:
		if (stage)
			virtio_mmio_set_half(&stage->desc_gpa, v, off == VIRTIO_MMIO_QUEUE_DESC_HIGH);
		break;
	case VIRTIO_MMIO_QUEUE_AVAIL_LOW:
	case VIRTIO_MMIO_QUEUE_AVAIL_HIGH:
		if (stage)
			virtio_mmio_set_half(&stage->avail_gpa, v, off == VIRTIO_MMIO_QUEUE_AVAIL_HIGH);
		break;
	case VIRTIO_MMIO_QUEUE_USED_LOW:
	case VIRTIO_MMIO_QUEUE_USED_HIGH:
		if (stage)
			virtio_mmio_set_half(&stage->used_gpa, v, off == VIRTIO_MMIO_QUEUE_USED_HIGH);
		break;
	default:
		break; /* read-only or unknown: ignored */
	}
}

/* vCPU thread: one guest access inside the window; off is relative to base. */
static void virtio_mmio_access(void *opaque, uint64_t off, void *data, uint32_t len, bool is_write)
{
	struct virtio_mmio *m = opaque;
	uint32_t v;

	if (len > 8 || off >= VIRTIO_MMIO_SIZE)
		return;
	if (!is_write)
		memset(data, 0, len);
	if (off >= VIRTIO_MMIO_CONFIG) {
		uint64_t coff = off - VIRTIO_MMIO_CONFIG;

		if ((len != 1 && len != 2 && len != 4 && len != 8) || coff + len > m->ops->config_size)
			return;
		virtio_mmio_lock(m);
		if (is_write && m->ops->config_write)
			m->ops->config_write(m->dev, (uint32_t)coff, data, len);
		else if (!is_write && m->ops->config_read)
			m->ops->config_read(m->dev, (uint32_t)coff, data, len);
		virtio_mmio_unlock(m);
		return;
	}
	if (len != 4 || (off & 3))
		return; /* registers: aligned 32-bit only */
	virtio_mmio_lock(m);
	if (is_write) {
		memcpy(&v, data, 4);
		virtio_mmio_write_reg(m, off, v);
	} else {
		v = virtio_mmio_read_reg(m, off);
		memcpy(data, &v, 4);
	}
	virtio_mmio_unlock(m);
}

static int virtio_mmio_ioeventfd(struct virtio_mmio *m, unsigned q, bool assign)
{
	struct kvm_ioeventfd io = {
		.datamatch = q,
		.addr = m->base + VIRTIO_MMIO_QUEUE_NOTIFY,
		.len = 4,
		.fd = m->notify[q].fd,
		.flags = KVM_IOEVENTFD_FLAG_DATAMATCH | (assign ? 0 : KVM_IOEVENTFD_FLAG_DEASSIGN),
	};

	if (m->vm->vm_fd < 0)
		return -EBADF;
	return ioctl(m->vm->vm_fd, KVM_IOEVENTFD, &io) < 0 ? -errno : 0;
}

static int virtio_mmio_irqfd(struct virtio_mmio *m, bool assign)
{
	struct kvm_irqfd irq = {
		.fd = (uint32_t)m->irq_fd,
		.gsi = m->gsi,
		.flags = assign ? 0 : KVM_IRQFD_FLAG_DEASSIGN,
	};

	if (m->vm->vm_fd < 0)
		return -EBADF;
	return ioctl(m->vm->vm_fd, KVM_IRQFD, &irq) < 0 ? -errno : 0;
}

/* Notify eventfds on the loop, then KVM_IOEVENTFD for all queues or none. */
static int virtio_mmio_setup_notify(struct virtio_mmio *m)
{
	unsigned q, n = m->ops->nr_queues, done = 0;
	int err = 0;

	if (!m->vm->loop)
		return 0; /* no loop: QueueNotify runs queue_notify on the vCPU thread */
	for (q = 0; q < n; q++) {
		m->notify[q].fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
		if (m->notify[q].fd < 0) {
			err = -errno;
			goto out;
		}
	}
	for (q = 0; q < n; q++) {
		err = evloop_add(m->vm->loop, m->notify[q].fd, POLLIN, virtio_mmio_notify_cb, &m->notify[q]);
		if (err) {
			while (q--)
				evloop_del(m->vm->loop, m->notify[q].fd);
			goto out;
		}
	}
	m->notify_watched = true;
	for (done = 0; done < n; done++)
		if (virtio_mmio_ioeventfd(m, done, true) < 0)
			break;
	if (done == n) {
		m->ioeventfd = true;
	} else {
		while (done--)
			virtio_mmio_ioeventfd(m, done, false);
	}
out:
	return err;
}

int virtio_mmio_init(struct virtio_mmio *m, struct vm *vm, uint64_t base, uint32_t gsi,
		     const struct virtio_dev_ops *ops, void *dev)
{
	unsigned q;
	int err;

	memset(m, 0, sizeof(*m));
	m->irq_fd = -1;
	for (q = 0; q < VIRTIO_MMIO_MAX_QUEUES; q++) {
		m->notify[q].fd = -1;
		m->notify[q].m = m;
		m->notify[q].q = q;
		m->vq[q].vm = vm;
	}
	m->vm = vm;
	m->ops = ops;
	m->dev = dev;
	m->base = base;
	m->gsi = gsi;
	if (!ops->nr_queues || ops->nr_queues > VIRTIO_MMIO_MAX_QUEUES || !ops->queue_max ||
	    ops->queue_max > 32768 || (ops->queue_max & (ops->queue_max - 1)) ||
	    ops->config_size > VIRTIO_MMIO_SIZE - VIRTIO_MMIO_CONFIG)
		return -EINVAL;
	err = -pthread_mutex_init(&m->lock, NULL);
	if (err)
		return err;
	m->lock_ok = true;
	err = virtio_mmio_setup_notify(m);
	if (err)
		goto out;
	m->irq_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (m->irq_fd >= 0 && virtio_mmio_irqfd(m, true) < 0) {
		close(m->irq_fd);
		m->irq_fd = -1;
	}
	err = vm_add_mmio(vm, base, VIRTIO_MMIO_SIZE, virtio_mmio_access, m);
out:
	if (err)
		virtio_mmio_destroy(m);
	return err;
}

void virtio_mmio_destroy(struct virtio_mmio *m)
{
	unsigned q;

	if (!m->vm)
		return;
	if (m->irq_fd >= 0) {
		virtio_mmio_irqfd(m, false);
		close(m->irq_fd);
		m->irq_fd = -1;
	}
	for (q = 0; q < VIRTIO_MMIO_MAX_QUEUES; q++) {
		if (m->notify[q].fd < 0)
			continue;
		if (m->ioeventfd)
			virtio_mmio_ioeventfd(m, q, false);
		if (m->notify_watched)
			evloop_del(m->vm->loop, m->notify[q].fd);
		close(m->notify[q].fd);
		m->notify[q].fd = -1;
	}
	m->ioeventfd = m->notify_watched = false;
	if (m->lock_ok)
		pthread_mutex_destroy(&m->lock);
	m->lock_ok = false;
}

int virtio_mmio_alloc(struct vm *vm, struct virtio_mmio_window *out)
{
	uint32_t n = vm->nr_virtio;

	if (n >= VIRTIO_MMIO_MAX_DEVS)
		return -ENOSPC;
	vm->nr_virtio = n + 1;
	*out = (struct virtio_mmio_window){ VIRTIO_MMIO_BASE + n * VIRTIO_MMIO_STRIDE, VIRTIO_MMIO_GSI + n, n };
	return 0;
}

int virtio_mmio_cmdline(char *buf, size_t size, uint64_t base, uint32_t gsi)
{
	int n = snprintf(buf, size, "virtio_mmio.device=%u@0x%" PRIx64 ":%" PRIu32, VIRTIO_MMIO_SIZE, base, gsi);

	return n < 0 || (size_t)n >= size ? -ENOSPC : n;
}

struct virtio_mmio_snap_queue {
	uint64_t desc_gpa, avail_gpa, used_gpa;
	uint16_t size, last_avail, used_idx, ready;
};

struct virtio_mmio_snap {
	uint32_t device_id, nr_queues;
	uint32_t status, int_status;
	uint32_t dev_feat_sel, drv_feat_sel, queue_sel, config_gen;
	uint64_t drv_features;
	struct virtio_mmio_snap_queue q[VIRTIO_MMIO_MAX_QUEUES];
};

void virtio_mmio_save(struct virtio_mmio *m, struct snap_writer *w, uint32_t index)
{
	struct virtio_mmio_snap s;

	memset(&s, 0, sizeof(s));
	s.device_id = m->ops->device_id;
	s.nr_queues = m->ops->nr_queues;
	s.status = m->status;
	s.int_status = m->int_status;
	s.dev_feat_sel = m->dev_feat_sel;
	s.drv_feat_sel = m->drv_feat_sel;
	s.queue_sel = m->queue_sel;
	s.config_gen = m->config_gen;
	s.drv_features = m->drv_features;
	for (unsigned i = 0; i < m->ops->nr_queues; i++) {
		struct virtq *q = &m->vq[i];

		s.q[i] = (struct virtio_mmio_snap_queue){
			q->desc_gpa, q->avail_gpa, q->used_gpa, q->size, q->last_avail, q->used_idx,
			q->ready,
		};
	}
	snap_put(w, SNAP_DEV_MMIO, index, &s, sizeof(s));
}

int virtio_mmio_restore(struct virtio_mmio *m, const struct snap_reader *r, uint32_t index)
{
	const struct virtio_mmio_snap *s;
	uint32_t len = 0;

	s = snap_get(r, SNAP_DEV_MMIO, index, &len);
	if (!s || len != sizeof(*s) || s->device_id != m->ops->device_id ||
	    s->nr_queues != m->ops->nr_queues)
		return -EINVAL;
	m->status = s->status;
	m->int_status = s->int_status;
	m->dev_feat_sel = s->dev_feat_sel;
	m->drv_feat_sel = s->drv_feat_sel;
	m->queue_sel = s->queue_sel < VIRTIO_MMIO_MAX_QUEUES ? s->queue_sel : 0;
	m->config_gen = s->config_gen;
	m->drv_features = s->drv_features;
	for (unsigned i = 0; i < m->ops->nr_queues; i++) {
		struct virtq *q = &m->vq[i];

		virtq_reset(q);
		q->size = s->q[i].size;
		q->desc_gpa = s->q[i].desc_gpa;
		q->avail_gpa = s->q[i].avail_gpa;
		q->used_gpa = s->q[i].used_gpa;
		if (!s->q[i].ready)
			continue;
		if (virtq_enable(q, m->ops->queue_max) < 0)
			return -EINVAL;
		q->last_avail = s->q[i].last_avail;
		q->used_idx = s->q[i].used_idx;
	}
	return 0;
}
