/* The --inspect report: snapshot_open()'s verdict and the header's fields, printed as JSON. */
#define _GNU_SOURCE
#include "inspect.h"

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>

#include "snapshot.h"

/* s as a JSON string: quotes, backslashes and control characters escaped; other bytes as they are. */
static void inspect_string(FILE *out, const char *s, size_t n)
{
	fputc('"', out);
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];

		if (c == '"' || c == '\\')
			fprintf(out, "\\%c", c);
		else if (c < 0x20)
			fprintf(out, "\\u%04x", c);
		else
			fputc(c, out);
	}
	fputc('"', out);
}

int inspect_snapshot(const char *path, FILE *out)
{
	char dir[4096], err[4608] = "";
	struct snap_reader r = { 0 };
	struct snap_vm_info info;
	struct stat st;
	const char *list;
	uint32_t len = 0;
	int ret;

	if (strlen(path) >= sizeof(dir))
		return -ENAMETOOLONG;
	strcpy(dir, path);
	if (stat(path, &st) == 0 && S_ISREG(st.st_mode)) {
		char *slash = strrchr(dir, '/');

		if (!slash)
			strcpy(dir, ".");
		else
			slash[slash == dir] = 0; /* "/state.bin" -> "/" */
	}
	ret = snapshot_open(dir, &r, &info, err, sizeof(err));
	if (ret) {
		if (!err[0])
			snprintf(err, sizeof(err), "cannot read it: %s", strerror(-ret));
		fputs("{\"problem\": ", out);
		inspect_string(out, err, strlen(err));
		fprintf(out, ", \"version\": %u}\n", SNAP_VERSION);
		goto out;
	}
	fprintf(out, "{\"problem\": null, \"version\": %u, \"mem_size\": %llu, \"vcpus\": %u, \"devices\": [",
		SNAP_VERSION, (unsigned long long)info.mem_size, info.nr_vcpus);
	list = snap_get(&r, SNAP_DEV_LIST, 0, &len);
	for (uint32_t i = 0, start = 0; list && i <= len; i++) {
		if (i < len && list[i] != ',')
			continue;
		if (start)
			fputs(", ", out);
		inspect_string(out, list + start, i - start);
		start = i + 1;
	}
	fputs("]}\n", out);
out:
	snapshot_reader_free(&r);
	return fflush(out) == EOF || ferror(out) ? -EIO : 0;
}
