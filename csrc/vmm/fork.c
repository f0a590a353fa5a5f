/* Forking a running VM: pages written since restore (KVM dirty log + VMM marks), layered capture, its restore. */
#define _GNU_SOURCE
#include "fork.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "kvm.h"
#include "snapshot.h"
#include "vm.h"

#define FORK_PAGE 4096ull
#define FORK_MAP_MIN_PAGES 16u /* overlay runs this long are mapped from overlay.bin, shorter ones read */
#define FORK_MAX_MAPS 4096u    /* and at most this many mappings (the process's VMA limit is ~65k) */
#define FORK_WRITE_MAX (8ull << 20)

static int fork_err(char *err, size_t errlen, int ret, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
	return ret;
}

static uint64_t fork_now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000ull + (uint64_t)ts.tv_nsec / 1000;
}

static bool fork_bit(const uint64_t *bits, uint64_t p)
{
	return bits[p >> 6] & (1ull << (p & 63));
}

/* The end of the run of set (want=true) or clear bits starting at p, at most `pages`. */
static uint64_t fork_run_end(const uint64_t *bits, uint64_t p, uint64_t pages, bool want)
{
	while (p < pages && fork_bit(bits, p) == want)
		p++;
	return p;
}

static int fork_pread_all(int fd, uint8_t *dst, uint64_t len, uint64_t off)
{
	while (len) {
		ssize_t n = pread(fd, dst, len, (off_t)off);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return n < 0 ? -errno : -EIO;
		dst += n;
		len -= (uint64_t)n;
		off += (uint64_t)n;
	}
	return 0;
}

static int fork_pwrite_all(int fd, const uint8_t *src, uint64_t len, uint64_t off)
{
	while (len) {
		ssize_t n = pwrite(fd, src, len, (off_t)off);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return n < 0 ? -errno : -EIO;
		src += n;
		len -= (uint64_t)n;
		off += (uint64_t)n;
	}
	return 0;
}

static bool fork_zero_page(const uint8_t *p)
{
	const uint64_t *q = (const uint64_t *)(const void *)p;

	for (size_t i = 0; i < FORK_PAGE / 8; i++)
		if (q[i])
			return false;
	return true;
}

/* Lay overlay.bin's pages named by bits over the guest's mapping. */
static int fork_apply(struct vm *vm, const char *dir, const uint64_t *bits, char *err, size_t errlen)
{
	uint64_t pages = vm->mem_size / FORK_PAGE, maps = 0;
	char path[4096];
	struct stat st;
	int fd, ret = 0;

	snprintf(path, sizeof(path), "%s/%s", dir, FORK_OVERLAY_FILE);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return fork_err(err, errlen, -errno, "fork capture %s: %s", path, strerror(errno));
	if (fstat(fd, &st) < 0 || (uint64_t)st.st_size != vm->mem_size) {
		ret = fork_err(err, errlen, -EINVAL, "fork capture %s is %lld bytes, the guest has %llu",
			       path, (long long)st.st_size, (unsigned long long)vm->mem_size);
		goto out;
	}
	for (uint64_t p = fork_run_end(bits, 0, pages, false); p < pages;
	     p = fork_run_end(bits, p, pages, false)) {
		uint64_t end = fork_run_end(bits, p, pages, true);
		uint64_t off = p * FORK_PAGE, len = (end - p) * FORK_PAGE;

		if (end - p >= FORK_MAP_MIN_PAGES && maps < FORK_MAX_MAPS) {
			/* copy-on-write from the overlay: children share its page cache */
			void *at = mmap(vm->mem + off, len, PROT_READ | PROT_WRITE,
					MAP_PRIVATE | MAP_FIXED | MAP_NORESERVE, fd, (off_t)off);

			if (at == MAP_FAILED) {
				ret = fork_err(err, errlen, -errno, "map %s: %s", path, strerror(errno));
				goto out;
			}
			maps++;
		} else if ((ret = fork_pread_all(fd, vm->mem + off, len, off))) {
			fork_err(err, errlen, ret, "read %s: %s", path, strerror(-ret));
			goto out;
		}
		p = end;
	}
out:
	close(fd);
	return ret;
}

