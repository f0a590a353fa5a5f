/* Forking a running VM: dirty-page tracking since restore and the layered capture (base memory file + overlay). */
#ifndef SMOLVM_FORK_H
#define SMOLVM_FORK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct vm;
struct snap_reader;
struct snap_writer;

#define FORK_OVERLAY_FILE "overlay.bin"

/*
 * A fork capture is a snapshot folder whose memory.bin is a hard link to the memory file the
 * VM was restored from (its base), whose state.bin has a SNAP_MEM_OVERLAY bitmap, and whose
 * overlay.bin (sparse, the guest's size) holds the pages that bitmap names at their offsets.
 * Such a capture restores as base + overlay. A VM restored from one starts with the overlay's
 * bitmap as its written pages, so a fork of a fork is again one base and one overlay (flat).
 */
struct fork_state {
	int base_fd;  /* the memory file the VM was restored from, kept to link it; -1 = none */
	bool tracked; /* vm->dirty and KVM's dirty log have followed every write since restore */
	bool verify;  /* at capture, check the log against /proc/self/pagemap (tests) */
	int pagemap_fd; /* verify: /proc/self/pagemap, opened at restore (before the seccomp filter); -1 = none */
	char why[128]; /* why a capture is full when it is (for the FORK reply) */
};

struct fork_stats {
	bool layered;
	uint64_t pages;       /* pages in the overlay (layered) or the guest's pages (full) */
	uint64_t missed;      /* verify: pages the log missed (UINT64_MAX: not checked) */
	uint64_t t_us;
	uint64_t t_log_us, t_link_us, t_overlay_us, t_state_us; /* its parts (layered) */
};

/*
 * After kvm_vm_create() of a restore from dir (mapped from mem_fd) and before the devices are
 * restored: lay dir's overlay over the mapping when r has one (pages MAP_FIXED from
 * overlay.bin, or read in), then, with track, start tracking writes (vm->dirty, KVM's dirty
 * log); an error of the tracking itself only leaves the VM untracked (f->why says so).
 * mem_fd is duplicated. Returns 0 or -errno with a reason in err (a bad overlay).
 */
int fork_restore(struct fork_state *f, struct vm *vm, const struct snap_reader *r, const char *dir,
		 int mem_fd, bool track, char *err, size_t errlen);

/*
 * Capture the paused VM into dir (made) for forks: layered when tracked and the base can be
 * linked into dir, else the whole memory (snapshot_save). sections holds the device state;
 * it gets the overlay bitmap. Loop thread, devices quiet. 0 or -errno with a reason in err.
 */
int fork_capture(struct fork_state *f, struct vm *vm, const char *dir, struct snap_writer *sections,
		 struct fork_stats *st, char *err, size_t errlen);

/* Release what fork_restore() kept (vm->dirty too). Idempotent. */
void fork_free(struct fork_state *f, struct vm *vm);

#endif
