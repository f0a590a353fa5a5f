/* Device-table entries for serial, i8042, vsock, blk and net: thin hooks over each device's own functions. */
#define _GNU_SOURCE
#include "devices.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dev.h"
#include "i8042.h"
#include "jail.h"
#include "passt.h"
#include "serial.h"
#include "sysfilter.h"
#include "virtio/blk.h"
#include "virtio/mmio.h"
#include "virtio/net.h"
#include "virtio/vsock.h"
#include "vm.h"

/* Hand d, its device opaque and (virtio devices) its window to the table; if it is full, free the device here. */
static int devices_put(struct dev_table *t, struct vmm_dev *d, void *opaque, const struct virtio_mmio_window *win,
		       char *err, size_t errlen)
{
	d->opaque = opaque;
	if (win) {
		d->base = win->base;
		d->gsi = win->gsi;
		d->index = win->index;
	}
	if (!dev_add(t, d))
		return 0;
	if (d->free)
		d->free(d->opaque);
	snprintf(err, errlen, "too many devices (at most %d)", DEV_MAX);
	return -ENOSPC;
}

static void devices_serial_save(void *s, struct snap_writer *w, uint32_t index)
{
	(void)index;
	serial_save(s, w);
}

static int devices_serial_restore(void *s, const struct snap_reader *r, uint32_t index)
{
	(void)index;
	return serial_restore(s, r);
}

static void devices_serial_free(void *s)
{
	serial_free(s);
}

static const struct vmm_dev devices_serial = {
	.name = "serial", .bus = DEV_BUS_PIO, .base = SERIAL_PORT,
	.save = devices_serial_save, .restore = devices_serial_restore, .free = devices_serial_free,
};

static const struct vmm_dev devices_i8042 = { .name = "i8042", .bus = DEV_BUS_PIO, .base = I8042_PORT };

int devices_add_legacy(struct dev_table *t, struct vm *vm, int console_fd, char *err, size_t errlen)
{
	struct vmm_dev d = devices_serial;
	struct serial *s = serial_new(vm, console_fd);
	int ret;

	if (!s) {
		snprintf(err, errlen, "out of memory");
		return -ENOMEM;
	}
	ret = vm_add_pio(vm, SERIAL_PORT, SERIAL_NR_PORTS, serial_pio, s);
	if (ret) {
		serial_free(s);
		snprintf(err, errlen, "serial port: %s", strerror(-ret));
		return ret;
	}
	ret = devices_put(t, &d, s, NULL, err, errlen);
	if (ret)
		return ret;
	d = devices_i8042;
	ret = i8042_add(vm);
	if (ret) {
		snprintf(err, errlen, "i8042 port: %s", strerror(-ret));
		return ret;
	}
	return devices_put(t, &d, vm, NULL, err, errlen);
}

static void devices_vsock_save(void *v, struct snap_writer *w, uint32_t index)
{
	(void)index; /* always 0: devices_add_vsock makes sure */
	vsock_save(v, w);
}

static int devices_vsock_restore(void *v, const struct snap_reader *r, uint32_t index)
{
	(void)index;
	return vsock_restore(v, r);
}

/* Host ends of connections open at snapshot time are gone: the transport reset makes the
 * guest drop its ends (listening sockets stay). No event buffer posted: dropped anyway. */
static int devices_vsock_reset(void *v)
{
	int ret = vsock_reset_transport(v);

	return ret == -ENOBUFS ? 0 : ret;
}

static void devices_vsock_free(void *v)
{
	vsock_free(v);
}

static const struct vmm_dev devices_vsock = {
	.name = "vsock", .label = "vsock device", .bus = DEV_BUS_VIRTIO_MMIO, .save = devices_vsock_save,
	.restore = devices_vsock_restore, .reset = devices_vsock_reset, .free = devices_vsock_free,
};

int devices_add_vsock(struct dev_table *t, struct vm *vm, struct vsock_config *cfg, struct vsock **out,
		      char *err, size_t errlen)
{
	struct vmm_dev d = devices_vsock;
	struct virtio_mmio_window win;
	struct vsock *v = NULL;
	int ret;

	*out = NULL;
	ret = virtio_mmio_alloc(vm, &win);
	if (!ret && win.index != 0)
		ret = -EINVAL;
	if (!ret) {
		cfg->base = win.base;
		cfg->gsi = win.gsi;
		ret = vsock_new(vm, cfg, &v);
	}
	if (ret) {
		snprintf(err, errlen, "vsock device on %s: %s", cfg->uds_path, strerror(-ret));
		return ret;
	}
	ret = devices_put(t, &d, v, &win, err, errlen);
	if (!ret)
		*out = v;
	return ret;
}

static void devices_blk_save(void *b, struct snap_writer *w, uint32_t index)
{
	blk_save(b, w, index);
}

static int devices_blk_restore(void *b, const struct snap_reader *r, uint32_t index)
{
	return blk_restore(b, r, index);
}

