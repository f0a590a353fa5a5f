/* vCPU threads: creation, CPUID/MSR/LAPIC setup, 64-bit boot registers and the KVM_RUN loop. */
#ifndef SMOLVM_VCPU_H
#define SMOLVM_VCPU_H

#include <pthread.h>
#include <stdint.h>

struct vm;
struct kvm_run;
struct kvm_cpuid2;
struct xstate;

struct vcpu {
	struct vm *vm;
	int id;
	int fd;
	struct kvm_run *run;
	size_t run_size;
	pthread_t thread;
	int started;
	struct kvm_cpuid2 *cpuid; /* what KVM_SET_CPUID2 got; kept for snapshots */
	size_t cpuid_size;
	struct xstate *xstate; /* XSTATE_PORT handler state, made on first use (vCPU thread) */
	int status_fd; /* the thread's /proc/thread-self/status, opened before its seccomp filter; -1 */
};

/* Create vCPU `id` of vm (CPUID, MSRs, LAPIC LINT0/1 set). Returns 0 or -errno. */
int vcpu_create(struct vm *vm, int id, struct vcpu **out);

/* Point the boot vCPU at a 64-bit kernel entry: long mode, identity page tables, rsi = zero page. */
int vcpu_setup_long_mode(struct vcpu *v, uint64_t entry, uint64_t zero_page,
			 uint64_t pml4, uint64_t gdt, uint16_t gdt_limit);

/*
 * Start the thread running KVM_RUN until the VM exits. Signals SIGUSR1 interrupt it.
 * Before its first KVM_RUN the thread loads the vCPU seccomp filter (vm->seccomp_mode);
 * if that fails the VM stops with VM_EXIT_ERROR.
 */
int vcpu_start(struct vcpu *v);

/*
 * Park every vCPU outside KVM_RUN with pending I/O completed, so VM and vCPU
 * state can be read or written consistently; vm_resume() lets them go on.
 * Loop thread (or any single controller thread). Returns 0 or -errno.
 */
int vm_pause(struct vm *vm);
void vm_resume(struct vm *vm);

/* Make KVM_RUN return soon (immediate_exit + SIGUSR1). Any thread; NULL ok. */
void vcpu_kick(struct vcpu *v);

/* Join (if started) and free. NULL ok. */
void vcpu_destroy(struct vcpu *v);

/* Install the no-op SIGUSR1 handler the kick relies on. Call once per process. */
int vcpu_signals_init(void);

#endif
