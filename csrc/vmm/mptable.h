/* Intel MultiProcessor table: tells a guest without ACPI about its CPUs, IOAPIC and ISA IRQ routing. */
#ifndef SMOLVM_MPTABLE_H
#define SMOLVM_MPTABLE_H

#include <stdint.h>

struct vm;

/* Where the table goes: the last KiB of base memory, which Linux scans. */
#define MPTABLE_ADDR 0x9fc00ull
#define MPTABLE_MAX 0x400ull

/* Write the floating pointer and configuration table for nr_cpus CPUs. Returns 0 or -errno. */
int mptable_write(struct vm *vm, int nr_cpus);

#endif
