/* Reading one "Name:   N kB" field of a /proc file (/proc/meminfo, /proc/self/status). */
#ifndef SMOLVM_VMM_PROCFS_H
#define SMOLVM_VMM_PROCFS_H

#include <stdint.h>

/* The value of field ("MemAvailable", "VmSize") in path, in bytes; 0 if the file or the field is missing. */
uint64_t procfs_kib_field(const char *path, const char *field);

#endif
