/* VM creation: /dev/kvm checks, guest RAM slots around the MMIO gap, irqchip, PIT, exits. */
#define _GNU_SOURCE
#include "kvm.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "evloop.h"
#include "vcpu.h"

#define KVM_TSS_ADDR 0xfffbd000ull
#define KVM_IDENTITY_MAP_ADDR 0xfffbc000ull

static int kvm_fail(struct vm *vm, const char *what)
{
	int err = errno ? errno : EINVAL;

	snprintf(vm->exit_msg, sizeof(vm->exit_msg), "%s: %s", what, strerror(err));
	kvm_vm_destroy(vm);
	return -err;
}

static int kvm_set_slot(struct vm *vm, uint32_t slot, uint64_t gpa, void *host, uint64_t size)
{
	struct kvm_userspace_memory_region r = {
		.slot = slot,
		.guest_phys_addr = gpa,
		.memory_size = size,
		.userspace_addr = (uint64_t)(uintptr_t)host,
	};

	return ioctl(vm->vm_fd, KVM_SET_USER_MEMORY_REGION, &r);
}

int kvm_vm_create(struct vm *vm, uint64_t mem_size, int mem_fd)
{
	uint64_t low = mem_size < VM_GAP_START ? mem_size : VM_GAP_START;
	struct kvm_pit_config pit = { .flags = 0 };
	int api;

	vm->kvm_fd = vm->vm_fd = -1;
	pthread_mutex_init(&vm->lock, NULL);
	pthread_cond_init(&vm->cond, NULL);
	vm->kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (vm->kvm_fd < 0)
		return kvm_fail(vm, "open /dev/kvm");
	api = ioctl(vm->kvm_fd, KVM_GET_API_VERSION, 0);
	if (api != KVM_API_VERSION) {
		errno = ENOTSUP;
		return kvm_fail(vm, "KVM API version mismatch");
	}
	if (ioctl(vm->kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_IRQCHIP) <= 0 ||
	    ioctl(vm->kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_USER_MEMORY) <= 0) {
		errno = ENOTSUP;
		return kvm_fail(vm, "KVM lacks IRQCHIP or USER_MEMORY");
	}
	vm->vm_fd = ioctl(vm->kvm_fd, KVM_CREATE_VM, 0);
	if (vm->vm_fd < 0)
		return kvm_fail(vm, "KVM_CREATE_VM");
	fcntl(vm->vm_fd, F_SETFD, FD_CLOEXEC);
	if (ioctl(vm->vm_fd, KVM_SET_TSS_ADDR, KVM_TSS_ADDR) < 0)
		return kvm_fail(vm, "KVM_SET_TSS_ADDR");
	{
		uint64_t idmap = KVM_IDENTITY_MAP_ADDR;

		if (ioctl(vm->vm_fd, KVM_SET_IDENTITY_MAP_ADDR, &idmap) < 0)
			return kvm_fail(vm, "KVM_SET_IDENTITY_MAP_ADDR");
	}

	/* A snapshot's memory file is mapped copy-on-write: sandboxes share its pages. */
	vm->mem = mmap(NULL, mem_size, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_NORESERVE | (mem_fd >= 0 ? 0 : MAP_ANONYMOUS), mem_fd, 0);
	if (vm->mem == MAP_FAILED) {
		vm->mem = NULL;
		return kvm_fail(vm, "mmap guest RAM");
	}
	vm->mem_size = mem_size;
	if (kvm_set_slot(vm, 0, 0, vm->mem, low) < 0)
		return kvm_fail(vm, "KVM_SET_USER_MEMORY_REGION");
	if (mem_size > low &&
	    kvm_set_slot(vm, 1, VM_GAP_END, vm->mem + low, mem_size - low) < 0)
		return kvm_fail(vm, "KVM_SET_USER_MEMORY_REGION (high)");

	if (ioctl(vm->vm_fd, KVM_CREATE_IRQCHIP, 0) < 0)
		return kvm_fail(vm, "KVM_CREATE_IRQCHIP");
	if (ioctl(vm->vm_fd, KVM_CREATE_PIT2, &pit) < 0)
		return kvm_fail(vm, "KVM_CREATE_PIT2");
	return 0;
}

void kvm_vm_destroy(struct vm *vm)
{
	for (int i = 0; i < vm->nr_vcpus; i++) {
		vcpu_destroy(vm->vcpus[i]);
		vm->vcpus[i] = NULL;
	}
	vm->nr_vcpus = 0;
	if (vm->mem) {
		munmap(vm->mem, vm->mem_size);
		vm->mem = NULL;
	}
	if (vm->vm_fd >= 0)
		close(vm->vm_fd);
	if (vm->kvm_fd >= 0)
		close(vm->kvm_fd);
	vm->vm_fd = vm->kvm_fd = -1;
}

