/* Unit test of csrc/vmm/memcache.c: a sparse memory file copied by its extents, mapped copy-on-write over anonymous RAM. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "memcache.h"
#include "vm.h"

#define SIZE (16u << 20)
#define PAGE 4096u

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

static void put(int fd, uint64_t off, uint8_t byte, size_t len)
{
	uint8_t *b = malloc(len);

	memset(b, byte, len);
	if (pwrite(fd, b, len, (off_t)off) != (ssize_t)len)
		abort();
	free(b);
}

static void write_text(const char *path, const char *text)
{
	FILE *f = fopen(path, "w");

	if (!f || fputs(text, f) < 0 || fclose(f))
		abort();
}

int main(void)
{
	char dir[256], src[300], ext[300], bad[300], cache[300], older[300], err[512];
	struct vm vm = { 0 };
	struct stat st;
	int sfd, cfd, again;

	const char *work = getenv("MEMCACHE_TEST_DIR");

	snprintf(dir, sizeof(dir), "%s", work ? work : "/tmp/memcache-test");
	mkdir(dir, 0700);
	snprintf(src, sizeof(src), "%s/memory.bin", dir);
	snprintf(ext, sizeof(ext), "%s/extents", dir);
	snprintf(bad, sizeof(bad), "%s/bad-extents", dir);
	snprintf(cache, sizeof(cache), "%s/cache/snap-v2.mem", dir);
	snprintf(older, sizeof(older), "%s/cache/snap-v1.mem", dir);

	sfd = open(src, O_RDWR | O_CREAT | O_TRUNC, 0600);
	if (sfd < 0 || ftruncate(sfd, SIZE) < 0)
		abort();
	put(sfd, 0, 0x11, PAGE);
	put(sfd, 5u << 20, 0x22, 6u << 20); /* more than one copy chunk */
	put(sfd, SIZE - PAGE, 0x33, PAGE);
	/* Unaligned, overlapping and unsorted ranges are page-aligned and merged. */
	write_text(ext, "16773120 4096\n5242880 3000000\n0 100\n8000000 3534848\n7000000 2000000\n");

	write_text(bad, "0 4096\n99999999999 4096\n");
	CHECK(memcache_open(cache, bad, sfd, err, sizeof(err)) == -EINVAL, "a range past the end is refused");
	write_text(bad, "zero\n");
	CHECK(memcache_open(cache, bad, sfd, err, sizeof(err)) == -EINVAL, "a malformed line is refused");
	CHECK(memcache_open("relative.mem", ext, sfd, err, sizeof(err)) == -EINVAL, "a relative path is refused");
	CHECK(memcache_open(cache, NULL, sfd, err, sizeof(err)) < 0, "no extents, no cache: copy refused");

	mkdir(dir, 0700);
	{
		char cdir[300];

		snprintf(cdir, sizeof(cdir), "%s/cache", dir);
		mkdir(cdir, 0700);
	}
	write_text(older, "old"); /* an older version of the same snapshot: removed below */
	cfd = memcache_open(cache, ext, sfd, err, sizeof(err));
	CHECK(cfd >= 0, "memcache_open: %s", err);
	if (cfd < 0)
		return 1;
	CHECK(access(older, F_OK) < 0, "the older version was evicted");
	CHECK(fstat(cfd, &st) == 0 && st.st_size == SIZE, "the cache has the source's size");
	CHECK(st.st_blocks * 512 < (blkcnt_t)(8u << 20), "the cache stays sparse (%lld bytes)",
	      (long long)st.st_blocks * 512);
	CHECK(lseek(cfd, 0, SEEK_DATA) == 0 && lseek(cfd, 0, SEEK_HOLE) == PAGE, "the first page only");

	again = memcache_open(cache, NULL, sfd, err, sizeof(err));
	CHECK(again >= 0, "an existing cache opens without extents: %s", err);
	if (again >= 0)
		close(again);

	vm.mem_size = SIZE;
	vm.mem = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (vm.mem == MAP_FAILED)
		abort();
	CHECK(memcache_map(&vm, cfd, err, sizeof(err)) == 0, "memcache_map: %s", err);
	CHECK(vm.mem[0] == 0x11 && vm.mem[PAGE - 1] == 0x11 && vm.mem[PAGE] == 0, "page 0");
	CHECK(vm.mem[(5u << 20)] == 0x22 && vm.mem[(11u << 20) - 1] == 0x22, "the middle range");
	CHECK(vm.mem[(11u << 20)] == 0 && vm.mem[(3u << 20)] == 0, "holes read zero");
	CHECK(vm.mem[SIZE - 1] == 0x33, "the last page");
	vm.mem[0] = 0x99;
	vm.mem[3u << 20] = 0x98;
	{
		uint8_t b = 0;

		CHECK(pread(cfd, &b, 1, 0) == 1 && b == 0x11, "guest writes stay private");
		CHECK(lseek(cfd, 3u << 20, SEEK_DATA) >= (off_t)(5u << 20), "a hole written by the guest stays a hole");
	}
	munmap(vm.mem, SIZE);
	close(cfd);
	close(sfd);
	if (failures) {
		printf("%d memcache checks failed\n", failures);
		return 1;
	}
	printf("all memcache tests passed\n");
	return 0;
}
