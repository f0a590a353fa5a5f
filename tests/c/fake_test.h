/* What every C device test shares: CHECK, the name of the test running, a clock and test patterns. */
#ifndef SMOLVM_FAKE_TEST_H
#define SMOLVM_FAKE_TEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* The test running, for failure messages; each test sets it first. */
extern const char *cur_test;

/* Print where and what failed, then abort() (a crash to libFuzzer too, when a harness uses the fakes). */
_Noreturn void fake_test_fail(const char *file, int line, const char *what);

#define CHECK(cond)                                                  \
	do {                                                         \
		if (!(cond))                                         \
			fake_test_fail(__FILE__, __LINE__, #cond);   \
	} while (0)

/* CLOCK_MONOTONIC in milliseconds. */
int64_t fake_test_now_ms(void);

/* Fill p with len pseudo-random bytes; the same seed gives the same bytes. */
void fake_test_pattern(uint8_t *p, size_t len, uint32_t seed);

/* True if every one of the len bytes at p is v. */
bool fake_test_all(const uint8_t *p, size_t len, uint8_t v);

#endif
