/* Creating and tearing down a KVM VM: /dev/kvm, guest RAM, in-kernel irqchip and PIT. */
#ifndef SMOLVM_KVM_H
#define SMOLVM_KVM_H

#include "vm.h"

/*
 * Open /dev/kvm, create the VM with `mem_size` bytes of RAM (anonymous, or
 * mem_fd mapped MAP_PRIVATE when mem_fd >= 0), the in-kernel irqchip and PIT. vm must be zeroed. On failure everything is
 * released and -errno returned, with a reason in vm->exit_msg.
 */
int kvm_vm_create(struct vm *vm, uint64_t mem_size, int mem_fd);

/* Release everything kvm_vm_create() and later setup acquired. Idempotent. */
void kvm_vm_destroy(struct vm *vm);

/*
 * Have KVM log the guest RAM pages vCPUs write (KVM_MEM_LOG_DIRTY_PAGES on its slots).
 * Setup thread, before the vCPUs run. 0 or -errno (then nothing is logged).
 */
int kvm_dirty_log_enable(struct vm *vm);

/*
 * OR the pages logged since the last call into bits (one per 4 KiB page of vm->mem, in
 * mapping order) with KVM_GET_DIRTY_LOG, which clears KVM's log. VM paused. 0 or -errno.
 */
int kvm_dirty_log_collect(struct vm *vm, uint64_t *bits);

#endif
