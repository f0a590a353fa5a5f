/* Kernel loader: parses vmlinux ELF or bzImage, lays out zero page, cmdline, initrd, GDT, page tables. */
#define _GNU_SOURCE
#include "boot.h"

#include <asm/bootparam.h>
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "mptable.h"
#include "vm.h"

#define BOOT_GDT_ADDR 0x500ull
#define BOOT_ZERO_PAGE 0x7000ull
#define BOOT_PML4 0x9000ull
#define BOOT_PDPT 0xa000ull
#define BOOT_PD 0xb000ull /* four pages: 4 GiB of 2 MiB pages */
#define BOOT_CMDLINE 0x20000ull
#define BOOT_CMDLINE_MAX 4096ull
#define BOOT_HIMEM 0x100000ull
#define BOOT_HDR_MAGIC 0x53726448u /* "HdrS" */

struct boot_file {
	const uint8_t *data;
	size_t size;
};

static int boot_err(char *err, size_t errlen, int ret, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
	return ret;
}

static int boot_map(const char *path, struct boot_file *f, char *err, size_t errlen)
{
	struct stat st;
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	int ret = 0;

	f->data = NULL;
	f->size = 0;
	if (fd < 0)
		return boot_err(err, errlen, -errno, "open %s: %s", path, strerror(errno));
	if (fstat(fd, &st) < 0 || st.st_size <= 0) {
		ret = boot_err(err, errlen, -EINVAL, "%s: empty or unreadable", path);
		goto out;
	}
	f->data = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
	if (f->data == MAP_FAILED) {
		f->data = NULL;
		ret = boot_err(err, errlen, -errno, "mmap %s: %s", path, strerror(errno));
		goto out;
	}
	f->size = (size_t)st.st_size;
out:
	close(fd);
	return ret;
}

static void boot_unmap(struct boot_file *f)
{
	if (f->data)
		munmap((void *)f->data, f->size);
}

/* Copy bytes into guest RAM through the gate. */
static int boot_copy(struct vm *vm, uint64_t gpa, const void *src, uint64_t len, uint64_t zero_to)
{
	uint8_t *dst = vm_gpa(vm, gpa, zero_to > len ? zero_to : len);

	if (!dst)
		return -EFAULT;
	memcpy(dst, src, len);
	if (zero_to > len)
		memset(dst + len, 0, zero_to - len);
	return 0;
}

static int boot_elf(struct vm *vm, const struct boot_file *k, struct boot_params *zp,
		    uint64_t *entry, uint64_t *kernel_end, char *err, size_t errlen)
{
	const Elf64_Ehdr *eh = (const void *)k->data;
	int loaded = 0;

	if (k->size < sizeof(*eh) || eh->e_ident[EI_CLASS] != ELFCLASS64 ||
	    eh->e_machine != EM_X86_64 || eh->e_phentsize != sizeof(Elf64_Phdr) ||
	    eh->e_phoff > k->size || (uint64_t)eh->e_phnum * sizeof(Elf64_Phdr) > k->size - eh->e_phoff)
		return boot_err(err, errlen, -ENOEXEC, "kernel ELF is not a 64-bit x86 vmlinux");
	*kernel_end = 0;
	for (int i = 0; i < eh->e_phnum; i++) {
		const Elf64_Phdr *ph = (const void *)(k->data + eh->e_phoff + i * sizeof(Elf64_Phdr));

		if (ph->p_type != PT_LOAD)
			continue;
		if (ph->p_offset > k->size || ph->p_filesz > k->size - ph->p_offset ||
		    ph->p_filesz > ph->p_memsz)
			return boot_err(err, errlen, -ENOEXEC, "kernel ELF segment %d out of file", i);
		if (boot_copy(vm, ph->p_paddr, k->data + ph->p_offset, ph->p_filesz, ph->p_memsz) < 0)
			return boot_err(err, errlen, -ENOMEM,
					"kernel segment at 0x%llx+0x%llx does not fit in guest RAM",
					(unsigned long long)ph->p_paddr, (unsigned long long)ph->p_memsz);
		if (ph->p_paddr + ph->p_memsz > *kernel_end)
			*kernel_end = ph->p_paddr + ph->p_memsz;
		loaded++;
	}
	if (!loaded)
		return boot_err(err, errlen, -ENOEXEC, "kernel ELF has no loadable segment");
	*entry = eh->e_entry;
	zp->hdr.boot_flag = 0xaa55;
	zp->hdr.header = BOOT_HDR_MAGIC;
	zp->hdr.version = 0x020f;
	zp->hdr.kernel_alignment = 0x1000000;
	zp->hdr.initrd_addr_max = 0x7fffffff;
	zp->hdr.cmdline_size = BOOT_CMDLINE_MAX - 1;
	return 0;
}

