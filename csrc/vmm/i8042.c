/* i8042 command port: status reads as idle, command 0xfe resets (stops) the VM. */
#include "i8042.h"

#include <string.h>

#include "vm.h"

#define I8042_CMD_RESET 0xfe

void i8042_io(void *opaque, uint16_t off, uint8_t *data, uint32_t size, bool is_write)
{
	struct vm *vm = opaque;

	(void)off;
	if (!is_write) {
		memset(data, 0, size); /* no output byte, no input pending */
		return;
	}
	if (size == 1 && data[0] == I8042_CMD_RESET)
		vm_request_exit(vm, VM_EXIT_RESET, "guest reset (i8042)");
}

int i8042_add(struct vm *vm)
{
	return vm_add_pio(vm, I8042_PORT, 1, i8042_io, vm);
}
