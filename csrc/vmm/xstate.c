/* Guest-kernel XSAVE/XRSTOR on the kernel's behalf through KVM_GET_XSAVE/KVM_SET_XSAVE (compat profile). */
#define _GNU_SOURCE
#include "xstate.h"

#include <errno.h>
#include <linux/kvm.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>

#include "vm.h"

#define XSTATE_MAX 64
#define XSTATE_LEGACY 512u                /* FXSAVE region */
#define XSTATE_HDR (XSTATE_LEGACY + 64u) /* legacy + XSAVE header */
#define XSTATE_KVM_MIN 4096u              /* sizeof(struct kvm_xsave) */

/* Legacy region: x87 is bytes 0..23 and 32..159, MXCSR+MASK 24..31, XMM0-15 160..415. */
#define LEG_X87_A 0u
#define LEG_X87_A_LEN 24u
#define LEG_MXCSR 24u
#define LEG_X87_B 32u
#define LEG_X87_B_LEN 128u
#define LEG_XMM 160u
#define LEG_XMM_LEN 256u

struct xstate {
	uint64_t features;          /* what KVM offers (CPUID 0xD.0 EDX:EAX) */
	uint32_t off[XSTATE_MAX];   /* standard-format offset of component i >= 2 */
	uint32_t len[XSTATE_MAX];   /* its size (0: not offered) */
	uint32_t kvm_size;          /* bytes of a KVM image */
	int xsave2;                 /* KVM_GET_XSAVE2 needed (image > 4 KiB) */
	uint8_t *cur;               /* the vCPU's image, kvm_size bytes */
};

int xstate_new(int kvm_fd, const struct kvm_cpuid2 *cpuid, struct xstate **out)
{
	struct xstate *xs = calloc(1, sizeof(*xs));
	int sz;

	if (!xs)
		return -ENOMEM;
	for (uint32_t i = 0; i < cpuid->nent; i++) {
		const struct kvm_cpuid_entry2 *e = &cpuid->entries[i];

		if (e->function != 0xd)
			continue;
		if (e->index == 0)
			xs->features = e->eax | ((uint64_t)e->edx << 32);
		else if (e->index >= 2 && e->index < XSTATE_MAX && e->eax &&
			 (uint64_t)e->ebx + e->eax <= (1u << 20)) {
			xs->off[e->index] = e->ebx;
			xs->len[e->index] = e->eax;
		}
	}
	for (int i = 2; i < XSTATE_MAX; i++)
		if (!xs->len[i])
			xs->features &= ~(1ull << i);
	xs->features |= 3; /* x87 and SSE always */
	sz = ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_XSAVE2);
	xs->kvm_size = sz > (int)XSTATE_KVM_MIN ? (uint32_t)sz : XSTATE_KVM_MIN;
	xs->xsave2 = sz > (int)XSTATE_KVM_MIN;
	for (int i = 2; i < XSTATE_MAX; i++)
		if (xs->len[i] && xs->off[i] + xs->len[i] > xs->kvm_size)
			xs->features &= ~(1ull << i); /* cannot be carried: never offered */
	xs->cur = calloc(1, xs->kvm_size);
	if (!xs->cur) {
		free(xs);
		return -ENOMEM;
	}
	*out = xs;
	return 0;
}

void xstate_free(struct xstate *xs)
{
	if (!xs)
		return;
	free(xs->cur);
	free(xs);
}

static uint64_t rd64(const uint8_t *p)
{
	uint64_t v;

	memcpy(&v, p, sizeof(v));
	return v;
}

static void wr64(uint8_t *p, uint64_t v)
{
	memcpy(p, &v, sizeof(v));
}

static int xstate_get(struct xstate *xs, int vcpu_fd)
{
	unsigned long req = xs->xsave2 ? KVM_GET_XSAVE2 : KVM_GET_XSAVE;

	return ioctl(vcpu_fd, req, xs->cur) < 0 ? -errno : 0;
}

/* The highest byte the components of rfbm need, so short areas are refused before any copy. */
static uint32_t xstate_need(const struct xstate *xs, uint64_t rfbm)
{
	uint32_t need = XSTATE_HDR;

	for (int i = 2; i < XSTATE_MAX; i++)
		if ((rfbm >> i & 1) && xs->off[i] + xs->len[i] > need)
			need = xs->off[i] + xs->len[i];
	return need;
}

