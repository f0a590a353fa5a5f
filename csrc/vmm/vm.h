/* One KVM virtual machine: its fds, guest memory, vCPUs, devices; and the only guest-address gate. */
#ifndef SMOLVM_VM_H
#define SMOLVM_VM_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define VM_MAX_VCPUS 16
#define VM_MAX_MMIO_DEVS 8
#define VM_MAX_PIO_DEVS 4

struct evloop;
struct vcpu;

/* A device claiming [base, base+len) of guest physical MMIO space. Called on vCPU threads. */
struct vm_mmio_dev {
	uint64_t base, len;
	void (*access)(void *opaque, uint64_t offset, void *data, uint32_t len, bool is_write);
	void *opaque;
};

/* A device claiming I/O ports [base, base+len). Called on vCPU threads; it fills every read byte. */
struct vm_pio_dev {
	uint16_t base, len;
	void (*access)(void *opaque, uint16_t offset, uint8_t *data, uint32_t size, bool is_write);
	void *opaque;
};

struct jail;

struct vm {
	int kvm_fd, vm_fd;
	uint8_t *mem;      /* host mapping of guest RAM at GPA 0 */
	uint64_t mem_size; /* bytes; RAM is [0, mem_size) below the 32-bit gap */
	/* One bit per 4 KiB page of vm->mem the VMM may have written since a restore (fork.h):
	 * vm_gpa() sets the bits of every range it hands out; NULL = not tracked. */
	uint64_t *dirty;
	int nr_vcpus;
	struct vcpu *vcpus[VM_MAX_VCPUS];
	struct evloop *loop;
	struct vm_mmio_dev mmio[VM_MAX_MMIO_DEVS];
	int nr_mmio;
	struct vm_pio_dev pio[VM_MAX_PIO_DEVS];
	int nr_pio;
	uint32_t nr_virtio; /* virtio-mmio windows handed out (virtio_mmio_alloc) */
	int console_fd; /* serial output goes here; -1 = discard */
	int xstate_port; /* serve XSTATE_PORT (compat profile guests only; xstate.h) */
	int seccomp_mode; /* enum sysfilter_mode: each vCPU thread loads its filter before KVM_RUN (seccomp.h) */
	const struct jail *jail; /* jail.h; a thread started before jail_enter() (the resolver) calls jail_thread() */
	int resolver_status_fd; /* the resolver thread's /proc/thread-self/status, for STATUS; -1 (main sets it) */
	volatile int exit_reason; /* set once by a vCPU: VM_EXIT_* */
	char exit_msg[256];
	uint64_t t_start_ns; /* CLOCK_MONOTONIC when the VMM started, for timing lines */
	pthread_mutex_t lock; /* guards exit_reason and the pause fields */
	pthread_cond_t cond;  /* pause handshake between controller and vCPUs */
	int pause_req, nr_paused, nr_started;
};

enum { VM_RUNNING = 0, VM_EXIT_RESET, VM_EXIT_SHUTDOWN, VM_EXIT_ERROR, VM_EXIT_STOPPED };

/* Guest RAM above VM_GAP_START lives at VM_GAP_END: the gap holds MMIO devices. */
#define VM_GAP_START 0xc0000000ull
#define VM_GAP_END 0x100000000ull

/* Mark the pages of [off, off+len) of vm->mem as written (a range vm_gpa() checked). Any thread. */
static inline void vm_mark_dirty(struct vm *vm, uint64_t off, uint64_t len)
{
	if (!vm->dirty || !len)
		return;
	for (uint64_t pg = off >> 12, last = (off + len - 1) >> 12; pg <= last; pg++) {
		uint64_t bit = 1ull << (pg & 63);

		if (!(__atomic_load_n(&vm->dirty[pg >> 6], __ATOMIC_RELAXED) & bit))
			__atomic_fetch_or(&vm->dirty[pg >> 6], bit, __ATOMIC_RELAXED);
	}
}

/*
 * The only way to turn a guest physical address into a pointer: returns the
 * host address of [gpa, gpa+len) if the whole range lies in one block of guest
 * RAM (overflow-checked), else NULL. len 0 is allowed. When the VM tracks its
 * writes (vm->dirty), the range counts as written: a pointer from here may be
 * written through at any later time, and KVM's dirty log sees only vCPU writes.
 */
static inline void *vm_gpa(struct vm *vm, uint64_t gpa, uint64_t len)
{
	uint64_t low = vm->mem_size < VM_GAP_START ? vm->mem_size : VM_GAP_START;
	uint64_t high = vm->mem_size - low, off;

	if (gpa < VM_GAP_START) {
		if (gpa > low || len > low - gpa)
			return NULL;
		vm_mark_dirty(vm, gpa, len);
		return vm->mem + gpa;
	}
	if (gpa < VM_GAP_END)
		return NULL;
	off = gpa - VM_GAP_END;
	if (off > high || len > high - off)
		return NULL;
	vm_mark_dirty(vm, low + off, len);
	return vm->mem + low + off;
}

/* Add an MMIO region handled in user space. Returns 0 or -errno. */
int vm_add_mmio(struct vm *vm, uint64_t base, uint64_t len,
		void (*access)(void *, uint64_t, void *, uint32_t, bool), void *opaque);

/*
 * Add a port range handled in user space. Accesses of 1, 2 or 4 bytes inside it go to
 * access(opaque, port - base, ...); ports nobody claims read as 0xff (0x61, port B, as 0).
 * Setup thread, before the vCPUs run (they read the table without a lock). Returns 0 or -errno.
 */
int vm_add_pio(struct vm *vm, uint16_t base, uint16_t len,
	       void (*access)(void *, uint16_t, uint8_t *, uint32_t, bool), void *opaque);

/* Raise or lower a GSI line of the in-kernel irqchip. Any thread. */
int vm_irq_line(struct vm *vm, uint32_t gsi, int level);

/* Stop the VM: record why, kick the vCPUs out of KVM_RUN and stop the loop. Any thread. */
void vm_request_exit(struct vm *vm, int reason, const char *msg);

#endif
