/* A fake snapshot.h section store for device tests: sections kept in memory (fake_snap.h). */
#include "fake_snap.h"

#include <string.h>

#include "fake_test.h"

static struct {
	uint32_t type, index, len;
	_Alignas(8) uint8_t data[4096]; /* the real reader hands out 8-aligned sections */
} fake_snaps[FAKE_SNAP_MAX];
static int fake_nsnaps;

void fake_snap_clear(void)
{
	fake_nsnaps = 0;
}

void snap_put(struct snap_writer *w, uint32_t type, uint32_t index, const void *data, uint32_t len)
{
	(void)w;
	CHECK(fake_nsnaps < FAKE_SNAP_MAX && len <= sizeof(fake_snaps[0].data));
	fake_snaps[fake_nsnaps].type = type;
	fake_snaps[fake_nsnaps].index = index;
	fake_snaps[fake_nsnaps].len = len;
	memcpy(fake_snaps[fake_nsnaps].data, data, len);
	fake_nsnaps++;
}

const void *snap_get(const struct snap_reader *r, uint32_t type, uint32_t index, uint32_t *len)
{
	int i;

	(void)r;
	for (i = 0; i < fake_nsnaps; i++) {
		if (fake_snaps[i].type == type && fake_snaps[i].index == index) {
			*len = fake_snaps[i].len;
			return fake_snaps[i].data;
		}
	}
	return NULL;
}
