/* Direct Linux boot (64-bit boot protocol): vmlinux ELF or bzImage, initrd, command line, e820. */
#ifndef SMOLVM_BOOT_H
#define SMOLVM_BOOT_H

#include <stddef.h>
#include <stdint.h>

struct vm;

struct boot_info {
	uint64_t entry;     /* 64-bit entry point (GPA) */
	uint64_t zero_page; /* struct boot_params, passed in rsi */
	uint64_t pml4;      /* identity page tables covering 4 GiB */
	uint64_t gdt;
	uint16_t gdt_limit;
};

/*
 * Load kernel (ELF vmlinux or bzImage) and optional initrd into guest RAM and
 * write zero page, command line, e820 map, GDT and page tables. vm RAM must
 * exist. On error returns -errno with a reason in err.
 */
int boot_load(struct vm *vm, const char *kernel_path, const char *initrd_path,
	      const char *cmdline, struct boot_info *out, char *err, size_t errlen);

#endif
