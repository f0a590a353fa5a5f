/* Reading one "Name:   N kB" field of a /proc file. */
#include "procfs.h"

#include <stdio.h>
#include <string.h>

uint64_t procfs_kib_field(const char *path, const char *field)
{
	char line[256];
	size_t n = strlen(field);
	unsigned long long kib = 0;
	FILE *f = fopen(path, "re");

	if (!f)
		return 0;
	while (fgets(line, sizeof(line), f))
		if (strncmp(line, field, n) == 0 && line[n] == ':' && sscanf(line + n + 1, " %llu kB", &kib) == 1)
			break;
	fclose(f);
	return (uint64_t)kib << 10;
}
