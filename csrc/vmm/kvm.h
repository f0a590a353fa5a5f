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

#endif
