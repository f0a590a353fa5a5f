/* MP table writer (MP spec 1.4): processors, one ISA bus, the IOAPIC, IRQ 0-15 routed pin for pin. */
#include "mptable.h"

#include <errno.h>
#include <string.h>

#include "vm.h"

#define MP_IOAPIC_ADDR 0xfec00000u
#define MP_LAPIC_ADDR 0xfee00000u
#define MP_NR_ISA_IRQS 16

struct mp_float {
	char sig[4];
	uint32_t physptr;
	uint8_t length, spec, checksum, feature[5];
} __attribute__((packed));

struct mp_config {
	char sig[4];
	uint16_t length;
	uint8_t spec, checksum;
	char oem[8], product[12];
	uint32_t oemptr;
	uint16_t oemsize, count;
	uint32_t lapic;
	uint16_t extlen;
	uint8_t extsum, reserved;
} __attribute__((packed));

struct mp_cpu {
	uint8_t type, apicid, apicver, flags;
	uint32_t signature, features, reserved[2];
} __attribute__((packed));

struct mp_bus {
	uint8_t type, busid;
	char bustype[6];
} __attribute__((packed));

struct mp_ioapic {
	uint8_t type, apicid, apicver, flags;
	uint32_t addr;
} __attribute__((packed));

struct mp_irq {
	uint8_t type, irqtype;
	uint16_t irqflag;
	uint8_t srcbus, srcbusirq, dstapic, dstirq;
} __attribute__((packed));

static uint8_t mptable_checksum(const uint8_t *p, size_t len)
{
	uint8_t sum = 0;

	while (len--)
		sum = (uint8_t)(sum + *p++);
	return (uint8_t)(0 - sum);
}

int mptable_write(struct vm *vm, int nr_cpus)
{
	uint8_t *base = vm_gpa(vm, MPTABLE_ADDR, MPTABLE_MAX);
	struct mp_float *mpf;
	struct mp_config *cfg;
	uint8_t *p;
	uint16_t count = 0;
	uint8_t ioapic_id = (uint8_t)nr_cpus;

	if (!base)
		return -EFAULT;
	if (nr_cpus < 1 || nr_cpus > 254 ||
	    sizeof(*mpf) + sizeof(*cfg) + (size_t)nr_cpus * sizeof(struct mp_cpu) +
	    sizeof(struct mp_bus) + sizeof(struct mp_ioapic) +
	    (MP_NR_ISA_IRQS + 2) * sizeof(struct mp_irq) > MPTABLE_MAX)
		return -EINVAL;
	memset(base, 0, MPTABLE_MAX);
	mpf = (struct mp_float *)(void *)base;
	cfg = (struct mp_config *)(void *)(base + sizeof(*mpf));
	p = (uint8_t *)(cfg + 1);

	for (int i = 0; i < nr_cpus; i++) {
		struct mp_cpu c = {
			.type = 0, .apicid = (uint8_t)i, .apicver = 0x14,
			.flags = (uint8_t)(1 | (i == 0 ? 2 : 0)),
			.signature = 0x600, .features = 0x201, /* FPU | APIC */
		};
		memcpy(p, &c, sizeof(c));
		p += sizeof(c);
		count++;
	}
	{
		struct mp_bus b = { .type = 1, .busid = 0, .bustype = { 'I', 'S', 'A', ' ', ' ', ' ' } };
		memcpy(p, &b, sizeof(b));
		p += sizeof(b);
		count++;
	}
	{
		struct mp_ioapic io = { .type = 2, .apicid = ioapic_id, .apicver = 0x11,
					.flags = 1, .addr = MP_IOAPIC_ADDR };
		memcpy(p, &io, sizeof(io));
		p += sizeof(io);
		count++;
	}
	for (int irq = 0; irq < MP_NR_ISA_IRQS; irq++) {
		struct mp_irq e = { .type = 3, .irqtype = 0, .irqflag = 0, .srcbus = 0,
				    .srcbusirq = (uint8_t)irq, .dstapic = ioapic_id,
				    .dstirq = (uint8_t)irq };
		memcpy(p, &e, sizeof(e));
		p += sizeof(e);
		count++;
	}
	{
		/* Local interrupts: LINT0 ExtINT, LINT1 NMI, on every local APIC. */
		struct mp_irq extint = { .type = 4, .irqtype = 3, .dstapic = 0xff, .dstirq = 0 };
		struct mp_irq nmi = { .type = 4, .irqtype = 1, .dstapic = 0xff, .dstirq = 1 };
		memcpy(p, &extint, sizeof(extint));
		p += sizeof(extint);
		memcpy(p, &nmi, sizeof(nmi));
		p += sizeof(nmi);
		count += 2;
	}

	memcpy(cfg->sig, "PCMP", 4);
	cfg->length = (uint16_t)(p - (uint8_t *)cfg);
	cfg->spec = 4;
	memcpy(cfg->oem, "SMOLVM  ", 8);
	memcpy(cfg->product, "MICROVM     ", 12);
	cfg->count = count;
	cfg->lapic = MP_LAPIC_ADDR;
	cfg->checksum = mptable_checksum((uint8_t *)cfg, cfg->length);

	memcpy(mpf->sig, "_MP_", 4);
	mpf->physptr = (uint32_t)(MPTABLE_ADDR + sizeof(*mpf));
	mpf->length = 1;
	mpf->spec = 4;
	mpf->checksum = mptable_checksum((uint8_t *)mpf, sizeof(*mpf));
	return 0;
}