int vm_add_mmio(struct vm *vm, uint64_t base, uint64_t len,
		void (*access)(void *, uint64_t, void *, uint32_t, bool), void *opaque)
{
	if (vm->nr_mmio >= VM_MAX_MMIO_DEVS)
		return -ENOSPC;
	if (base + len < base)
		return -EINVAL;
	vm->mmio[vm->nr_mmio++] = (struct vm_mmio_dev){ base, len, access, opaque };
	return 0;
}

int vm_add_pio(struct vm *vm, uint16_t base, uint16_t len,
	       void (*access)(void *, uint16_t, uint8_t *, uint32_t, bool), void *opaque)
{
	if (vm->nr_pio >= VM_MAX_PIO_DEVS)
		return -ENOSPC;
	if (!len || (uint32_t)base + len > 0x10000u)
		return -EINVAL;
	vm->pio[vm->nr_pio++] = (struct vm_pio_dev){ base, len, access, opaque };
	return 0;
}

int vm_irq_line(struct vm *vm, uint32_t gsi, int level)
{
	struct kvm_irq_level irq = { .irq = gsi, .level = (uint32_t)level };

	if (vm->vm_fd < 0)
		return -EBADF;
	return ioctl(vm->vm_fd, KVM_IRQ_LINE, &irq) < 0 ? -errno : 0;
}

void vm_request_exit(struct vm *vm, int reason, const char *msg)
{
	pthread_mutex_lock(&vm->lock);
	if (vm->exit_reason == VM_RUNNING) {
		vm->exit_reason = reason;
		snprintf(vm->exit_msg, sizeof(vm->exit_msg), "%s", msg ? msg : "");
	}
	pthread_cond_broadcast(&vm->cond); /* release parked vCPUs and pausers */
	pthread_mutex_unlock(&vm->lock);
	for (int i = 0; i < vm->nr_vcpus; i++)
		vcpu_kick(vm->vcpus[i]);
	if (vm->loop)
		evloop_stop(vm->loop);
}

/* The guest RAM slots as kvm_vm_create() made them: slot 0 below the gap, slot 1 above it. */
static int kvm_slots(const struct vm *vm, struct kvm_userspace_memory_region r[2])
{
	uint64_t low = vm->mem_size < VM_GAP_START ? vm->mem_size : VM_GAP_START;

	r[0] = (struct kvm_userspace_memory_region){
		.slot = 0, .guest_phys_addr = 0, .memory_size = low,
		.userspace_addr = (uint64_t)(uintptr_t)vm->mem,
	};
	r[1] = (struct kvm_userspace_memory_region){
		.slot = 1, .guest_phys_addr = VM_GAP_END, .memory_size = vm->mem_size - low,
		.userspace_addr = (uint64_t)(uintptr_t)(vm->mem + low),
	};
	return vm->mem_size > low ? 2 : 1;
}

int kvm_dirty_log_enable(struct vm *vm)
{
	struct kvm_userspace_memory_region r[2];
	int n = kvm_slots(vm, r);

	/* api.rst, KVM_SET_USER_MEMORY_REGION: an existing slot's flags may be modified. */
	for (int i = 0; i < n; i++) {
		r[i].flags = KVM_MEM_LOG_DIRTY_PAGES;
		if (ioctl(vm->vm_fd, KVM_SET_USER_MEMORY_REGION, &r[i]) < 0)
			return -errno;
	}
	return 0;
}

int kvm_dirty_log_collect(struct vm *vm, uint64_t *bits)
{
	struct kvm_userspace_memory_region r[2];
	int n = kvm_slots(vm, r), ret = 0;
	uint64_t *log = NULL, first = 0;

	for (int i = 0; i < n && !ret; i++) {
		uint64_t pages = r[i].memory_size >> 12, words = (pages + 63) / 64;
		/* KVM copies ALIGN(npages, BITS_PER_LONG) / 8 bytes; the whole struct zeroed (api.rst 4.8) */
		struct kvm_dirty_log dl;

		free(log);
		log = calloc(words ? words : 1, sizeof(*log));
		if (!log)
			return -ENOMEM;
		memset(&dl, 0, sizeof(dl));
		dl.slot = r[i].slot;
		dl.dirty_bitmap = log;
		if (ioctl(vm->vm_fd, KVM_GET_DIRTY_LOG, &dl) < 0) {
			ret = -errno;
			break;
		}
		for (uint64_t p = 0; p < pages; p++)
			if (log[p >> 6] & (1ull << (p & 63)))
				bits[(first + p) >> 6] |= 1ull << ((first + p) & 63);
		first += pages;
	}
	free(log);
	return ret;
}
