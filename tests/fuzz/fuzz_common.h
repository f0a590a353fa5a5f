/*
 * Shared by the libFuzzer harnesses of the VMM's devices: FUZZ_CHECK and a
 * reader of the fuzzer's input. The fakes are the C device tests' own
 * (tests/c/fake_*.h: the VM with guest RAM in a heap buffer, a poll()-based
 * evloop run inline by the harness, in-memory snapshot sections); their .c
 * files are linked in (tests/fuzz/fuzz_targets.py).
 */
#ifndef SMOLVM_FUZZ_COMMON_H
#define SMOLVM_FUZZ_COMMON_H

#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../c/fake_loop.h"
#include "../c/fake_snap.h"
#include "../c/fake_test.h"
#include "../c/fake_vm.h"

/* A harness's own check: fake_test.h's CHECK, which reports and aborts (a crash to libFuzzer). */
#define FUZZ_CHECK(cond) CHECK(cond)

/* ---- input reader: a cursor over the fuzzer's bytes; reads past the end give zeros ---- */

struct fuzz_in {
	const uint8_t *p;
	size_t n, off;
};

static inline bool fuzz_more(const struct fuzz_in *in)
{
	return in->off < in->n;
}

static inline uint8_t fuzz_u8(struct fuzz_in *in)
{
	return in->off < in->n ? in->p[in->off++] : 0;
}

static inline uint16_t fuzz_u16(struct fuzz_in *in)
{
	uint16_t lo = fuzz_u8(in);

	return (uint16_t)(lo | (uint16_t)fuzz_u8(in) << 8);
}

static inline uint32_t fuzz_u32(struct fuzz_in *in)
{
	uint32_t lo = fuzz_u16(in);

	return lo | (uint32_t)fuzz_u16(in) << 16;
}

static inline uint64_t fuzz_u64(struct fuzz_in *in)
{
	uint64_t lo = fuzz_u32(in);

	return lo | (uint64_t)fuzz_u32(in) << 32;
}

/* Copy up to len input bytes to dst (zero-filled when the input runs out). */
static inline void fuzz_bytes(struct fuzz_in *in, void *dst, size_t len)
{
	size_t have = in->n - in->off < len ? in->n - in->off : len;

	memcpy(dst, in->p + in->off, have);
	memset((uint8_t *)dst + have, 0, len - have);
	in->off += have;
}

#endif
