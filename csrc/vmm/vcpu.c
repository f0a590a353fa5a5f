/* vCPU setup and run loop: exits are decoded here and handed to port-I/O and MMIO devices. */
#define _GNU_SOURCE
#include "vcpu.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "vm.h"
#include "sysfilter.h"
#include "xstate.h"

#define VCPU_MAX_CPUID 256
#define MSR_IA32_MISC_ENABLE 0x1a0
#define APIC_LVT0 0x350
#define APIC_LVT1 0x360
#define APIC_MODE_EXTINT 0x7
#define APIC_MODE_NMI 0x4

static uint64_t vcpu_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void vcpu_on_sigusr1(int sig)
{
	(void)sig;
}

int vcpu_signals_init(void)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = vcpu_on_sigusr1; /* no SA_RESTART: KVM_RUN returns EINTR */
	sigemptyset(&sa.sa_mask);
	return sigaction(SIGUSR1, &sa, NULL) < 0 ? -errno : 0;
}

static int vcpu_set_cpuid(struct vcpu *v)
{
	struct kvm_cpuid2 *cpuid;
	size_t sz = sizeof(*cpuid) + VCPU_MAX_CPUID * sizeof(struct kvm_cpuid_entry2);
	int ret = 0;

	cpuid = calloc(1, sz);
	if (!cpuid)
		return -ENOMEM;
	cpuid->nent = VCPU_MAX_CPUID;
	if (ioctl(v->vm->kvm_fd, KVM_GET_SUPPORTED_CPUID, cpuid) < 0) {
		ret = -errno;
		goto out;
	}
	for (uint32_t i = 0; i < cpuid->nent; i++) {
		struct kvm_cpuid_entry2 *e = &cpuid->entries[i];

		switch (e->function) {
		case 1:
			/* Initial APIC id; the hypervisor bit. */
			e->ebx = (e->ebx & 0x00ffffffu) | ((uint32_t)v->id << 24);
			e->ecx |= 1u << 31;
			break;
		case 0xb:
		case 0x1f:
			e->edx = (uint32_t)v->id; /* x2APIC id */
			break;
		default:
			break;
		}
	}
	if (ioctl(v->fd, KVM_SET_CPUID2, cpuid) < 0) {
		ret = -errno;
		goto out;
	}
	v->cpuid = cpuid;
	v->cpuid_size = sizeof(*cpuid) + cpuid->nent * sizeof(struct kvm_cpuid_entry2);
	return 0;
out:
	free(cpuid);
	return ret;
}

static int vcpu_set_msrs(struct vcpu *v)
{
	struct {
		struct kvm_msrs hdr;
		struct kvm_msr_entry e[1];
	} m;

	memset(&m, 0, sizeof(m));
	m.hdr.nmsrs = 1;
	m.e[0].index = MSR_IA32_MISC_ENABLE;
	m.e[0].data = 1; /* fast strings */
	return ioctl(v->fd, KVM_SET_MSRS, &m) < 0 ? -errno : 0;
}

static int vcpu_set_lapic(struct vcpu *v)
{
	struct kvm_lapic_state lapic;
	uint32_t *lvt0, *lvt1;

	if (ioctl(v->fd, KVM_GET_LAPIC, &lapic) < 0)
		return -errno;
	lvt0 = (uint32_t *)(void *)&lapic.regs[APIC_LVT0];
	lvt1 = (uint32_t *)(void *)&lapic.regs[APIC_LVT1];
	*lvt0 = (*lvt0 & ~0x700u) | (APIC_MODE_EXTINT << 8);
	*lvt1 = (*lvt1 & ~0x700u) | (APIC_MODE_NMI << 8);
	return ioctl(v->fd, KVM_SET_LAPIC, &lapic) < 0 ? -errno : 0;
}

static int vcpu_set_fpu(struct vcpu *v)
{
	struct kvm_fpu fpu;

	memset(&fpu, 0, sizeof(fpu));
	fpu.fcw = 0x37f;
	fpu.mxcsr = 0x1f80;
	return ioctl(v->fd, KVM_SET_FPU, &fpu) < 0 ? -errno : 0;
}