static int boot_bzimage(struct vm *vm, const struct boot_file *k, struct boot_params *zp,
			uint64_t *entry, uint64_t *kernel_end, char *err, size_t errlen)
{
	const struct setup_header *h;
	size_t hdr_end, setup_size;
	uint8_t setup_sects;

	if (k->size < 0x264)
		return boot_err(err, errlen, -ENOEXEC, "kernel image too small for a bzImage");
	h = (const void *)(k->data + 0x1f1);
	if (h->header != BOOT_HDR_MAGIC || h->version < 0x020c || !(h->xloadflags & XLF_KERNEL_64))
		return boot_err(err, errlen, -ENOEXEC,
				"kernel is neither a vmlinux ELF nor a bzImage with a 64-bit entry");
	setup_sects = h->setup_sects ? h->setup_sects : 4;
	setup_size = ((size_t)setup_sects + 1) * 512;
	if (setup_size >= k->size)
		return boot_err(err, errlen, -ENOEXEC, "bzImage setup larger than the file");
	/* Setup header runs from 0x1f1 to the end of the jump at 0x200. */
	hdr_end = 0x202 + k->data[0x201];
	if (hdr_end > 0x1f1 + sizeof(zp->hdr))
		hdr_end = 0x1f1 + sizeof(zp->hdr);
	memcpy(&zp->hdr, k->data + 0x1f1, hdr_end - 0x1f1);
	if (boot_copy(vm, BOOT_HIMEM, k->data + setup_size, k->size - setup_size,
		      h->init_size > k->size - setup_size ? h->init_size : 0) < 0)
		return boot_err(err, errlen, -ENOMEM, "bzImage does not fit in guest RAM");
	*entry = BOOT_HIMEM + 0x200;
	*kernel_end = BOOT_HIMEM + (h->init_size > k->size - setup_size ? h->init_size
									: k->size - setup_size);
	zp->hdr.code32_start = BOOT_HIMEM;
	return 0;
}

static void boot_e820_add(struct boot_params *zp, uint64_t addr, uint64_t size, uint32_t type)
{
	if (zp->e820_entries >= E820_MAX_ENTRIES_ZEROPAGE || !size)
		return;
	zp->e820_table[zp->e820_entries].addr = addr;
	zp->e820_table[zp->e820_entries].size = size;
	zp->e820_table[zp->e820_entries].type = type;
	zp->e820_entries++;
}

static int boot_page_tables(struct vm *vm)
{
	uint64_t *pml4 = vm_gpa(vm, BOOT_PML4, 4096);
	uint64_t *pdpt = vm_gpa(vm, BOOT_PDPT, 4096);
	uint64_t *pd = vm_gpa(vm, BOOT_PD, 4 * 4096);

	if (!pml4 || !pdpt || !pd)
		return -EFAULT;
	memset(pml4, 0, 4096);
	memset(pdpt, 0, 4096);
	pml4[0] = BOOT_PDPT | 0x3; /* present, writable */
	for (uint64_t i = 0; i < 4; i++)
		pdpt[i] = (BOOT_PD + i * 4096) | 0x3;
	for (uint64_t i = 0; i < 4 * 512; i++)
		pd[i] = (i << 21) | 0x83; /* present, writable, 2 MiB page */
	return 0;
}

static int boot_gdt(struct vm *vm)
{
	/* null, null, code64 (0x10), data (0x18), 64-bit TSS (0x20, two slots) */
	static const uint64_t gdt[6] = {
		0, 0, 0x00af9b000000ffffull, 0x00cf93000000ffffull, 0x00008b0000000067ull, 0,
	};

	return boot_copy(vm, BOOT_GDT_ADDR, gdt, sizeof(gdt), 0);
}

