/* smolvm-vmm --inspect: a snapshot's header and checks as JSON, for smolvm/snapshots.py (no KVM needed). */
#ifndef SMOLVM_INSPECT_H
#define SMOLVM_INSPECT_H

#include <stdio.h>

/*
 * Check the snapshot at path (its folder, or a file in it such as state.bin) exactly as a
 * restore does (snapshot_open) and write one JSON object and a newline to out:
 *   {"problem": null, "version": 2, "mem_size": BYTES, "vcpus": N, "devices": ["serial", ...]}
 * or {"problem": "WHY IT CANNOT BE RESTORED", "version": 2}. Returns 0 once the object is
 * written (whether or not the snapshot is whole), or -errno if it could not be.
 */
int inspect_snapshot(const char *path, FILE *out);

#endif
