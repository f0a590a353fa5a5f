/* A fake VM for device tests and fuzz harnesses: vm.h's calls without KVM, guest RAM on the heap (fake_vm.h). */
#define _GNU_SOURCE
#include "fake_vm.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fake_test.h"

#define FAKE_VM_MAX 8 /* fake VMs alive at once */

struct fake_vm {
	struct vm vm;
	int irq_edges;
};

/* The live fake VMs: vm_irq_line() counts edges of these only (a harness may pass a struct vm of its own). */
static struct fake_vm *fake_vms[FAKE_VM_MAX];

static struct fake_vm *fake_vm_find(struct vm *vm)
{
	int i;

	for (i = 0; i < FAKE_VM_MAX; i++) {
		struct fake_vm *f = __atomic_load_n(&fake_vms[i], __ATOMIC_ACQUIRE);

		if (f && &f->vm == vm)
			return f;
	}
	return NULL;
}

int vm_add_mmio(struct vm *vm, uint64_t base, uint64_t len, void (*access)(void *, uint64_t, void *, uint32_t, bool),
		void *opaque)
{
	if (vm->nr_mmio >= VM_MAX_MMIO_DEVS)
		return -ENOSPC;
	vm->mmio[vm->nr_mmio++] = (struct vm_mmio_dev){ base, len, access, opaque };
	return 0;
}

int vm_irq_line(struct vm *vm, uint32_t gsi, int level)
{
	struct fake_vm *f = fake_vm_find(vm);

	(void)gsi;
	if (f && level)
		__atomic_fetch_add(&f->irq_edges, 1, __ATOMIC_RELAXED);
	return 0;
}

void vm_request_exit(struct vm *vm, int reason, const char *msg)
{
	vm->exit_reason = reason;
	snprintf(vm->exit_msg, sizeof(vm->exit_msg), "%s", msg);
}

struct vm *fake_vm_new(uint64_t ram, struct evloop *loop)
{
	struct fake_vm *f = calloc(1, sizeof(*f));
	struct vm *vm;
	int i;

	CHECK(f);
	for (i = 0; i < FAKE_VM_MAX && !__atomic_compare_exchange_n(&fake_vms[i], &(struct fake_vm *){ NULL }, f, false,
								     __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE); i++)
		;
	CHECK(i < FAKE_VM_MAX);
	vm = &f->vm;
	vm->kvm_fd = vm->vm_fd = -1; /* no KVM: ioeventfd/irqfd fall back */
	vm->mem = aligned_alloc(4096, ram);
	CHECK(vm->mem);
	memset(vm->mem, 0, ram);
	vm->mem_size = ram;
	vm->loop = loop;
	vm->console_fd = -1;
	return vm;
}

void fake_vm_free(struct vm *vm)
{
	struct fake_vm *f;
	int i;

	if (!vm)
		return;
	f = fake_vm_find(vm);
	CHECK(f);
	for (i = 0; i < FAKE_VM_MAX; i++)
		__atomic_compare_exchange_n(&fake_vms[i], &(struct fake_vm *){ f }, NULL, false, __ATOMIC_ACQ_REL,
					    __ATOMIC_ACQUIRE);
	free(vm->mem);
	free(f);
}

int fake_vm_irq_edges(struct vm *vm)
{
	struct fake_vm *f = fake_vm_find(vm);

	CHECK(f);
	return __atomic_load_n(&f->irq_edges, __ATOMIC_RELAXED);
}

struct vm_mmio_dev *fake_vm_dev(struct vm *vm)
{
	CHECK(vm->nr_mmio > 0);
	return &vm->mmio[vm->nr_mmio - 1];
}

void fake_vm_access(struct vm *vm, uint64_t off, void *data, uint32_t len, bool is_write)
{
	struct vm_mmio_dev *d = fake_vm_dev(vm);

	d->access(d->opaque, off, data, len, is_write);
}

uint32_t fake_vm_mr(struct vm *vm, uint64_t off)
{
	uint32_t v = 0xdeadbeef;

	fake_vm_access(vm, off, &v, 4, false);
	return v;
}

void fake_vm_mw(struct vm *vm, uint64_t off, uint32_t v)
{
	fake_vm_access(vm, off, &v, 4, true);
}
