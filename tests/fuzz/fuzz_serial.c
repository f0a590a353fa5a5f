/*
 * libFuzzer harness: the 16550A UART (csrc/vmm/serial.c), port by port as a guest
 * driver pokes it. Input: 2-byte records [port offset | 0x80 = read][value];
 * output goes to /dev/null so line flushes are exercised.
 */
#include "fuzz_common.h"

#include <fcntl.h>

#include "serial.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static struct vm vm;
	static int out = -2;
	struct fuzz_in in = { data, size, 0 };
	struct serial *s;

	if (out == -2)
		out = open("/dev/null", O_WRONLY | O_CLOEXEC);
	s = serial_new(&vm, out);
	FUZZ_CHECK(s);
	while (fuzz_more(&in)) {
		uint8_t op = fuzz_u8(&in), v = fuzz_u8(&in);

		/* the vCPU code hands the UART offsets 0..7 of its ports; wider ones check robustness */
		serial_io(s, (uint16_t)((op & 0x40) ? op & 0x3f : op & 7), &v, !(op & 0x80));
	}
	serial_free(s);
	return 0;
}