int fork_restore(struct fork_state *f, struct vm *vm, const struct snap_reader *r, const char *dir,
		 int mem_fd, bool track, char *err, size_t errlen)
{
	uint64_t words = (vm->mem_size / FORK_PAGE + 63) / 64;
	uint64_t *bits = NULL;
	const void *ovl;
	uint32_t len = 0;
	int ret;

	f->tracked = false;
	ovl = snap_get(r, SNAP_MEM_OVERLAY, 0, &len);
	bits = calloc(words, sizeof(*bits));
	if (!bits)
		return fork_err(err, errlen, -ENOMEM, "fork tracking: out of memory");
	if (ovl) {
		if (len != words * sizeof(*bits)) {
			free(bits);
			return fork_err(err, errlen, -EINVAL,
					"snapshot %s: its overlay bitmap does not match the guest's size", dir);
		}
		memcpy(bits, ovl, len);
		ret = fork_apply(vm, dir, bits, err, errlen);
		if (ret) {
			free(bits);
			return ret;
		}
	}
	if (!track) {
		snprintf(f->why, sizeof(f->why), "dirty tracking is off for this VM (--no-dirty-log)");
		free(bits);
		return 0;
	}
	if (f->verify) /* opened now: the loop thread's seccomp filter allows no read-only open */
		f->pagemap_fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	ret = kvm_dirty_log_enable(vm);
	if (!ret) {
		f->base_fd = fcntl(mem_fd, F_DUPFD_CLOEXEC, 3);
		ret = f->base_fd < 0 ? -errno : 0;
	}
	if (ret) {
		snprintf(f->why, sizeof(f->why), "KVM dirty log unavailable: %s", strerror(-ret));
		free(bits);
		return 0;
	}
	vm->dirty = bits; /* from here every write counts, before any device or vCPU runs */
	f->tracked = true;
	return 0;
}

static bool fork_page_zero(const uint8_t *page)
{
	static const uint8_t zero[FORK_PAGE];

	return !memcmp(page, zero, FORK_PAGE);
}

/*
 * Check the log against the kernel's view: a page of a private file mapping that is anonymous
 * now (or swapped) was written. Adds what the log missed to vm->dirty; returns that count, or
 * UINT64_MAX when /proc/self/pagemap cannot be read.
 */
static uint64_t fork_pagemap_check(struct fork_state *f, struct vm *vm)
{
	enum { CHUNK = 4096 };
	uint64_t pages = vm->mem_size / FORK_PAGE, missed = 0, base = (uintptr_t)vm->mem / FORK_PAGE;
	uint64_t *ent = malloc(CHUNK * sizeof(*ent));
	int fd = f->pagemap_fd;

	if (fd < 0 || !ent) {
		missed = UINT64_MAX;
		goto out;
	}
	for (uint64_t p = 0; p < pages; p += CHUNK) {
		uint64_t n = pages - p < CHUNK ? pages - p : CHUNK;

		if (fork_pread_all(fd, (uint8_t *)ent, n * 8, (base + p) * 8)) {
			missed = UINT64_MAX;
			goto out;
		}
		for (uint64_t i = 0; i < n; i++) {
			bool present = ent[i] >> 63 & 1, swapped = ent[i] >> 62 & 1, file = ent[i] >> 61 & 1;

			if (((present && !file) || swapped) && !fork_bit(vm->dirty, p + i)) {
				vm->dirty[(p + i) >> 6] |= 1ull << ((p + i) & 63);
				/* an all-zero anonymous page is the shared zero page a read of unbacked RAM
				 * maps (restores from the memory cache, memcache.h): marked, not a miss */
				if (!fork_page_zero(vm->mem + (p + i) * FORK_PAGE))
					missed++;
			}
		}
	}
out:
	free(ent);
	return missed;
}

/* The pages named by bits into a new sparse file of the guest's size (zero pages stay holes). */
static int fork_write_overlay(struct vm *vm, const char *path, uint64_t *count, char *err, size_t errlen)
{
	uint64_t pages = vm->mem_size / FORK_PAGE;
	int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600), ret = 0;

	*count = 0;
	if (fd < 0)
		return fork_err(err, errlen, -errno, "create %s: %s", path, strerror(errno));
	if (ftruncate(fd, (off_t)vm->mem_size) < 0) {
		ret = -errno;
		goto out;
	}
	for (uint64_t p = 0; p < pages; p++) {
		uint64_t end = p;

		if (!fork_bit(vm->dirty, p))
			continue;
		(*count)++;
		if (fork_zero_page(vm->mem + p * FORK_PAGE))
			continue;
		while (end + 1 < pages && fork_bit(vm->dirty, end + 1) && (end + 1 - p) * FORK_PAGE < FORK_WRITE_MAX &&
		       !fork_zero_page(vm->mem + (end + 1) * FORK_PAGE)) {
			end++;
			(*count)++;
		}
		ret = fork_pwrite_all(fd, vm->mem + p * FORK_PAGE, (end + 1 - p) * FORK_PAGE, p * FORK_PAGE);
		if (ret)
			goto out;
		p = end;
	}
	/* no fsync: a capture serves children started now, none after a host crash */