int vcpu_create(struct vm *vm, int id, struct vcpu **out)
{
	struct vcpu *v = calloc(1, sizeof(*v));
	int mmap_size, ret;

	if (!v)
		return -ENOMEM;
	v->vm = vm;
	v->id = id;
	v->status_fd = -1;
	v->fd = ioctl(vm->vm_fd, KVM_CREATE_VCPU, id);
	if (v->fd < 0) {
		ret = -errno;
		goto fail;
	}
	fcntl(v->fd, F_SETFD, FD_CLOEXEC);
	mmap_size = ioctl(vm->kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (mmap_size <= 0) {
		ret = -EINVAL;
		goto fail;
	}
	v->run_size = (size_t)mmap_size;
	v->run = mmap(NULL, v->run_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->fd, 0);
	if (v->run == MAP_FAILED) {
		v->run = NULL;
		ret = -errno;
		goto fail;
	}
	ret = vcpu_set_cpuid(v);
	if (!ret)
		ret = vcpu_set_msrs(v);
	if (!ret)
		ret = vcpu_set_fpu(v);
	if (!ret)
		ret = vcpu_set_lapic(v);
	if (ret)
		goto fail;
	*out = v;
	return 0;
fail:
	vcpu_destroy(v);
	return ret;
}

static void vcpu_seg(struct kvm_segment *s, uint16_t sel, uint8_t type, int code)
{
	memset(s, 0, sizeof(*s));
	s->base = 0;
	s->limit = 0xffffffff;
	s->selector = sel;
	s->type = type;
	s->present = 1;
	s->s = 1;
	s->g = 1;
	s->l = code ? 1 : 0;
	s->db = code ? 0 : 1;
}

int vcpu_setup_long_mode(struct vcpu *v, uint64_t entry, uint64_t zero_page,
			 uint64_t pml4, uint64_t gdt, uint16_t gdt_limit)
{
	struct kvm_sregs sregs;
	struct kvm_regs regs;

	if (ioctl(v->fd, KVM_GET_SREGS, &sregs) < 0)
		return -errno;
	vcpu_seg(&sregs.cs, 0x10, 0xb, 1);
	vcpu_seg(&sregs.ds, 0x18, 0x3, 0);
	sregs.es = sregs.fs = sregs.gs = sregs.ss = sregs.ds;
	memset(&sregs.tr, 0, sizeof(sregs.tr));
	sregs.tr.selector = 0x20;
	sregs.tr.limit = 0x67;
	sregs.tr.type = 0xb; /* busy 64-bit TSS */
	sregs.tr.present = 1;
	memset(&sregs.ldt, 0, sizeof(sregs.ldt));
	sregs.ldt.unusable = 1;
	sregs.gdt.base = gdt;
	sregs.gdt.limit = gdt_limit;
	sregs.idt.base = 0;
	sregs.idt.limit = 0;
	sregs.cr0 = 0x80000011ull;  /* PG | ET | PE */
	sregs.cr3 = pml4;
	sregs.cr4 = 0x20;           /* PAE */
	sregs.efer = 0x500;         /* LME | LMA */
	if (ioctl(v->fd, KVM_SET_SREGS, &sregs) < 0)
		return -errno;
	memset(&regs, 0, sizeof(regs));
	regs.rflags = 0x2;
	regs.rip = entry;
	regs.rsi = zero_page;
	return ioctl(v->fd, KVM_SET_REGS, &regs) < 0 ? -errno : 0;
}

/* The compat guest kernel's XSAVE/XRSTOR request (xstate.h); served only when vm->xstate_port. */
static void vcpu_xstate(struct vcpu *v, const uint8_t *data)
{
	uint32_t gpa;

	if (!v->xstate && v->cpuid)
		(void)xstate_new(v->vm->kvm_fd, v->cpuid, &v->xstate); /* on failure: -ENOSYS */
	memcpy(&gpa, data, sizeof(gpa));
	xstate_request(v->xstate, v->vm, v->fd, gpa);
}

/* Port I/O: the XSTATE port, then the devices on the port bus (vm_add_pio), then quiet defaults. */
static void vcpu_pio(struct vcpu *v, uint16_t port, uint8_t *data, uint32_t size, int is_write)
{
	struct vm *vm = v->vm;

	if (port == XSTATE_PORT && size == 4 && is_write && vm->xstate_port) {
		vcpu_xstate(v, data);
		return;
	}
	for (int i = 0; i < vm->nr_pio; i++) {
		struct vm_pio_dev *d = &vm->pio[i];

		if (port >= d->base && port - d->base < d->len) {
			d->access(d->opaque, (uint16_t)(port - d->base), data, size, is_write);
			return;
		}
	}
	if (!is_write)
		memset(data, port == 0x61 ? 0 : 0xff, size); /* port B (0x61): quiet */
}

static void vcpu_mmio(struct vcpu *v, uint64_t addr, uint8_t *data, uint32_t len, int is_write)
{
	struct vm *vm = v->vm;

	for (int i = 0; i < vm->nr_mmio; i++) {
		struct vm_mmio_dev *d = &vm->mmio[i];

		if (addr >= d->base && addr - d->base < d->len) {
			d->access(d->opaque, addr - d->base, data, len, is_write);
			return;
		}
	}
	if (!is_write)
		memset(data, 0xff, len);
}

static void vcpu_internal_error(struct vcpu *v)
{
	struct kvm_run *r = v->run;
	struct kvm_regs regs;
	char msg[256];
	int n;

	memset(&regs, 0, sizeof(regs));
	ioctl(v->fd, KVM_GET_REGS, &regs);
	n = snprintf(msg, sizeof(msg), "KVM internal error on vCPU %d: suberror %u, rip 0x%llx, data",
		     v->id, r->internal.suberror, (unsigned long long)regs.rip);
	for (uint32_t i = 0; i < r->internal.ndata && i < 4 && n > 0 && (size_t)n < sizeof(msg); i++)
		n += snprintf(msg + n, sizeof(msg) - (size_t)n, " %llx",
			      (unsigned long long)r->internal.data[i]);
	vm_request_exit(v->vm, VM_EXIT_ERROR, msg);
}

/* Complete pending I/O (KVM_RUN with immediate_exit), then wait while a pause is asked for. */
static void vcpu_park(struct vcpu *v)
{
	struct vm *vm = v->vm;

	v->run->immediate_exit = 1;
	ioctl(v->fd, KVM_RUN, 0);
	v->run->immediate_exit = 0;
	pthread_mutex_lock(&vm->lock);
	vm->nr_paused++;
	pthread_cond_broadcast(&vm->cond);
	while (vm->pause_req && vm->exit_reason == VM_RUNNING)
		pthread_cond_wait(&vm->cond, &vm->lock);
	vm->nr_paused--;
	pthread_cond_broadcast(&vm->cond);
	pthread_mutex_unlock(&vm->lock);
}

int vm_pause(struct vm *vm)
{
	int ret = 0;

	pthread_mutex_lock(&vm->lock);
	vm->pause_req = 1;
	pthread_mutex_unlock(&vm->lock);
	for (int i = 0; i < vm->nr_vcpus; i++)
		vcpu_kick(vm->vcpus[i]);
	pthread_mutex_lock(&vm->lock);
	while (vm->nr_paused < vm->nr_started && vm->exit_reason == VM_RUNNING)
		pthread_cond_wait(&vm->cond, &vm->lock);
	if (vm->exit_reason != VM_RUNNING)
		ret = -ESHUTDOWN;
	pthread_mutex_unlock(&vm->lock);
	return ret;
}

void vm_resume(struct vm *vm)
{
	pthread_mutex_lock(&vm->lock);
	vm->pause_req = 0;
	pthread_cond_broadcast(&vm->cond);
	while (vm->nr_paused > 0 && vm->exit_reason == VM_RUNNING)
		pthread_cond_wait(&vm->cond, &vm->lock);
	pthread_mutex_unlock(&vm->lock);
}

/* Load this thread's seccomp filter (its /proc status opened first, for STATUS). 0 or -errno. */
static int vcpu_confine(struct vcpu *v)
{
	struct sysfilter_params p = { v->vm->seccomp_mode, -1, v->vm->console_fd };
	char err[200];
	int ret;

	v->status_fd = open("/proc/thread-self/status", O_RDONLY | O_CLOEXEC);
	ret = sysfilter_install(SYSFILTER_ROLE_VCPU, &p, err, sizeof(err));
	if (ret)
		vm_request_exit(v->vm, VM_EXIT_ERROR, err);
	return ret;
}

static void *vcpu_thread(void *arg)
{
	struct vcpu *v = arg;
	struct vm *vm = v->vm;
	struct kvm_run *r = v->run;
	char msg[128];
	int first = 1;

	if (vcpu_confine(v) < 0)
		return NULL;
	while (vm->exit_reason == VM_RUNNING) {
		if (vm->pause_req) {
			vcpu_park(v);
			continue;
		}
		if (first && v->id == 0 && vm->console_fd >= 0) {
			dprintf(vm->console_fd, "smolvm-vmm: t_first_run_us=%llu\n",
				(unsigned long long)((vcpu_now_ns() - vm->t_start_ns) / 1000));
		}
		first = 0;
		if (ioctl(v->fd, KVM_RUN, 0) < 0) {
			if (errno == EINTR || errno == EAGAIN) {
				r->immediate_exit = 0;
				continue;
			}
			snprintf(msg, sizeof(msg), "KVM_RUN on vCPU %d: %s", v->id, strerror(errno));
			vm_request_exit(vm, VM_EXIT_ERROR, msg);
			break;
		}
		switch (r->exit_reason) {
		case KVM_EXIT_IO:
			if (r->io.size > 4 || r->io.data_offset > v->run_size ||
			    (uint64_t)r->io.size * r->io.count > v->run_size - r->io.data_offset)
				break;
			for (uint32_t i = 0; i < r->io.count; i++)
				vcpu_pio(v, r->io.port, (uint8_t *)r + r->io.data_offset + i * r->io.size,
					 r->io.size, r->io.direction == KVM_EXIT_IO_OUT);
			break;
		case KVM_EXIT_MMIO:
			if (r->mmio.len <= sizeof(r->mmio.data))
				vcpu_mmio(v, r->mmio.phys_addr, r->mmio.data, r->mmio.len,
					  r->mmio.is_write);
			break;
		case KVM_EXIT_HLT:
			break;
		case KVM_EXIT_SHUTDOWN:
			vm_request_exit(vm, VM_EXIT_SHUTDOWN, "guest triple fault or shutdown");
			break;
		case KVM_EXIT_SYSTEM_EVENT:
			vm_request_exit(vm, VM_EXIT_RESET, "guest system event");
			break;
		case KVM_EXIT_INTERNAL_ERROR:
			vcpu_internal_error(v);
			break;
		case KVM_EXIT_FAIL_ENTRY:
			snprintf(msg, sizeof(msg), "KVM entry failed on vCPU %d: reason 0x%llx", v->id,
				 (unsigned long long)r->fail_entry.hardware_entry_failure_reason);
			vm_request_exit(vm, VM_EXIT_ERROR, msg);
			break;
		case KVM_EXIT_INTR:
			break;
		default:
			snprintf(msg, sizeof(msg), "unhandled KVM exit %u on vCPU %d", r->exit_reason,
				 v->id);
			vm_request_exit(vm, VM_EXIT_ERROR, msg);
			break;
		}
	}
	return NULL;
}

int vcpu_start(struct vcpu *v)
{
	int ret = pthread_create(&v->thread, NULL, vcpu_thread, v);

	if (ret)
		return -ret;
	v->started = 1;
	pthread_mutex_lock(&v->vm->lock);
	v->vm->nr_started++;
	pthread_mutex_unlock(&v->vm->lock);
	return 0;
}

void vcpu_kick(struct vcpu *v)
{
	if (!v || !v->run)
		return;
	v->run->immediate_exit = 1;
	if (v->started)
		pthread_kill(v->thread, SIGUSR1);
}

void vcpu_destroy(struct vcpu *v)
{
	if (!v)
		return;
	if (v->started) {
		vcpu_kick(v);
		pthread_join(v->thread, NULL);
	}
	if (v->run)
		munmap(v->run, v->run_size);
	if (v->fd >= 0)
		close(v->fd);
	if (v->status_fd >= 0)
		close(v->status_fd);
	free(v->cpuid);
	xstate_free(v->xstate);
	free(v);
}
