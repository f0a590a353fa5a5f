/* virtio-mmio (version 2) transport: register decoding, queue setup, notifications and interrupts. */
#ifndef SMOLVM_VIRTIO_MMIO_H
#define SMOLVM_VIRTIO_MMIO_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "virtio/queue.h"

struct vm;

#define VIRTIO_MMIO_SIZE 0x200u /* register window claimed per device */
#define VIRTIO_MMIO_MAX_QUEUES 8u

/*
 * What a device gives the transport. VIRTIO_F_VERSION_1 is always offered on
 * top of `features`. Every callback runs with the transport lock held (see
 * below), so a device needs no lock of its own for state these touch.
 */
struct virtio_dev_ops {
	uint32_t device_id;
	uint64_t features;  /* device-specific feature bits offered */
	unsigned nr_queues; /* 1..VIRTIO_MMIO_MAX_QUEUES */
	uint16_t queue_max; /* QueueNumMax: power of two, <= 32768 */
	uint32_t config_size;
	/* Config space access of len 1/2/4/8 at off (off+len <= config_size). vCPU thread. May be NULL. */
	void (*config_read)(void *dev, uint32_t off, void *data, uint32_t len);
	void (*config_write)(void *dev, uint32_t off, const void *data, uint32_t len);
	/* Guest kicked queue q (ready, device live). Loop thread (vCPU thread only when vm->loop is NULL). */
	void (*queue_notify)(void *dev, unsigned q);
	/* Driver set DRIVER_OK. vCPU thread. May be NULL. */
	void (*activate)(void *dev);
	/* Driver wrote status 0; queues are already reset. vCPU thread. May be NULL. */
	void (*reset)(void *dev);
};

struct virtio_mmio;

struct virtio_mmio_notify {
	struct virtio_mmio *m;
	unsigned q;
	int fd; /* eventfd: KVM_IOEVENTFD target, or written by the vCPU as fallback */
};

struct virtio_mmio {
	struct vm *vm;
	const struct virtio_dev_ops *ops;
	void *dev;
	uint64_t base;
	uint32_t gsi;
	/*
	 * One lock per device, not recursive. The transport holds it around every
	 * ops call and register access; device code entered any other way (its
	 * own evloop callbacks, other threads) takes it with virtio_mmio_lock().
	 */
	pthread_mutex_t lock;
	bool lock_ok;
	uint32_t status, int_status;
	uint32_t dev_feat_sel, drv_feat_sel, queue_sel, config_gen;
	uint64_t drv_features; /* what the driver acked; valid once FEATURES_OK */
	struct virtq vq[VIRTIO_MMIO_MAX_QUEUES];
	struct virtio_mmio_notify notify[VIRTIO_MMIO_MAX_QUEUES];
	bool notify_watched; /* notify fds are on vm->loop */
	bool ioeventfd;      /* KVM writes notify fds itself */
	int irq_fd;          /* KVM_IRQFD eventfd; -1 = vm_irq_line() pulses */
};

/*
 * Set up the transport for one device and claim [base, base+VIRTIO_MMIO_SIZE)
 * with vm_add_mmio(). Call before the vCPUs and the loop run; vm->loop, if
 * set, gets the notify eventfds. KVM_IOEVENTFD on QueueNotify (datamatch =
 * queue index) and KVM_IRQFD on gsi are used when vm->vm_fd accepts them;
 * otherwise QueueNotify is handled on the vCPU thread (it pokes the eventfd
 * so queue_notify still runs on the loop) and interrupts become
 * vm_irq_line(gsi, 1) then (gsi, 0). `m` must stay put. Returns 0 or -errno.
 */
int virtio_mmio_init(struct virtio_mmio *m, struct vm *vm, uint64_t base, uint32_t gsi,
		     const struct virtio_dev_ops *ops, void *dev);

/* Undo init (KVM registrations, loop watches, fds). Only once no vCPU runs and on/without the loop. */
void virtio_mmio_destroy(struct virtio_mmio *m);

void virtio_mmio_lock(struct virtio_mmio *m);
void virtio_mmio_unlock(struct virtio_mmio *m);

/* The functions below need the lock held. */

/* The device's queue q (q < ops->nr_queues). */
struct virtq *virtio_mmio_queue(struct virtio_mmio *m, unsigned q);

/* DRIVER_OK is set and the device is not marked broken: queues may be used. */
bool virtio_mmio_live(struct virtio_mmio *m);

/* Used-buffer interrupt: set InterruptStatus bit 0 and pulse the line. */
void virtio_mmio_signal(struct virtio_mmio *m);

/* The guest broke the device: set DEVICE_NEEDS_RESET (0x40), send a config interrupt, stop notifies. */
void virtio_mmio_fail(struct virtio_mmio *m);
/* The device's config space changed: bump ConfigGeneration and, once the driver is live,
 * raise the config-change interrupt. Lock held. */
void virtio_mmio_config_changed(struct virtio_mmio *m);

struct snap_writer;
struct snap_reader;

/* Append the transport's state (status, features, queues) as section SNAP_DEV_MMIO/index. Lock held. */
void virtio_mmio_save(struct virtio_mmio *m, struct snap_writer *w, uint32_t index);

/*
 * Put transport state saved by virtio_mmio_save() back after init, before the
 * vCPUs run: rings are re-resolved through vm_gpa(). Returns 0 or -EINVAL if
 * the section is missing or describes rings outside RAM.
 */
int virtio_mmio_restore(struct virtio_mmio *m, const struct snap_reader *r, uint32_t index);

/*
 * Where virtio-mmio devices live: the n-th one made (n = 0, 1, ...) gets the window at
 * VIRTIO_MMIO_BASE + n * VIRTIO_MMIO_STRIDE, GSI VIRTIO_MMIO_GSI + n, and n as its
 * snapshot index (SNAP_DEV_MMIO/n and its device sections). The same devices made in the
 * same order get the same places, which is what restoring a snapshot relies on.
 */
#define VIRTIO_MMIO_BASE 0xd0000000ull
#define VIRTIO_MMIO_STRIDE 0x1000ull
#define VIRTIO_MMIO_GSI 5u
#define VIRTIO_MMIO_MAX_DEVS 8u

struct virtio_mmio_window {
	uint64_t base;
	uint32_t gsi;
	uint32_t index;
};

/* Hand out the next window of vm (counted in vm->nr_virtio). Setup thread. Returns 0 or -ENOSPC. */
int virtio_mmio_alloc(struct vm *vm, struct virtio_mmio_window *out);

/*
 * Kernel command-line word declaring the device to Linux's virtio_mmio:
 * "virtio_mmio.device=512@0x<base>:<gsi>". Returns its length, or -ENOSPC.
 */
int virtio_mmio_cmdline(char *buf, size_t size, uint64_t base, uint32_t gsi);

#endif
