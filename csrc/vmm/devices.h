/* The VMM's devices as device-table entries: serial and i8042 on the port bus; vsock, disks and the NIC on virtio-mmio. */
#ifndef SMOLVM_DEVICES_H
#define SMOLVM_DEVICES_H

#include <stddef.h>
#include <sys/types.h>

struct dev_table;
struct vm;
struct vsock;
struct vsock_config;

/*
 * Each call makes one device on vm (vm->loop set, vCPUs not yet running) and adds it to t,
 * which owns it from then on (dev_free_all). Call them in the same order for a VM and for
 * its restore: the order gives each virtio device its window, GSI and snapshot index.
 * Return 0 or -errno with a reason in err.
 */

/* The UART at SERIAL_PORT (output to console_fd, -1 = dropped) and the i8042 reset port. */
int devices_add_legacy(struct dev_table *t, struct vm *vm, int console_fd, char *err, size_t errlen);

/* The vsock device, the first virtio device (its sections use index 0; -EINVAL if it is not first).
 * cfg's base and gsi are filled in here. *out stays valid while t holds it. */
int devices_add_vsock(struct dev_table *t, struct vm *vm, struct vsock_config *cfg, struct vsock **out,
		      char *err, size_t errlen);

/* Disk `nr` (0, 1, ...) from spec "PATH" or "PATH,ro" (the ",ro" is cut off spec). */
int devices_add_disk(struct dev_table *t, struct vm *vm, int nr, char *spec, char *err, size_t errlen);

struct netf;

/*
 * The NIC, with passt (argv[0..argc), csrc/vmm/passt.h) as its backend; stopping it is the
 * device's free. *filter (NULL: no egress policy) becomes the device's on success (*filter is
 * then NULL). *backend gets passt's pid (the seccomp filter lets kill() reach it alone).
 */
int devices_add_net(struct dev_table *t, struct vm *vm, char *const *passt_argv, int argc, struct netf **filter,
		    pid_t *backend, char *err, size_t errlen);

#endif
