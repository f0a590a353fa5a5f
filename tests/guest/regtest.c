/* Guest test program: do AVX / AVX-512 / opmask registers stay private to a process across switches and signals? */
#define _GNU_SOURCE
#include <cpuid.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <ucontext.h>
#include <unistd.h>

/*
 * regtest switch KIND ITER: fork once; parent and child each hold their own
 * pattern in a register (KIND: ymm = ymm7, zmm = zmm7 upper half and zmm31,
 * k = k5) across sched_yield(), and count iterations where the pattern came
 * back changed: ITER rounds, more (up to 50 * ITER) until ITER / 200 of them
 * switched. Prints "KIND switches=N bad=M" for each process.
 * regtest signal ITER: a signal handler that clobbers ymm7 must leave the
 * interrupted code's ymm7 intact. Prints "signal bad=M".
 * regtest badframe: a handler that marks its signal frame's XSAVE header
 * compacted; sigreturn must fail (the process dies of SIGSEGV).
 * regtest has KIND: exit 0 if the CPU and OS offer KIND.
 */

static volatile int *last; /* who ran last, shared by parent and child */
static volatile int *arrived; /* how many of the two have started, in the same shared page */

static int has(const char *kind)
{
	unsigned a, b, c, d, lo, hi;

	__cpuid(1, a, b, c, d);
	if (!(c & (1u << 27)) || !(c & (1u << 28))) /* OSXSAVE, AVX */
		return 0;
	__asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
	if ((lo & 6) != 6)
		return 0;
	if (!strcmp(kind, "ymm"))
		return 1;
	__cpuid_count(7, 0, a, b, c, d);
	return (b & (1u << 16)) && (lo & 0xe0) == 0xe0; /* AVX512F and its three states */
}

/* Load pat into the register(s), yield, store them to out; all in one asm so nothing else touches them. */
static void round_trip(const char *kind, const uint8_t *pat, uint8_t *out)
{
	if (!strcmp(kind, "ymm")) {
		__asm__ volatile("vmovdqu (%0), %%ymm7\n\t"
				 "mov %2, %%eax\n\t"
				 "syscall\n\t"
				 "vmovdqu %%ymm7, (%1)\n\t"
				 : : "r"(pat), "r"(out), "i"(SYS_sched_yield)
				 : "rax", "rcx", "r11", "memory", "xmm7");
	} else if (!strcmp(kind, "zmm")) {
		__asm__ volatile("vmovdqu64 (%0), %%zmm7\n\t"
				 "vmovdqu64 64(%0), %%zmm31\n\t"
				 "mov %2, %%eax\n\t"
				 "syscall\n\t"
				 "vmovdqu64 %%zmm7, (%1)\n\t"
				 "vmovdqu64 %%zmm31, 64(%1)\n\t"
				 : : "r"(pat), "r"(out), "i"(SYS_sched_yield)
				 : "rax", "rcx", "r11", "memory", "xmm7"); /* zmm31: unused by code built without AVX-512 */
	} else {
		__asm__ volatile("kmovq (%0), %%k5\n\t"
				 "mov %2, %%eax\n\t"
				 "syscall\n\t"
				 "kmovq %%k5, (%1)\n\t"
				 : : "r"(pat), "r"(out), "i"(SYS_sched_yield)
				 : "rax", "rcx", "r11", "memory"); /* k5: likewise */
	}
}