static void devices_blk_free(void *b)
{
	blk_free(b);
}

static const struct vmm_dev devices_blk = {
	.name = "blk", .bus = DEV_BUS_VIRTIO_MMIO, .save = devices_blk_save, .restore = devices_blk_restore,
	.free = devices_blk_free,
};

int devices_add_disk(struct dev_table *t, struct vm *vm, int nr, char *spec, char *err, size_t errlen)
{
	char *comma = strrchr(spec, ',');
	struct blk_config bc = { .path = spec, .read_only = false, .serial = NULL };
	struct vmm_dev d = devices_blk;
	struct virtio_mmio_window win;
	struct blk *b = NULL;
	int ret;

	if (comma && !strcmp(comma, ",ro")) {
		*comma = 0;
		bc.read_only = true;
	}
	ret = virtio_mmio_alloc(vm, &win);
	if (!ret) {
		bc.base = win.base;
		bc.gsi = win.gsi;
		ret = blk_new(vm, &bc, &b);
	}
	if (ret) {
		snprintf(err, errlen, "disk %s: %s", spec, strerror(-ret));
		return ret;
	}
	snprintf(d.label, sizeof(d.label), "disk %d (%.120s)", nr, spec);
	return devices_put(t, &d, b, &win, err, errlen);
}

/* The NIC and the backend process behind it. */
struct devices_net {
	struct net *net;
	pid_t passt;
};

static void devices_net_save(void *opaque, struct snap_writer *w, uint32_t index)
{
	struct devices_net *dn = opaque;

	net_save(dn->net, w, index);
}

static int devices_net_restore(void *opaque, const struct snap_reader *r, uint32_t index)
{
	struct devices_net *dn = opaque;

	return net_restore(dn->net, r, index);
}

static void devices_net_free(void *opaque)
{
	struct devices_net *dn = opaque;

	net_free(dn->net);
	passt_stop(dn->passt);
	free(dn);
}

static const struct vmm_dev devices_net = {
	.name = "net", .label = "network device", .bus = DEV_BUS_VIRTIO_MMIO, .save = devices_net_save,
	.restore = devices_net_restore, .free = devices_net_free,
};

/*
 * First thing on the egress policy's resolver thread, which set-up starts before the
 * jail: its share of the jail (capabilities: per thread), then its own seccomp filter.
 */
static int devices_confine_resolver(void *opaque)
{
	struct vm *vm = opaque;
	struct sysfilter_params p = { (enum sysfilter_mode)vm->seccomp_mode, -1, vm->console_fd };
	char err[200] = "";
	int ret = vm->jail ? jail_thread(vm->jail) : 0;

	if (vm->resolver_status_fd < 0)
		vm->resolver_status_fd = open("/proc/thread-self/status", O_RDONLY | O_CLOEXEC);
	if (ret)
		snprintf(err, sizeof(err), "jail: %s", strerror(-ret));
	else
		ret = sysfilter_install(SYSFILTER_ROLE_RESOLVER, &p, err, sizeof(err));
	if (ret)
		fprintf(stderr, "smolvm-vmm: the DNS resolver thread: %s\n", err);
	return ret;
}

int devices_add_net(struct dev_table *t, struct vm *vm, char *const *passt_argv, int argc, struct netf **filter,
		    pid_t *backend, char *err, size_t errlen)
{
	static const uint8_t mac[6] = { 0x52, 0x54, 0x00, 0x12, 0x34, 0x56 };
	struct net_config nc = { .backend_fd = -1 };
	struct vmm_dev d = devices_net;
	struct virtio_mmio_window win;
	struct devices_net *dn = NULL;
	int ret;

	ret = virtio_mmio_alloc(vm, &win);
	if (ret) {
		snprintf(err, errlen, "network device: %s", strerror(-ret));
		return ret;
	}
	dn = calloc(1, sizeof(*dn));
	if (!dn) {
		snprintf(err, errlen, "out of memory");
		return -ENOMEM;
	}
	dn->passt = -1;
	memcpy(nc.mac, mac, sizeof(mac));
	nc.base = win.base;
	nc.gsi = win.gsi;
	nc.filter = *filter;
	nc.dns_ip = htonl(0x0a000203); /* 10.0.2.3: smolvm/network.py DNS, passt's --dns-forward */
	nc.confine = devices_confine_resolver;
	nc.confine_arg = vm;
	ret = passt_start(passt_argv, argc, &nc.backend_fd, &dn->passt);
	if (ret) {
		snprintf(err, errlen, "network backend %s: %s", passt_argv[0], strerror(-ret));
		goto out;
	}
	ret = net_new(vm, &nc, &dn->net);
	if (ret) {
		close(nc.backend_fd);
		snprintf(err, errlen, "network device: %s", strerror(-ret));
		goto out;
	}
	*filter = NULL; /* the device's now */
	*backend = dn->passt;
	return devices_put(t, &d, dn, &win, err, errlen);
out:
	passt_stop(dn->passt);
	free(dn);
	return ret;
}