/* Copy the parts named by rfbm from src to dst (both standard-format images). */
static void xstate_copy(const struct xstate *xs, uint8_t *dst, const uint8_t *src, uint64_t rfbm)
{
	if (rfbm & 1) {
		memcpy(dst + LEG_X87_A, src + LEG_X87_A, LEG_X87_A_LEN);
		memcpy(dst + LEG_X87_B, src + LEG_X87_B, LEG_X87_B_LEN);
	}
	if (rfbm & 2)
		memcpy(dst + LEG_XMM, src + LEG_XMM, LEG_XMM_LEN);
	if (rfbm & 6) /* MXCSR belongs to SSE and AVX both */
		memcpy(dst + LEG_MXCSR, src + LEG_MXCSR, 8);
	for (int i = 2; i < XSTATE_MAX; i++)
		if (rfbm >> i & 1)
			memcpy(dst + xs->off[i], src + xs->off[i], xs->len[i]);
}

/* Put the parts named by bits into their initial state in img. */
static void xstate_init_parts(const struct xstate *xs, uint8_t *img, uint64_t bits)
{
	if (bits & 1) {
		memset(img + LEG_X87_A, 0, LEG_X87_A_LEN);
		memset(img + LEG_X87_B, 0, LEG_X87_B_LEN);
		img[0] = 0x7f; /* FCW 0x037f */
		img[1] = 0x03;
	}
	if (bits & 2)
		memset(img + LEG_XMM, 0, LEG_XMM_LEN);
	for (int i = 2; i < XSTATE_MAX; i++)
		if (bits >> i & 1)
			memset(img + xs->off[i], 0, xs->len[i]);
}

int xstate_op(struct xstate *xs, int vcpu_fd, uint32_t op, uint8_t *area, uint32_t size, uint64_t mask)
{
	uint64_t rfbm = mask & xs->features, bv, cur_bv;
	uint8_t hdr[64];
	int ret;

	if (op == XSTATE_PROBE)
		return 0;
	if (op != XSTATE_SAVE && op != XSTATE_RESTORE)
		return -EINVAL;
	if (size < XSTATE_HDR || size < xstate_need(xs, rfbm))
		return -EINVAL;
	ret = xstate_get(xs, vcpu_fd);
	if (ret)
		return ret;
	cur_bv = rd64(xs->cur + XSTATE_LEGACY);
	if (op == XSTATE_SAVE) {
		xstate_copy(xs, area, xs->cur, rfbm);
		bv = rd64(area + XSTATE_LEGACY);
		wr64(area + XSTATE_LEGACY, (bv & ~rfbm) | (cur_bv & rfbm));
		return 0;
	}
	/* Read the header once: the guest may change the area while we look at it. */
	memcpy(hdr, area + XSTATE_LEGACY, sizeof(hdr));
	bv = rd64(hdr);
	if (rd64(hdr + 8) || rd64(hdr + 16) || (bv & ~xs->features))
		return -EINVAL; /* compacted form, reserved bytes, or features not offered */
	xstate_copy(xs, xs->cur, area, rfbm & bv);
	xstate_init_parts(xs, xs->cur, rfbm & ~bv);
	if (rfbm & 6)
		memcpy(xs->cur + LEG_MXCSR, area + LEG_MXCSR, 4); /* MXCSR_MASK is not loaded */
	bv = (cur_bv & ~rfbm) | (bv & rfbm);
	if (rfbm & 6)
		bv |= 2; /* KVM loads MXCSR only with SSE (or YMM) in XSTATE_BV; XMM is set either way */
	wr64(xs->cur + XSTATE_LEGACY, bv);
	if (ioctl(vcpu_fd, KVM_SET_XSAVE, xs->cur) < 0)
		return errno == EFAULT ? -EFAULT : -EINVAL; /* KVM refused the image: XRSTOR's #GP */
	return 0;
}

void xstate_request(struct xstate *xs, struct vm *vm, int vcpu_fd, uint32_t req_gpa)
{
	struct xstate_req *r = vm_gpa(vm, req_gpa, sizeof(*r)), q;
	uint8_t *area;
	int32_t status;

	if (!r)
		return; /* nowhere to answer: the guest sees its own -ENOSYS */
	memcpy(&q, r, sizeof(q));
	if (q.op == XSTATE_PROBE)
		status = 0;
	else if (!xs)
		status = -ENOSYS;
	else if (!(area = vm_gpa(vm, q.gpa, q.size)))
		status = -EFAULT;
	else
		status = xstate_op(xs, vcpu_fd, q.op, area, q.size, q.mask);
	memcpy(&r->status, &status, sizeof(status));
}
