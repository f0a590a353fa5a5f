/* io_uring rings limited to the opcodes their owner submits (IORING_REGISTER_RESTRICTIONS). */
#ifndef SMOLVM_URING_LIMIT_H
#define SMOLVM_URING_LIMIT_H

#include <errno.h>
#include <liburing.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define URING_LIMIT_MAX_OPS 8

/*
 * Create a ring that starts disabled (IORING_SETUP_R_DISABLED): the owner may
 * register what it needs (an eventfd) before uring_limit_enable(). Seccomp
 * does not see what io_uring's workers do, so a ring is confined by opcode
 * instead: needs Linux 5.10 or later. Returns 0 or -errno.
 */
static inline int uring_limit_init(unsigned entries, struct io_uring *ring)
{
	return io_uring_queue_init(entries, ring, IORING_SETUP_R_DISABLED);
}

/*
 * Allow only the SQE opcodes ops[0..n) and no io_uring_register() operation
 * at all from now on, then enable the ring. Returns 0 or -errno.
 */
static inline int uring_limit_enable(struct io_uring *ring, const unsigned char *ops, unsigned n)
{
	struct io_uring_restriction res[URING_LIMIT_MAX_OPS];
	int ret;

	if (n > URING_LIMIT_MAX_OPS)
		return -E2BIG;
	memset(res, 0, sizeof(res));
	for (unsigned i = 0; i < n; i++) {
		res[i].opcode = IORING_RESTRICTION_SQE_OP;
		res[i].sqe_op = ops[i];
	}
	/* the raw calls: Debian's liburing 2.3 declares the wrappers but does not export them */
	ret = (int)syscall(__NR_io_uring_register, ring->ring_fd, IORING_REGISTER_RESTRICTIONS, res, n);
	if (ret < 0)
		return -errno;
	ret = (int)syscall(__NR_io_uring_register, ring->ring_fd, IORING_REGISTER_ENABLE_RINGS, NULL, 0);
	return ret < 0 ? -errno : 0;
}

#endif
