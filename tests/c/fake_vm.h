/* A fake VM for device tests and fuzz harnesses: guest RAM in a heap buffer, vm.h's calls, MMIO as a vCPU does it. */
#ifndef SMOLVM_FAKE_VM_H
#define SMOLVM_FAKE_VM_H

#include <stdbool.h>
#include <stdint.h>

#include "vm.h"

/*
 * fake_vm.c defines vm_add_mmio() (a table of up to VM_MAX_MMIO_DEVS devices),
 * vm_irq_line() (counts rising edges of each fake VM, any thread; ignores a
 * struct vm that fake_vm_new() did not make) and vm_request_exit() (records
 * reason and message), so a device links without vm.c or KVM.
 */

/*
 * A VM with ram bytes of zeroed, page-aligned guest RAM at GPA 0 and no KVM
 * (kvm_fd and vm_fd -1, so devices fall back from ioeventfd/irqfd); loop may be
 * NULL. A test that wants real KVM sets kvm_fd and vm_fd itself. Never NULL.
 * Up to 8 live at once; make and free them on one thread (devices use them on any).
 */
struct vm *fake_vm_new(uint64_t ram, struct evloop *loop);

/* Free RAM and the VM (after every device on it; NULL is fine). Closes no fd. */
void fake_vm_free(struct vm *vm);

/* vm_irq_line(vm, gsi, 1) calls so far. Any thread. */
int fake_vm_irq_edges(struct vm *vm);

/* The MMIO device registered last (CHECKs there is one). */
struct vm_mmio_dev *fake_vm_dev(struct vm *vm);

/* A 32-bit read or write of the last device's register at off, as a vCPU makes it (this thread is the vCPU). */
uint32_t fake_vm_mr(struct vm *vm, uint64_t off);
void fake_vm_mw(struct vm *vm, uint64_t off, uint32_t v);

/* An access of len bytes (any width) to the last device at off. */
void fake_vm_access(struct vm *vm, uint64_t off, void *data, uint32_t len, bool is_write);

#endif
