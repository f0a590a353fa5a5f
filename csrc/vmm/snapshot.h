/* Snapshot files: a checksummed, versioned state file plus a raw guest-memory file. */
#ifndef SMOLVM_SNAPSHOT_H
#define SMOLVM_SNAPSHOT_H

#include <stddef.h>
#include <stdint.h>

struct vm;

#define SNAP_MAGIC "SMOLSNAP"
#define SNAP_VERSION 2u /* 2: virtio windows in creation order, SNAP_DEV_LIST */
#define SNAP_STATE_FILE "state.bin"
#define SNAP_MEMORY_FILE "memory.bin"

/* Section types in the state file. Index says which vCPU / irqchip / device. */
enum snap_section {
	SNAP_VM_INFO = 1, /* struct snap_vm_info */
	SNAP_VM_PIT,
	SNAP_VM_CLOCK,
	SNAP_VM_IRQCHIP,
	SNAP_VCPU_CPUID = 16,
	SNAP_VCPU_MP_STATE,
	SNAP_VCPU_REGS,
	SNAP_VCPU_SREGS,
	SNAP_VCPU_XSAVE,
	SNAP_VCPU_FPU,
	SNAP_VCPU_XCRS,
	SNAP_VCPU_DEBUGREGS,
	SNAP_VCPU_LAPIC,
	SNAP_VCPU_MSRS,
	SNAP_VCPU_EVENTS,
	SNAP_DEV_SERIAL = 32,
	SNAP_DEV_MMIO,  /* transport state, index = device slot */
	SNAP_DEV_VSOCK, /* device state */
	SNAP_DEV_BLK,
	SNAP_DEV_NET,
	SNAP_DEV_LIST, /* the device table's names in order, "serial,i8042,vsock,blk" (dev.h) */
	SNAP_MEM_OVERLAY = 64, /* a fork capture (fork.h): bitmap of the pages overlay.bin replaces */
};

struct snap_vm_info {
	uint64_t mem_size;
	uint32_t nr_vcpus;
	uint32_t reserved;
};

/* A growing buffer of sections, written out with a header and checksum. */
struct snap_writer {
	uint8_t *buf;
	size_t len, cap;
	int err;
};

/* Append one section (copies data). Errors are sticky in w->err. */
void snap_put(struct snap_writer *w, uint32_t type, uint32_t index, const void *data, uint32_t len);

/* A loaded, verified state file. */
struct snap_reader {
	uint8_t *buf;
	size_t len;
};

/* Find section (type, index); returns its data and length or NULL. Bounds-checked. */
const void *snap_get(const struct snap_reader *r, uint32_t type, uint32_t index, uint32_t *len);

/*
 * Save a paused VM (all vCPUs parked, devices quiet) into dir (created):
 * KVM state of the VM and each vCPU, device sections the caller appended to
 * `devices`, and guest memory. Returns 0 or -errno with a reason in err.
 */
int snapshot_save(struct vm *vm, const char *dir, struct snap_writer *devices, char *err,
		  size_t errlen);

/*
 * snapshot_save() without the memory file: the caller puts memory.bin in dir itself (a fork
 * capture links the memory file it was restored from there and writes an overlay, fork.h).
 */
int snapshot_save_state(struct vm *vm, const char *dir, struct snap_writer *sections, char *err,
			size_t errlen);

/*
 * Open dir as a restore needs it, without KVM: both files present, the state file's size,
 * magic, version, length, checksum and VM description, and the memory file's size. Fills r
 * (free with snapshot_reader_free) and info, or returns -errno with the problem in err
 * (these are the messages `smolvm snapshot ls` shows, through smolvm-vmm --inspect).
 */
int snapshot_open(const char *dir, struct snap_reader *r, struct snap_vm_info *info, char *err,
		  size_t errlen);
void snapshot_reader_free(struct snap_reader *r);

/* Open dir's memory file read-only for kvm_vm_create(); returns the fd or -errno. */
int snapshot_memory_fd(const char *dir, char *err, size_t errlen);

/* Put the VM-wide and per-vCPU KVM state back (vCPUs created, not running). */
int snapshot_restore_kvm(struct vm *vm, const struct snap_reader *r, char *err, size_t errlen);

#endif