out:
	if (ret)
		fork_err(err, errlen, ret, "write %s: %s", path, strerror(-ret));
	close(fd);
	return ret;
}

/* base + overlay into dir; -EXDEV/-ENOENT... from the link mean "capture it whole instead". */
static int fork_layered(struct fork_state *f, struct vm *vm, const char *dir, struct snap_writer *sections,
			struct fork_stats *st, char *err, size_t errlen)
{
	uint64_t words = (vm->mem_size / FORK_PAGE + 63) / 64;
	char src[64], path[4096];
	uint64_t t = fork_now_us();
	int ret;

	ret = kvm_dirty_log_collect(vm, vm->dirty);
	if (ret) {
		snprintf(f->why, sizeof(f->why), "KVM_GET_DIRTY_LOG: %s", strerror(-ret));
		f->tracked = false; /* the log may have lost writes: never layer again */
		return 1;
	}
	if (f->verify)
		st->missed = fork_pagemap_check(f, vm);
	st->t_log_us = fork_now_us() - t;
	t = fork_now_us();
	/* the very file this VM maps, even if its snapshot was replaced or removed since */
	snprintf(src, sizeof(src), "/proc/self/fd/%d", f->base_fd);
	snprintf(path, sizeof(path), "%s/%s", dir, SNAP_MEMORY_FILE);
	if (linkat(AT_FDCWD, src, AT_FDCWD, path, AT_SYMLINK_FOLLOW) < 0) {
		snprintf(f->why, sizeof(f->why), "cannot link the base memory file: %s", strerror(errno));
		return 1;
	}
	st->t_link_us = fork_now_us() - t;
	t = fork_now_us();
	snprintf(path, sizeof(path), "%s/%s", dir, FORK_OVERLAY_FILE);
	ret = fork_write_overlay(vm, path, &st->pages, err, errlen);
	if (ret)
		return ret;
	st->t_overlay_us = fork_now_us() - t;
	t = fork_now_us();
	snap_put(sections, SNAP_MEM_OVERLAY, 0, vm->dirty, (uint32_t)(words * sizeof(uint64_t)));
	st->layered = true;
	ret = snapshot_save_state(vm, dir, sections, err, errlen);
	st->t_state_us = fork_now_us() - t;
	return ret;
}

int fork_capture(struct fork_state *f, struct vm *vm, const char *dir, struct snap_writer *sections,
		 struct fork_stats *st, char *err, size_t errlen)
{
	uint64_t t0 = fork_now_us();
	char path[4096];
	int ret = 1;

	memset(st, 0, sizeof(*st));
	st->missed = UINT64_MAX;
	if (mkdir(dir, 0700) < 0 && errno != EEXIST)
		return fork_err(err, errlen, -errno, "mkdir %s: %s", dir, strerror(errno));
	if (f->tracked)
		ret = fork_layered(f, vm, dir, sections, st, err, errlen);
	if (ret > 0) {
		/* never write through a link to the base: the whole memory goes to a new file */
		snprintf(path, sizeof(path), "%s/%s", dir, SNAP_MEMORY_FILE);
		unlink(path);
		snprintf(path, sizeof(path), "%s/%s", dir, FORK_OVERLAY_FILE);
		unlink(path);
		st->layered = false;
		st->pages = vm->mem_size / FORK_PAGE;
		ret = snapshot_save(vm, dir, sections, err, errlen);
	}
	st->t_us = fork_now_us() - t0;
	return ret;
}

void fork_free(struct fork_state *f, struct vm *vm)
{
	if (f->base_fd >= 0)
		close(f->base_fd);
	f->base_fd = -1;
	if (f->pagemap_fd >= 0)
		close(f->pagemap_fd);
	f->pagemap_fd = -1;
	f->tracked = false;
	free(vm->dirty);
	vm->dirty = NULL;
}
