/* A 16550A UART at COM1 (0x3f8, IRQ 4): transmit-only console with THRE interrupts. */
#ifndef SMOLVM_SERIAL_H
#define SMOLVM_SERIAL_H

#include <stdbool.h>
#include <stdint.h>

struct vm;
struct serial;

/* Create the UART; transmitted bytes are written to out_fd (-1 = dropped). Returns NULL on ENOMEM. */
struct serial *serial_new(struct vm *vm, int out_fd);
void serial_free(struct serial *s);

/* Port access at offset 0..7 from the base, one byte, on a vCPU thread. */
void serial_io(struct serial *s, uint16_t off, uint8_t *data, bool is_write);

#endif
