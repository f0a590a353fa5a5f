/* Unit test of csrc/vmm/xstate.c against a real KVM vCPU: XSAVE/XRSTOR semantics and hostile images from the guest. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "vm.h"
#include "xstate.h"

#define SKIP_RC 77
#define MEM (1u << 20)
#define AREA 4096u
#define HDR 512u

static int failures;

#define CHECK(cond, ...)                                              \
	do {                                                          \
		if (!(cond)) {                                        \
			printf("FAIL %s:%d: ", __FILE__, __LINE__);    \
			printf(__VA_ARGS__);                          \
			printf("\n");                                 \
			failures++;                                   \
		}                                                     \
	} while (0)

struct rig {
	struct vm vm;
	int vcpu_fd;
	struct kvm_cpuid2 *cpuid;
	struct xstate *xs;
	uint32_t ymm_off; /* component 2 (AVX upper halves), 256 bytes */
};

static uint64_t bv_of(const uint8_t *a)
{
	uint64_t v;

	memcpy(&v, a + HDR, 8);
	return v;
}

static void set_bv(uint8_t *a, uint64_t v)
{
	memcpy(a + HDR, &v, 8);
}

/* Send one request through guest memory, as the guest kernel does, and return its status. */
static int32_t request(struct rig *r, uint32_t op, uint64_t gpa, uint32_t size, uint64_t mask)
{
	struct xstate_req q = { op, size, gpa, mask, -ENOSYS, 0 };
	const uint32_t req_gpa = 0x1000;
	int32_t status;

	memcpy(r->vm.mem + req_gpa, &q, sizeof(q));
	xstate_request(r->xs, &r->vm, r->vcpu_fd, req_gpa);
	memcpy(&status, r->vm.mem + req_gpa + offsetof(struct xstate_req, status), sizeof(status));
	return status;
}

static int rig_init(struct rig *r)
{
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC), vm_fd;

	memset(r, 0, sizeof(*r));
	if (kvm < 0) {
		printf("skip: no /dev/kvm (%s)\n", strerror(errno));
		return SKIP_RC;
	}
	vm_fd = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm_fd < 0) {
		printf("skip: KVM_CREATE_VM: %s\n", strerror(errno));
		return SKIP_RC;
	}
	r->vcpu_fd = ioctl(vm_fd, KVM_CREATE_VCPU, 0);
	if (r->vcpu_fd < 0) {
		printf("skip: KVM_CREATE_VCPU: %s\n", strerror(errno));
		return SKIP_RC;
	}
	r->cpuid = calloc(1, sizeof(*r->cpuid) + 256 * sizeof(struct kvm_cpuid_entry2));
	r->cpuid->nent = 256;
	if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, r->cpuid) < 0 ||
	    ioctl(r->vcpu_fd, KVM_SET_CPUID2, r->cpuid) < 0) {
		printf("FAIL: CPUID: %s\n", strerror(errno));
		return 1;
	}
	for (uint32_t i = 0; i < r->cpuid->nent; i++)
		if (r->cpuid->entries[i].function == 0xd && r->cpuid->entries[i].index == 2)
			r->ymm_off = r->cpuid->entries[i].ebx;
	if (!r->ymm_off) {
		printf("skip: this CPU has no AVX state component\n");
		return SKIP_RC;
	}
	r->vm.kvm_fd = kvm;
	r->vm.vm_fd = vm_fd;
	r->vm.mem = calloc(1, MEM);
	r->vm.mem_size = MEM;
	if (xstate_new(kvm, r->cpuid, &r->xs)) {
		printf("FAIL: xstate_new\n");
		return 1;
	}
	return 0;
}

static void fill(uint8_t *p, size_t n, uint8_t seed)
{
	for (size_t i = 0; i < n; i++)
		p[i] = (uint8_t)(seed + i * 7);
}