static int run_switch(const char *kind, long iter)
{
	uint8_t pat[128], out[128];
	size_t n = !strcmp(kind, "zmm") ? 128 : !strcmp(kind, "ymm") ? 32 : 8;
	long bad = 0, switches = 0;
	pid_t child;
	int me, status;

	last = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (last == MAP_FAILED)
		return 2;
	arrived = last + 1;
	child = fork();
	if (child < 0)
		return 2;
	me = child == 0 ? 1 : 2;
	for (size_t i = 0; i < n; i++)
		pat[i] = (uint8_t)(me * 0x35 + i * 3 + 1);
	/* Start together: on a fast KVM one process could otherwise run all its rounds alone. */
	__atomic_add_fetch((int *)arrived, 1, __ATOMIC_SEQ_CST);
	while (__atomic_load_n((int *)arrived, __ATOMIC_SEQ_CST) < 2)
		syscall(SYS_sched_yield);
	/* At least iter rounds, and on until iter / 200 of them switched (at most 50 * iter). */
	for (long i = 0; i < iter || (switches < iter / 200 && i < 50 * iter); i++) {
		*last = me;
		round_trip(kind, pat, out);
		if (*last != me)
			switches++;
		if (memcmp(pat, out, n))
			bad++;
	}
	printf("%s %s switches=%ld bad=%ld\n", kind, me == 1 ? "child" : "parent", switches, bad);
	fflush(stdout);
	if (child == 0)
		_exit(bad ? 1 : 0);
	if (waitpid(child, &status, 0) < 0)
		return 2;
	return bad || !WIFEXITED(status) || WEXITSTATUS(status) ? 1 : 0;
}

static void clobber(int sig)
{
	static const uint8_t junk[32] = { [0 ... 31] = 0xa5 };

	(void)sig;
	__asm__ volatile("vmovdqu (%0), %%ymm7\n\tvpaddd %%ymm7, %%ymm7, %%ymm7" : : "r"(junk) : "xmm7");
}

static int run_signal(long iter)
{
	uint8_t pat[32], out[32];
	long bad = 0;
	pid_t me = getpid();

	signal(SIGUSR1, clobber);
	for (size_t i = 0; i < sizeof(pat); i++)
		pat[i] = (uint8_t)(0x40 + i);
	for (long i = 0; i < iter; i++) {
		/* kill() delivers SIGUSR1 on the way back from the system call. */
		__asm__ volatile("vmovdqu (%0), %%ymm7\n\t"
				 "mov %2, %%eax\n\t"
				 "mov %3, %%edi\n\t"
				 "mov %4, %%esi\n\t"
				 "syscall\n\t"
				 "vmovdqu %%ymm7, (%1)\n\t"
				 : : "r"(pat), "r"(out), "i"(SYS_kill), "r"(me), "i"(SIGUSR1)
				 : "rax", "rdi", "rsi", "rcx", "r11", "memory", "xmm7");
		if (memcmp(pat, out, sizeof(pat)))
			bad++;
	}
	printf("signal bad=%ld\n", bad);
	return bad ? 1 : 0;
}

static void spoil(int sig, siginfo_t *si, void *ctx)
{
	ucontext_t *uc = ctx;
	uint8_t *fp = (uint8_t *)uc->uc_mcontext.fpregs;
	uint64_t xcomp = 1ull << 63;

	(void)sig;
	(void)si;
	memcpy(fp + 512 + 8, &xcomp, sizeof(xcomp)); /* XCOMP_BV: "compacted", which XRSTOR refuses */
}

static int run_badframe(void)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = spoil;
	sa.sa_flags = SA_SIGINFO;
	sigaction(SIGUSR1, &sa, NULL);
	raise(SIGUSR1);
	printf("badframe: sigreturn accepted a spoiled frame\n");
	return 1;
}

int main(int argc, char **argv)
{
	if (argc >= 3 && !strcmp(argv[1], "has"))
		return has(argv[2]) ? 0 : 1;
	if (argc >= 4 && !strcmp(argv[1], "switch") && has(argv[2]))
		return run_switch(argv[2], atol(argv[3]));
	if (argc >= 3 && !strcmp(argv[1], "signal") && has("ymm"))
		return run_signal(atol(argv[2]));
	if (argc >= 2 && !strcmp(argv[1], "badframe"))
		return run_badframe();
	fprintf(stderr, "usage: regtest has|switch|signal|badframe ...\n");
	return 2;
}
