/* A fake snapshot.h section store for device tests: snap_put() keeps sections in memory, snap_get() finds them. */
#ifndef SMOLVM_FAKE_SNAP_H
#define SMOLVM_FAKE_SNAP_H

#include "snapshot.h"

/*
 * fake_snap.c defines snap_put() and snap_get() over one store per process
 * (FAKE_SNAP_MAX sections of up to 4 KiB, 8-aligned as the real reader's):
 * link it instead of csrc/vmm/snapshot.c. The writer and reader arguments are
 * ignored; a section put is found by every reader. One thread at a time.
 */
#define FAKE_SNAP_MAX 16

/* Forget every section (before a test saves). */
void fake_snap_clear(void);

#endif