int main(void)
{
	struct rig r;
	const uint64_t A = 0x10000, B = 0x20000, C = 0x30000, ALL = ~0ull;
	uint8_t pat[256], pat2[256];
	int ret = rig_init(&r);

	if (ret)
		return ret;
	uint8_t *a = r.vm.mem + A, *b = r.vm.mem + B, *c = r.vm.mem + C;

	CHECK(request(&r, XSTATE_PROBE, 0, 0, 0) == 0, "probe");
	CHECK(request(&r, XSTATE_SAVE, A, AREA, ALL) == 0, "save");
	CHECK(a[0] == 0x7f && a[1] == 0x03, "FCW of a fresh vCPU is 0x037f (got %02x%02x)", a[1], a[0]);

	/* Load a YMM pattern (XSTATE_BV bit 2), read it back. */
	fill(pat, sizeof(pat), 0x11);
	memcpy(b, a, AREA);
	memcpy(b + r.ymm_off, pat, sizeof(pat));
	set_bv(b, bv_of(b) | 4 | 3);
	CHECK(request(&r, XSTATE_RESTORE, B, AREA, ALL) == 0, "restore pattern");
	memset(c, 0xee, AREA);
	memset(c + HDR, 0, 64);
	CHECK(request(&r, XSTATE_SAVE, C, AREA, ALL) == 0, "save after restore");
	CHECK(memcmp(c + r.ymm_off, pat, sizeof(pat)) == 0, "YMM pattern survives restore+save");
	CHECK(bv_of(c) & 4, "XSTATE_BV has AVX after loading it");
	CHECK(c[4000] == 0xee, "SAVE leaves bytes past the components alone");

	/* RESTORE with AVX outside the mask leaves AVX as it was. */
	fill(pat2, sizeof(pat2), 0x55);
	memcpy(b + r.ymm_off, pat2, sizeof(pat2));
	CHECK(request(&r, XSTATE_RESTORE, B, AREA, 3) == 0, "restore x87+SSE only");
	CHECK(request(&r, XSTATE_SAVE, C, AREA, ALL) == 0, "save");
	CHECK(memcmp(c + r.ymm_off, pat, sizeof(pat)) == 0, "YMM untouched by a masked restore");

	/* SAVE with AVX outside the mask does not write AVX or its XSTATE_BV bit. */
	memset(c + r.ymm_off, 0xaa, 256);
	set_bv(c, 0);
	CHECK(request(&r, XSTATE_SAVE, C, AREA, 3) == 0, "masked save");
	CHECK(c[r.ymm_off] == 0xaa && c[r.ymm_off + 255] == 0xaa, "masked save left YMM bytes");
	CHECK(!(bv_of(c) & 4), "masked save left XSTATE_BV bit 2");

	/* XSTATE_BV bit 2 clear with bit 2 in the mask: AVX goes to its initial (zero) state. */
	set_bv(b, bv_of(b) & ~4ull);
	CHECK(request(&r, XSTATE_RESTORE, B, AREA, ALL) == 0, "init restore");
	CHECK(request(&r, XSTATE_SAVE, C, AREA, ALL) == 0, "save");
	for (int i = 0; i < 256; i++)
		if (c[r.ymm_off + i]) {
			CHECK(0, "YMM not zeroed by an init restore at byte %d", i);
			break;
		}

	/* Put the pattern back, then hostile images: each refused, the state unchanged. */
	memcpy(b + r.ymm_off, pat, sizeof(pat));
	set_bv(b, bv_of(b) | 7);
	CHECK(request(&r, XSTATE_RESTORE, B, AREA, ALL) == 0, "restore pattern again");
	struct {
		const char *what;
		size_t off;
		uint64_t value;
		int bytes;
	} bad[] = {
		{ "compacted XCOMP_BV", HDR + 8, 1ull << 63 | 7, 8 },
		{ "reserved header bytes", HDR + 16, 1, 8 },
		{ "XSTATE_BV bit KVM does not offer", HDR, 1ull << 62 | 7, 8 },
		{ "reserved MXCSR bits", 24, 0xffffffffull, 4 },
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		memcpy(c, b, AREA);
		memcpy(c + bad[i].off, &bad[i].value, (size_t)bad[i].bytes);
		memset(c + r.ymm_off, 0x99, 256);
		CHECK(request(&r, XSTATE_RESTORE, C, AREA, ALL) == -EINVAL, "%s refused", bad[i].what);
		CHECK(request(&r, XSTATE_SAVE, A, AREA, ALL) == 0, "save after %s", bad[i].what);
		CHECK(memcmp(a + r.ymm_off, pat, sizeof(pat)) == 0, "state kept after %s", bad[i].what);
	}
	CHECK(request(&r, XSTATE_RESTORE, B, 100, ALL) == -EINVAL, "short area");
	CHECK(request(&r, XSTATE_SAVE, B, r.ymm_off + 10, ALL) == -EINVAL, "area too short for AVX");
	CHECK(request(&r, XSTATE_SAVE, MEM - 100, AREA, ALL) == -EFAULT, "area past guest RAM");
	CHECK(request(&r, XSTATE_SAVE, ~0ull - 10, AREA, ALL) == -EFAULT, "area wrapping around");
	CHECK(request(&r, 9, A, AREA, ALL) == -EINVAL, "unknown op");
	xstate_request(r.xs, &r.vm, r.vcpu_fd, MEM - 4);   /* request block past RAM: ignored */
	xstate_request(r.xs, &r.vm, r.vcpu_fd, 0xfffffff0); /* and far out */
	{
		struct xstate *xs = r.xs;

		r.xs = NULL; /* xstate_new failed: only PROBE answers */
		CHECK(request(&r, XSTATE_PROBE, 0, 0, 0) == 0, "probe without a handler state");
		CHECK(request(&r, XSTATE_SAVE, A, AREA, ALL) == -ENOSYS, "save without a handler state");
		r.xs = xs;
	}

	/* Random images and masks: only 0 or -EINVAL, never a crash; a good image still loads. */
	srand(1);
	for (int i = 0; i < 3000; i++) {
		uint64_t mask = ((uint64_t)rand() << 32) ^ (uint64_t)rand();

		for (uint32_t j = 0; j < AREA; j++)
			c[j] = (uint8_t)rand();
		if (i % 3 == 0) /* a valid-looking header, random contents */
			memset(c + HDR + 8, 0, 56), set_bv(c, bv_of(c) & 0xe7);
		if (i % 2 == 0) /* a valid MXCSR */
			c[26] = c[27] = 0, c[25] &= 0x7f;
		int32_t st = request(&r, XSTATE_RESTORE, C, AREA, mask);
		CHECK(st == 0 || st == -EINVAL, "random image %d: status %d", i, st);
	}
	CHECK(request(&r, XSTATE_RESTORE, B, AREA, ALL) == 0, "good image after fuzzing");
	CHECK(request(&r, XSTATE_SAVE, A, AREA, ALL) == 0, "save");
	CHECK(memcmp(a + r.ymm_off, pat, sizeof(pat)) == 0, "pattern after fuzzing");

	xstate_free(r.xs);
	free(r.cpuid);
	free(r.vm.mem);
	close(r.vcpu_fd);
	close(r.vm.vm_fd);
	close(r.vm.kvm_fd);
	if (failures) {
		printf("%d xstate checks failed\n", failures);
		return 1;
	}
	printf("all xstate tests passed\n");
	return 0;
}
