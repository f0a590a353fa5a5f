/* A base snapshot's memory kept in local RAM (the nested profile's host VM): copy once, map from there. */
#ifndef SMOLVM_MEMCACHE_H
#define SMOLVM_MEMCACHE_H

#include <stddef.h>

struct vm;

/*
 * In the nested profile the VMM runs inside a host VM that reaches the snapshot's memory
 * file over 9p, where a restored guest's page faults read it 4 KiB at a time (~2.6 ms a
 * page measured). The host (Python) therefore names a cache file in the host VM's own RAM
 * (its /run is a tmpfs) and an extents file listing the memory file's data ranges (the
 * host's SEEK_DATA/SEEK_HOLE; 9p reports none): "OFFSET LENGTH\n" lines, in bytes.
 *
 * memcache_open() returns an fd on `cache`: the existing file when it has src_fd's size,
 * else a copy made now of src_fd's data ranges (holes stay holes) in big reads, under an
 * flock so concurrent restores copy once. Other files in cache's folder whose names share
 * its prefix up to the last '-' (the same snapshot, an older version) are removed. Refused
 * with -ENOSPC when the copy would leave the cache's file system or the host VM's
 * available memory short. -errno on any failure: the caller then maps src_fd as before.
 *
 * memcache_map() maps cache_fd's data ranges copy-on-write (MAP_PRIVATE | MAP_FIXED) over
 * the VM's anonymous guest RAM, so pages the snapshot left zero stay anonymous (never
 * allocated in the tmpfs) and restored VMs share the cached pages. Call it after
 * kvm_vm_create(vm, size, -1) and before any vCPU runs.
 */
int memcache_open(const char *cache, const char *extents, int src_fd, char *err, size_t errlen);
int memcache_map(struct vm *vm, int cache_fd, char *err, size_t errlen);

#endif