int boot_load(struct vm *vm, const char *kernel_path, const char *initrd_path,
	      const char *cmdline, struct boot_info *out, char *err, size_t errlen)
{
	struct boot_file k = { 0 }, rd = { 0 };
	struct boot_params *zp = vm_gpa(vm, BOOT_ZERO_PAGE, sizeof(*zp));
	uint64_t kernel_end = 0, low_end;
	size_t cmdlen = strlen(cmdline);
	int ret;

	if (!zp)
		return boot_err(err, errlen, -ENOMEM, "guest RAM too small for the zero page");
	memset(zp, 0, sizeof(*zp));
	if (cmdlen >= BOOT_CMDLINE_MAX)
		return boot_err(err, errlen, -E2BIG, "kernel command line longer than %llu bytes",
				(unsigned long long)BOOT_CMDLINE_MAX - 1);
	ret = boot_map(kernel_path, &k, err, errlen);
	if (ret)
		goto out;
	if (k.size >= 4 && !memcmp(k.data, ELFMAG, SELFMAG))
		ret = boot_elf(vm, &k, zp, &out->entry, &kernel_end, err, errlen);
	else
		ret = boot_bzimage(vm, &k, zp, &out->entry, &kernel_end, err, errlen);
	if (ret)
		goto out;

	zp->hdr.type_of_loader = 0xff;
	zp->hdr.loadflags |= LOADED_HIGH | CAN_USE_HEAP;
	zp->hdr.heap_end_ptr = 0xfe00;
	if (boot_copy(vm, BOOT_CMDLINE, cmdline, cmdlen + 1, 0) < 0) {
		ret = boot_err(err, errlen, -ENOMEM, "guest RAM too small for the command line");
		goto out;
	}
	zp->hdr.cmd_line_ptr = (uint32_t)BOOT_CMDLINE;

	low_end = vm->mem_size < VM_GAP_START ? vm->mem_size : VM_GAP_START;
	if (initrd_path) {
		uint64_t top = low_end, addr;

		ret = boot_map(initrd_path, &rd, err, errlen);
		if (ret)
			goto out;
		if (zp->hdr.initrd_addr_max && top > (uint64_t)zp->hdr.initrd_addr_max + 1)
			top = (uint64_t)zp->hdr.initrd_addr_max + 1;
		addr = rd.size < top ? ((top - rd.size) & ~0xfffull) : 0;
		if (addr < kernel_end || boot_copy(vm, addr, rd.data, rd.size, 0) < 0) {
			ret = boot_err(err, errlen, -ENOMEM,
				       "initrd (%zu bytes) does not fit in guest RAM above the kernel; "
				       "give the VM more memory", rd.size);
			goto out;
		}
		zp->hdr.ramdisk_image = (uint32_t)addr;
		zp->hdr.ramdisk_size = (uint32_t)rd.size;
		zp->ext_ramdisk_image = (uint32_t)(addr >> 32);
		zp->ext_ramdisk_size = (uint32_t)((uint64_t)rd.size >> 32);
	}

	boot_e820_add(zp, 0, MPTABLE_ADDR, 1);
	boot_e820_add(zp, MPTABLE_ADDR, 0x100000 - MPTABLE_ADDR, 2);
	boot_e820_add(zp, BOOT_HIMEM, low_end - BOOT_HIMEM, 1);
	if (vm->mem_size > low_end)
		boot_e820_add(zp, VM_GAP_END, vm->mem_size - low_end, 1);

	if (boot_page_tables(vm) < 0 || boot_gdt(vm) < 0) {
		ret = boot_err(err, errlen, -EFAULT, "guest RAM too small for boot structures");
		goto out;
	}
	out->zero_page = BOOT_ZERO_PAGE;
	out->pml4 = BOOT_PML4;
	out->gdt = BOOT_GDT_ADDR;
	out->gdt_limit = 6 * 8 - 1;
	ret = 0;
out:
	boot_unmap(&rd);
	boot_unmap(&k);
	return ret;
}
