/* The device table's walks: save and restore in one order (checked against the snapshot's device list), reset, teardown. */
#define _GNU_SOURCE
#include "dev.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "snapshot.h"
#include "virtio/mmio.h"

#define DEV_LIST_MAX 512

int dev_add(struct dev_table *t, const struct vmm_dev *d)
{
	if (t->nr >= DEV_MAX)
		return -ENOSPC;
	t->devs[t->nr++] = *d;
	return 0;
}

/* "serial,i8042,vsock,blk": the table's device names in order. */
static void dev_list(const struct dev_table *t, char *buf, size_t size)
{
	size_t n = 0;

	buf[0] = 0;
	for (int i = 0; i < t->nr && n < size; i++)
		n += (size_t)snprintf(buf + n, size - n, "%s%s", i ? "," : "", t->devs[i].name);
}

void dev_save_all(const struct dev_table *t, struct snap_writer *w)
{
	char list[DEV_LIST_MAX];

	dev_list(t, list, sizeof(list));
	snap_put(w, SNAP_DEV_LIST, 0, list, (uint32_t)strlen(list));
	for (int i = 0; i < t->nr; i++)
		if (t->devs[i].save)
			t->devs[i].save(t->devs[i].opaque, w, t->devs[i].index);
}

int dev_restore_all(const struct dev_table *t, const struct snap_reader *r, const char *dir, char *err,
		    size_t errlen)
{
	char want[DEV_LIST_MAX];
	const char *got;
	uint32_t len = 0;

	dev_list(t, want, sizeof(want));
	got = snap_get(r, SNAP_DEV_LIST, 0, &len);
	if (!got || len != strlen(want) || memcmp(got, want, len)) {
		snprintf(err, errlen,
			 "snapshot %s was taken with the devices [%.*s], this VM has [%s]: "
			 "restore it with the disks and the network setting it was taken with",
			 dir, got ? (int)(len < 200 ? len : 200) : 0, got ? got : "", want);
		return -EINVAL;
	}
	for (int i = 0; i < t->nr; i++) {
		const struct vmm_dev *d = &t->devs[i];

		if (d->restore && d->restore(d->opaque, r, d->index)) {
			snprintf(err, errlen, "snapshot %s: %s state missing or does not match this VM", dir,
				 d->label[0] ? d->label : d->name);
			return -EINVAL;
		}
	}
	return 0;
}

int dev_reset_all(const struct dev_table *t, char *err, size_t errlen)
{
	for (int i = 0; i < t->nr; i++) {
		const struct vmm_dev *d = &t->devs[i];
		int ret = d->reset ? d->reset(d->opaque) : 0;

		if (ret) {
			snprintf(err, errlen, "%s reset after restore: %s", d->label[0] ? d->label : d->name,
				 strerror(-ret));
			return ret;
		}
	}
	return 0;
}

int dev_cmdline(const struct dev_table *t, char *buf, size_t size)
{
	size_t n = strnlen(buf, size);

	for (int i = 0; i < t->nr; i++) {
		const struct vmm_dev *d = &t->devs[i];
		int w;

		if (d->bus != DEV_BUS_VIRTIO_MMIO)
			continue;
		if (n + 1 >= size)
			return -E2BIG;
		buf[n++] = ' ';
		w = virtio_mmio_cmdline(buf + n, size - n, d->base, d->gsi);
		if (w < 0)
			return -E2BIG;
		n += (size_t)w;
	}
	return 0;
}

void dev_free_all(struct dev_table *t)
{
	while (t->nr > 0) {
		struct vmm_dev *d = &t->devs[--t->nr];

		if (d->free)
			d->free(d->opaque);
	}
}
