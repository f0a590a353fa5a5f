/* A base snapshot's memory kept in local RAM (the nested profile's host VM): copy once, map from there. */
#define _GNU_SOURCE
#include "memcache.h"
#include "procfs.h"

#include "vm.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#define MEMCACHE_PAGE 4096ull
#define MEMCACHE_CHUNK (4ull << 20)          /* bytes per read of the source */
#define MEMCACHE_MAX_EXTENTS (1u << 20)
#define MEMCACHE_EXTENTS_MAX_BYTES (32u << 20)
#define MEMCACHE_RESERVE_MEM (512ull << 20)  /* host VM memory left available after the copy */
#define MEMCACHE_RESERVE_FS (64ull << 20)    /* cache file system space left after the copy */

struct memcache_extent {
	uint64_t off, len;
};

static int memcache_err(char *err, size_t errlen, int ret, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
	return ret;
}

static int memcache_cmp(const void *a, const void *b)
{
	const struct memcache_extent *x = a, *y = b;

	return x->off < y->off ? -1 : x->off > y->off;
}

/* The extents file as sorted, page-aligned, merged ranges inside [0, size). */
static int memcache_read_extents(const char *path, uint64_t size, struct memcache_extent **out,
				 size_t *nr, uint64_t *bytes)
{
	struct memcache_extent *e = NULL;
	size_t n = 0, cap = 0, m = 0;
	char line[128];
	FILE *f = fopen(path, "re");
	int ret = 0;

	*out = NULL;
	*nr = 0;
	*bytes = 0;
	if (!f)
		return -errno;
	while (fgets(line, sizeof(line), f)) {
		unsigned long long off, len;
		uint64_t end;

		if (ftell(f) > (long)MEMCACHE_EXTENTS_MAX_BYTES || n >= MEMCACHE_MAX_EXTENTS) {
			ret = -E2BIG;
			goto out;
		}
		if (sscanf(line, "%llu %llu", &off, &len) != 2 || off >= size || len == 0) {
			ret = -EINVAL;
			goto out;
		}
		end = len > size - off ? size : off + len;
		if (n == cap) {
			struct memcache_extent *g;

			cap = cap ? 2 * cap : 256;
			g = realloc(e, cap * sizeof(*e));
			if (!g) {
				ret = -ENOMEM;
				goto out;
			}
			e = g;
		}
		e[n].off = off & ~(MEMCACHE_PAGE - 1);
		end = (end + MEMCACHE_PAGE - 1) & ~(MEMCACHE_PAGE - 1);
		e[n].len = (end > size ? size : end) - e[n].off;
		n++;
	}
	if (ferror(f)) {
		ret = -EIO;
		goto out;
	}
	qsort(e, n, sizeof(*e), memcache_cmp);
	for (size_t i = 0; i < n; i++) {
		if (m && e[i].off <= e[m - 1].off + e[m - 1].len) {
			uint64_t end = e[i].off + e[i].len;

			if (end > e[m - 1].off + e[m - 1].len)
				e[m - 1].len = end - e[m - 1].off;
		} else {
			e[m++] = e[i];
		}
	}
	for (size_t i = 0; i < m; i++)
		*bytes += e[i].len;
	*out = e;
	*nr = m;
	e = NULL;
out:
	free(e);
	fclose(f);
	return ret;
}

/* Remove the other versions (and abandoned copies) of this cache file: same prefix up to its last '-'. */
static void memcache_evict(const char *dir, const char *name)
{
	const char *dash = strrchr(name, '-');
	size_t plen = dash ? (size_t)(dash - name) + 1 : 0;
	DIR *d;
	struct dirent *de;

	if (!plen || !(d = opendir(dir)))
		return;
	while ((de = readdir(d))) {
		size_t len = strlen(de->d_name);

		if (strncmp(de->d_name, name, plen) || !strcmp(de->d_name, name) ||
		    (len > 5 && !strcmp(de->d_name + len - 5, ".lock")))
			continue;
		unlinkat(dirfd(d), de->d_name, 0);
	}
	closedir(d);
}

static int memcache_copy(int src, int dst, const struct memcache_extent *e, size_t n, uint8_t *buf)
{
	for (size_t i = 0; i < n; i++) {
		for (uint64_t done = 0; done < e[i].len;) {
			uint64_t want = e[i].len - done < MEMCACHE_CHUNK ? e[i].len - done : MEMCACHE_CHUNK;
			off_t at = (off_t)(e[i].off + done);
			ssize_t r = pread(src, buf, want, at);

			if (r < 0 && errno == EINTR)
				continue;
			if (r <= 0)
				return r < 0 ? -errno : -EIO;
			for (ssize_t w = 0; w < r;) {
				ssize_t k = pwrite(dst, buf + w, (size_t)(r - w), at + w);

				if (k < 0 && errno == EINTR)
					continue;
				if (k <= 0)
					return k < 0 ? -errno : -EIO;
				w += k;
			}
			done += (uint64_t)r;
		}
	}
	return 0;
}

