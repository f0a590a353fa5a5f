/* Unit test of fork tracking (kvm.c dirty log, vm.h marks) on the host's real KVM: the log names exactly the written pages. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "kvm.h"
#include "vm.h"

#define SKIP_RC 77
#define MEM (64ull << 20)
#define PAGES (MEM / 4096)

static int failures;

#define CHECK(cond, ...)                                           \
	do {                                                       \
		if (!(cond)) {                                     \
			printf("FAIL %s:%d: ", __FILE__, __LINE__); \
			printf(__VA_ARGS__);                       \
			printf("\n");                              \
			failures++;                                \
		}                                                  \
	} while (0)

/* kvm.c's teardown and exit paths reach these; this test makes no vCPU threads or loop. */
void vcpu_destroy(struct vcpu *v) { (void)v; }
void vcpu_kick(struct vcpu *v) { (void)v; }
void evloop_stop(struct evloop *l) { (void)l; }

/* Real mode: for each segment in the list, ds = seg; mov byte [0x10], 1; then out 0x10, al. */
static size_t guest_code(uint8_t *p, const uint16_t *segs, int n)
{
	size_t o = 0;

	for (int i = 0; i < n; i++) {
		p[o++] = 0xB8; /* mov ax, seg */
		p[o++] = (uint8_t)segs[i];
		p[o++] = (uint8_t)(segs[i] >> 8);
		p[o++] = 0x8E; /* mov ds, ax */
		p[o++] = 0xD8;
		p[o++] = 0xC6; /* mov byte [0x0010], 1 */
		p[o++] = 0x06;
		p[o++] = 0x10;
		p[o++] = 0x00;
		p[o++] = 0x01;
	}
	p[o++] = 0xE6; /* out 0x10, al */
	p[o++] = 0x10;
	return o;
}

static int run_at(int vcpu, struct kvm_run *run, uint64_t ip)
{
	struct kvm_sregs s;
	struct kvm_regs r;

	if (ioctl(vcpu, KVM_GET_SREGS, &s) < 0)
		return -1;
	s.cs.base = 0;
	s.cs.selector = 0;
	if (ioctl(vcpu, KVM_SET_SREGS, &s) < 0)
		return -1;
	memset(&r, 0, sizeof(r));
	r.rip = ip;
	r.rflags = 2;
	if (ioctl(vcpu, KVM_SET_REGS, &r) < 0)
		return -1;
	for (int i = 0; i < 100; i++) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0)
			return -1;
		if (run->exit_reason == KVM_EXIT_IO && run->io.port == 0x10)
			return 0;
	}
	return -1;
}

/* The pages set in bits, as a short string for messages and comparisons. */
static void pages_of(const uint64_t *bits, char *out, size_t size)
{
	size_t o = 0;

	out[0] = 0;
	for (uint64_t p = 0; p < PAGES && o + 12 < size; p++)
		if (bits[p / 64] >> (p % 64) & 1)
			o += (size_t)snprintf(out + o, size - o, "%s%#llx", o ? " " : "", (unsigned long long)p);
}

int main(void)
{
	static const uint16_t first[] = { 0x0500, 0x0900, 0x2000 }, second[] = { 0x0700 };
	static uint64_t bits[PAGES / 64];
	struct vm vm;
	struct kvm_run *run;
	char path[] = "/tmp/smolvm-dirtylog-XXXXXX", got[512];
	int fd, vcpu, ret;

	if (access("/dev/kvm", R_OK | W_OK)) {
		printf("no usable /dev/kvm\n");
		return SKIP_RC;
	}
	/* a private mapping of a file, as a restore maps its memory file */
	fd = mkstemp(path);
	CHECK(fd >= 0 && ftruncate(fd, (off_t)MEM) == 0, "memory file");
	unlink(path);
	memset(&vm, 0, sizeof(vm));
	ret = kvm_vm_create(&vm, MEM, fd);
	if (ret) {
		printf("kvm_vm_create: %s\n", vm.exit_msg);
		return SKIP_RC;
	}
	close(fd);
	guest_code(vm.mem + 0x1000, first, 3);
	guest_code(vm.mem + 0x1100, second, 1);
	CHECK(kvm_dirty_log_enable(&vm) == 0, "KVM_MEM_LOG_DIRTY_PAGES on the slots");
	vcpu = ioctl(vm.vm_fd, KVM_CREATE_VCPU, 0);
	run = mmap(NULL, (size_t)ioctl(vm.kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0), PROT_READ | PROT_WRITE, MAP_SHARED,
		   vcpu, 0);
	CHECK(vcpu >= 0 && run != MAP_FAILED, "vCPU");

	CHECK(kvm_dirty_log_collect(&vm, bits) == 0, "first collect");
	pages_of(bits, got, sizeof(got));
	CHECK(!got[0], "nothing written yet, the log has [%s]", got);

	CHECK(run_at(vcpu, run, 0x1000) == 0, "guest run 1");
	CHECK(kvm_dirty_log_collect(&vm, bits) == 0, "collect 1");
	pages_of(bits, got, sizeof(got));
	CHECK(!strcmp(got, "0x5 0x9 0x20"), "guest wrote pages 0x5 0x9 0x20, the log has [%s]", got);

	/* the log was cleared and the pages protected again: only the new write shows */
	memset(bits, 0, sizeof(bits));
	CHECK(run_at(vcpu, run, 0x1100) == 0, "guest run 2");
	CHECK(kvm_dirty_log_collect(&vm, bits) == 0, "collect 2");
	pages_of(bits, got, sizeof(got));
	CHECK(!strcmp(got, "0x7"), "guest wrote page 0x7, the log has [%s]", got);

	memset(bits, 0, sizeof(bits));
	CHECK(run_at(vcpu, run, 0x1000) == 0, "guest run 3");
	CHECK(kvm_dirty_log_collect(&vm, bits) == 0, "collect 3");
	pages_of(bits, got, sizeof(got));
	CHECK(!strcmp(got, "0x5 0x9 0x20"), "guest wrote 0x5 0x9 0x20 again, the log has [%s]", got);
	CHECK(vm.mem[0x5010] == 1 && vm.mem[0x7010] == 1 && vm.mem[0x20010] == 1, "the writes landed");

	/* the VMM's own writes: vm_gpa() marks what it hands out, KVM never sees them */
	memset(bits, 0, sizeof(bits));
	vm.dirty = bits;
	CHECK(vm_gpa(&vm, 0x3ffff, 2) != NULL, "a range across a page boundary");
	CHECK(vm_gpa(&vm, 0x100000, 0) != NULL && vm_gpa(&vm, MEM, 1) == NULL, "empty and outside ranges");
	vm.dirty = NULL;
	pages_of(bits, got, sizeof(got));
	CHECK(!strcmp(got, "0x3f 0x40"), "vm_gpa(0x3ffff, 2) marks pages 0x3f 0x40, got [%s]", got);

	munmap(run, (size_t)ioctl(vm.kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0));
	close(vcpu);
	kvm_vm_destroy(&vm);
	if (failures) {
		printf("%d failure(s)\n", failures);
		return 1;
	}
	printf("all dirty log tests passed\n");
	return 0;
}
