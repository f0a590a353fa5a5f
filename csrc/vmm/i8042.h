/* The i8042 keyboard controller's command port (0x64), as far as Linux needs it: the reset line. */
#ifndef SMOLVM_I8042_H
#define SMOLVM_I8042_H

#include <stdbool.h>
#include <stdint.h>

struct vm;

#define I8042_PORT 0x64u

/*
 * Port access at offset 0 of I8042_PORT, vCPU thread: reads say nothing is pending (0),
 * the pulse-reset command (0xfe, one byte) stops the VM with VM_EXIT_RESET. opaque is the vm.
 */
void i8042_io(void *opaque, uint16_t off, uint8_t *data, uint32_t size, bool is_write);

/* Claim I8042_PORT on vm's port bus (vm_add_pio). Returns 0 or -errno. */
int i8042_add(struct vm *vm);

#endif