int memcache_open(const char *cache, const char *extents, int src_fd, char *err, size_t errlen)
{
	struct memcache_extent *e = NULL;
	size_t n = 0;
	uint64_t bytes = 0, avail;
	char dir[4096], tmp[4200], lock[4200];
	const char *slash = strrchr(cache, '/');
	struct statvfs fs;
	struct stat sst, cst;
	uint8_t *buf = NULL;
	int fd = -1, lock_fd = -1, tmp_fd = -1, ret;

	if (!slash || slash == cache || (size_t)(slash - cache) >= sizeof(dir) || !slash[1])
		return memcache_err(err, errlen, -EINVAL, "memory cache %s: not an absolute file path", cache);
	memcpy(dir, cache, (size_t)(slash - cache));
	dir[slash - cache] = '\0';
	if (fstat(src_fd, &sst) < 0)
		return memcache_err(err, errlen, -errno, "memory cache: fstat: %s", strerror(errno));
	if (mkdir(dir, 0700) < 0 && errno != EEXIST)
		return memcache_err(err, errlen, -errno, "memory cache: mkdir %s: %s", dir, strerror(errno));
	snprintf(lock, sizeof(lock), "%s.lock", cache);
	lock_fd = open(lock, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
	if (lock_fd < 0 || flock(lock_fd, LOCK_EX) < 0) {
		ret = memcache_err(err, errlen, -errno, "memory cache: lock %s: %s", lock, strerror(errno));
		goto out;
	}
	fd = open(cache, O_RDONLY | O_CLOEXEC);
	if (fd >= 0 && fstat(fd, &cst) == 0 && cst.st_size == sst.st_size) {
		ret = 0;
		goto out;
	}
	if (fd >= 0)
		close(fd);
	fd = -1;
	memcache_evict(dir, slash + 1);
	if (!extents) {
		ret = memcache_err(err, errlen, -EINVAL, "memory cache %s: no extents file to copy with", cache);
		goto out;
	}
	ret = memcache_read_extents(extents, (uint64_t)sst.st_size, &e, &n, &bytes);
	if (ret) {
		memcache_err(err, errlen, ret, "memory cache: extents %s: %s", extents, strerror(-ret));
		goto out;
	}
	avail = procfs_kib_field("/proc/meminfo", "MemAvailable");
	if (statvfs(dir, &fs) < 0 || (uint64_t)fs.f_bavail * fs.f_frsize < bytes + MEMCACHE_RESERVE_FS ||
	    avail < bytes + MEMCACHE_RESERVE_MEM) {
		ret = memcache_err(err, errlen, -ENOSPC,
				   "memory cache %s: %" PRIu64 " MiB would leave too little room (%" PRIu64
				   " MiB available)", cache, bytes >> 20, avail >> 20);
		goto out;
	}
	buf = malloc(MEMCACHE_CHUNK);
	snprintf(tmp, sizeof(tmp), "%s.tmp.%d", cache, (int)getpid());
	tmp_fd = open(tmp, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (!buf || tmp_fd < 0) {
		ret = memcache_err(err, errlen, buf ? -errno : -ENOMEM, "memory cache: create %s: %s", tmp,
				   strerror(buf ? errno : ENOMEM));
		goto out;
	}
	if (ftruncate(tmp_fd, sst.st_size) < 0) {
		ret = memcache_err(err, errlen, -errno, "memory cache: size %s: %s", tmp, strerror(errno));
		goto out;
	}
	ret = memcache_copy(src_fd, tmp_fd, e, n, buf);
	if (ret == 0 && rename(tmp, cache) < 0)
		ret = -errno;
	if (ret) {
		memcache_err(err, errlen, ret, "memory cache: copy into %s: %s", tmp, strerror(-ret));
		goto out;
	}
	fd = open(cache, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		ret = memcache_err(err, errlen, -errno, "memory cache: open %s: %s", cache, strerror(errno));
out:
	if (tmp_fd >= 0) {
		close(tmp_fd);
		if (ret)
			unlink(tmp);
	}
	if (lock_fd >= 0)
		close(lock_fd); /* drops the flock */
	free(buf);
	free(e);
	if (ret && fd >= 0) {
		close(fd);
		fd = -1;
	}
	return ret ? ret : fd;
}

int memcache_map(struct vm *vm, int cache_fd, char *err, size_t errlen)
{
	off_t off = 0, data, hole;

	for (;;) {
		data = lseek(cache_fd, off, SEEK_DATA);
		if (data < 0 && errno == ENXIO)
			return 0;
		if (data < 0)
			return memcache_err(err, errlen, -errno, "memory cache: SEEK_DATA: %s", strerror(errno));
		if ((uint64_t)data >= vm->mem_size)
			return 0;
		hole = lseek(cache_fd, data, SEEK_HOLE);
		if (hole < 0)
			return memcache_err(err, errlen, -errno, "memory cache: SEEK_HOLE: %s", strerror(errno));
		if ((uint64_t)hole > vm->mem_size)
			hole = (off_t)vm->mem_size;
		if (mmap(vm->mem + data, (size_t)(hole - data), PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_FIXED | MAP_NORESERVE, cache_fd, data) == MAP_FAILED)
			return memcache_err(err, errlen, -errno, "memory cache: map [%lld, %lld): %s",
					    (long long)data, (long long)hole, strerror(errno));
		off = hole;
	}
}
