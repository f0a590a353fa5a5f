/* A 16550A UART at COM1 (0x3f8, IRQ 4): transmit-only console with THRE interrupts. */
#ifndef SMOLVM_SERIAL_H
#define SMOLVM_SERIAL_H

#include <stdbool.h>
#include <stdint.h>

struct vm;
struct serial;

#define SERIAL_PORT 0x3f8u /* COM1: ports SERIAL_PORT .. SERIAL_PORT + 7 */
#define SERIAL_NR_PORTS 8u

/* Create the UART; transmitted bytes are written to out_fd (-1 = dropped). Returns NULL on ENOMEM. */
struct serial *serial_new(struct vm *vm, int out_fd);
void serial_free(struct serial *s);

/* Port access at offset 0..7 from the base, one byte, on a vCPU thread. */
void serial_io(struct serial *s, uint16_t off, uint8_t *data, bool is_write);

/* The same as a port-bus device (vm_add_pio(vm, SERIAL_PORT, SERIAL_NR_PORTS, serial_pio, s)):
 * one-byte accesses go to serial_io, wider reads see 0xff. */
void serial_pio(void *s, uint16_t off, uint8_t *data, uint32_t size, bool is_write);

struct snap_writer;
struct snap_reader;

/* Register file into / out of a snapshot (section SNAP_DEV_SERIAL). Restore returns 0 or -EINVAL. */
void serial_save(struct serial *s, struct snap_writer *w);
int serial_restore(struct serial *s, const struct snap_reader *r);

#endif
