/* Guest-kernel XSAVE/XRSTOR served by the VMM (compat profile): the port contract and its handler. */
#ifndef SMOLVM_XSTATE_H
#define SMOLVM_XSTATE_H

#include <stdint.h>

/*
 * On hosts whose KVM emulates guest ring 0, guest user space runs natively
 * and uses every register of the host CPU (AVX, AVX-512, opmask), but the
 * emulated kernel cannot execute XSAVE/XRSTOR. The smolvm guest kernel (patch
 * kernel-config/patches/0002-smolvm-compat-xstate.patch, active only with the
 * smolvm_compat boot argument) therefore asks the VMM: a 32-bit OUT of the
 * guest-physical address of a struct xstate_req to XSTATE_PORT. The VMM
 * serves it with KVM_GET_XSAVE/KVM_SET_XSAVE on the calling vCPU and writes
 * `status`. The area at gpa is in the standard (non-compacted) XSAVE format,
 * component offsets from CPUID leaf 0xD; RFBM = mask & the features KVM offers.
 *
 * SAVE behaves like XSAVE: writes the legacy parts and components in RFBM and
 * XSTATE_BV's RFBM bits; everything else at gpa stays as it was.
 * RESTORE behaves like XRSTOR: for i in RFBM, loads component i if
 * XSTATE_BV[i] else initialises it; others stay. A malformed area (compacted
 * form, reserved header bytes, XSTATE_BV bits KVM does not offer, reserved
 * MXCSR bits) is -EINVAL and leaves the vCPU's state unchanged, as XRSTOR's #GP.
 * A request outside guest RAM, or an area smaller than the components asked
 * for, is -EFAULT/-EINVAL. Nothing a guest writes can stop the VMM.
 *
 * The guest side keeps its own copy of this layout: change both together.
 */
#define XSTATE_PORT 0xe510
#define XSTATE_PROBE 0u
#define XSTATE_SAVE 1u
#define XSTATE_RESTORE 2u

struct xstate_req {
	uint32_t op;
	uint32_t size;   /* bytes of the area at gpa */
	uint64_t gpa;    /* the XSAVE area */
	uint64_t mask;   /* requested-feature bitmap */
	int32_t status;  /* written by the VMM: 0 or -errno */
	uint32_t reserved;
} __attribute__((packed));

struct vm;
struct kvm_cpuid2;
struct xstate;

/* Per-vCPU handler state: the XSAVE layout from the vCPU's CPUID and a KVM image buffer. */
int xstate_new(int kvm_fd, const struct kvm_cpuid2 *cpuid, struct xstate **out);
void xstate_free(struct xstate *xs); /* NULL ok */

/* Serve the request block at req_gpa of vm for the vCPU vcpu_fd. vCPU thread, outside KVM_RUN. */
void xstate_request(struct xstate *xs, struct vm *vm, int vcpu_fd, uint32_t req_gpa);

/* The operation itself on a host buffer `area` of `size` bytes: 0 or -errno. */
int xstate_op(struct xstate *xs, int vcpu_fd, uint32_t op, uint8_t *area, uint32_t size, uint64_t mask);

#endif
