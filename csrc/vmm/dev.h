/* The VMM's device table: every device once, so snapshot save, restore, teardown and the kernel command line walk one list. */
#ifndef SMOLVM_DEV_H
#define SMOLVM_DEV_H

#include <stddef.h>
#include <stdint.h>

struct snap_writer;
struct snap_reader;

#define DEV_MAX 16

enum dev_bus {
	DEV_BUS_PIO,         /* legacy ports (vm_add_pio) */
	DEV_BUS_VIRTIO_MMIO, /* a virtio-mmio window (virtio_mmio_alloc): declared on the kernel command line */
};

/*
 * One device. Hooks may be NULL. `index` is what the device's snapshot sections are keyed
 * by (its virtio-mmio window's index; 0 for port devices). They are called on the
 * setup/loop thread, never while vCPUs run unless said.
 */
struct vmm_dev {
	const char *name;  /* "serial", "vsock", "blk", ...: in the snapshot's device list */
	char label[160];   /* for messages: "disk 0 (/path/img)" */
	enum dev_bus bus;
	uint64_t base;     /* port or MMIO window base */
	uint32_t gsi;      /* DEV_BUS_VIRTIO_MMIO */
	uint32_t index;
	void *opaque;
	/* Append the device's sections. VM paused, loop thread. */
	void (*save)(void *opaque, struct snap_writer *w, uint32_t index);
	/* Put them back after the device was made, before vCPUs run. 0 or -EINVAL. */
	int (*restore)(void *opaque, const struct snap_reader *r, uint32_t index);
	/* A restored VM's vCPUs run: drop host-side state a snapshot cannot carry. 0 or -errno. */
	int (*reset)(void *opaque);
	/* Release the device. No vCPU runs; the loop has stopped. */
	void (*free)(void *opaque);
};

struct dev_table {
	struct vmm_dev devs[DEV_MAX];
	int nr;
};

/* Append a copy of d; from here on the table frees it. Returns 0, or -ENOSPC (nothing kept). */
int dev_add(struct dev_table *t, const struct vmm_dev *d);

/* Append every device's sections, and the device list (SNAP_DEV_LIST) restore checks. */
void dev_save_all(const struct dev_table *t, struct snap_writer *w);

/*
 * Check the snapshot has the same devices in the same order, then restore each.
 * Returns 0 or -EINVAL with a reason naming dir in err.
 */
int dev_restore_all(const struct dev_table *t, const struct snap_reader *r, const char *dir, char *err,
		    size_t errlen);

/* Call every reset hook after a restore; the first failure's -errno with a reason in err. */
int dev_reset_all(const struct dev_table *t, char *err, size_t errlen);

/* Append " virtio_mmio.device=..." for every virtio-mmio device to the string in buf. 0 or -E2BIG. */
int dev_cmdline(const struct dev_table *t, char *buf, size_t size);

/* Free every device, last added first; the table is empty after. */
void dev_free_all(struct dev_table *t);

#endif
