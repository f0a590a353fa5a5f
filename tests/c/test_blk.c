/* Unit tests for csrc/vmm/virtio/blk.c: a fake guest driver, the real evloop on a thread and a sparse temporary disk. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <linux/virtio_blk.h>
#include <linux/virtio_config.h>
#include <linux/virtio_mmio.h>
#include <linux/virtio_ring.h>

#include "evloop.h"
#include "fake_driver.h"
#include "fake_snap.h"
#include "fake_test.h"
#include "fake_vm.h"
#include "snapshot.h"
#include "virtio/blk.h"
#include "virtio/mmio.h"
#include "virtio/queue.h"
#include "vm.h"

#define RAM_SIZE (16u << 20)
#define DISK_SIZE (8u << 20)
#define DISK_SECTORS (DISK_SIZE / 512u)

/* A sparse temporary disk image of `size` bytes; returns its fd (read-write), path in `path`. */
static int disk_new(char *path, size_t cap, off_t size)
{
	const char *tmp = getenv("TMPDIR");
	int fd;

	snprintf(path, cap, "%s/smolvm-test-blk-XXXXXX", tmp && *tmp ? tmp : "/tmp");
	fd = mkstemp(path);
	CHECK(fd >= 0);
	CHECK(ftruncate(fd, size) == 0);
	return fd;
}

/* ------------------------------------------------------------------ fake guest: Linux virtio_blk over virtio-mmio */

#define G_QSIZE 256u
#define G_QBASE FAKE_RING_BASE(0) /* desc; avail at +0x1000, used at +0x2000 */
#define G_HDR 0x20000ull    /* 16-byte request headers, one per slot */
#define G_STATUS 0x30000ull /* status bytes, one per slot */
#define G_DATA 0x100000ull  /* data buffers: [1 MiB, 16 MiB) */

struct world {
	struct evloop *loop;
	struct vm *vm;
	struct blk *blk;
	pthread_t thread;
	char path[256];
	int fd; /* the host's view of the disk */
	bool ro;
	struct fake_ring q; /* the guest's queue */
};

static uint8_t *gmem(struct world *w, uint64_t gpa)
{
	return w->vm->mem + gpa;
}

static uint64_t config_read64(struct world *w, uint32_t off)
{
	uint64_t v = 0;

	fake_vm_access(w->vm, VIRTIO_MMIO_CONFIG + off, &v, 8, false);
	return v;
}

/* Probe like drivers/virtio/virtio_mmio.c + drivers/block/virtio_blk.c. */
static void g_probe(struct world *w)
{
	uint64_t features = fake_driver_negotiate(w->vm, 2);
	uint32_t want = (1u << VIRTIO_BLK_F_SEG_MAX) | (1u << VIRTIO_BLK_F_FLUSH) | (w->ro ? 1u << VIRTIO_BLK_F_RO : 0);

	CHECK(features >> 32 == 1); /* VERSION_1 */
	CHECK((uint32_t)features == want);
	CHECK(config_read64(w, 0) == DISK_SECTORS);
	CHECK((uint32_t)config_read64(w, 12) == VIRTQ_MAX_SEGS - 2);
	fake_ring_init(&w->q, w->vm, 0, G_QSIZE, G_QBASE);
	fake_ring_setup(&w->q);
	CHECK(fake_vm_mr(w->vm, VIRTIO_MMIO_QUEUE_READY) == 1);
	fake_driver_ok(w->vm);
}

/* Post a chain (CHECKed to fit); returns its head. */
static int gq_add(struct world *w, const struct fake_seg *s, int n, int tag)
{
	int head = fake_ring_add(&w->q, s, n, tag);

	CHECK(head >= 0);
	return head;
}

/* Wait until the device sets DEVICE_NEEDS_RESET, checking it completes nothing meanwhile. */
static void g_wait_broken(struct world *w)
{
	int64_t t0 = fake_test_now_ms();
	int tag;
	uint32_t len;

	while (!fake_driver_broken(w->vm)) {
		CHECK(!fake_ring_used(&w->q, &tag, &len));
		CHECK(fake_test_now_ms() - t0 < 10000);
		poll(NULL, 0, 1);
	}
}

/* Header at slot's place, then `data` as given, then the slot's status byte (set to 0xff). */
static int g_post(struct world *w, int slot, uint32_t type, uint64_t sector, const struct fake_seg *data, int ndata)
{
	struct virtio_blk_outhdr h = { .type = type, .ioprio = 0, .sector = sector };
	struct fake_seg s[128];
	int n = 0, i;

	memcpy(gmem(w, G_HDR + (uint64_t)slot * 16), &h, sizeof(h));
	*gmem(w, G_STATUS + (uint64_t)slot) = 0xff;
	s[n++] = (struct fake_seg){ G_HDR + (uint64_t)slot * 16, 16, false };
	for (i = 0; i < ndata; i++)
		s[n++] = data[i];
	s[n++] = (struct fake_seg){ G_STATUS + (uint64_t)slot, 1, true };
	return gq_add(w, s, n, slot);
}

/* One request, start to end: returns the status byte, used length in *len. */
static int g_do(struct world *w, uint32_t type, uint64_t sector, const struct fake_seg *data, int ndata, uint32_t *len)
{
	uint32_t l;
	int tag;

	g_post(w, 0, type, sector, data, ndata);
	fake_ring_kick(&w->q);
	CHECK(fake_ring_wait(&w->q, &tag, &l));
	CHECK(tag == 0);
	if (len)
		*len = l;
	return *gmem(w, G_STATUS);
}

/* Split [gpa, gpa+len) into n segments of uneven sizes (none a multiple of 512 but the total). */
static int g_split(struct fake_seg *s, int n, uint64_t gpa, uint32_t len, bool write)
{
	uint32_t left = len, i;

	for (i = 0; i < (uint32_t)n; i++) {
		uint32_t piece = len / (uint32_t)n + (i % 2 ? 37u : 0u) - (i % 3 ? 11u : 0u);

		if (i + 1 == (uint32_t)n || piece >= left)
			piece = left;
		s[i] = (struct fake_seg){ gpa + (len - left), piece, write };
		left -= piece;
		if (!left)
			return (int)i + 1;
	}
	return n;
}

/* Read or write len bytes at sector through a chain of nseg data segments. */
static int g_io(struct world *w, uint32_t type, uint64_t sector, uint64_t gpa, uint32_t len, int nseg)
{
	struct fake_seg s[64];
	int n = g_split(s, nseg, gpa, len, type == VIRTIO_BLK_T_IN);
	uint32_t used;
	int st = g_do(w, type, sector, s, n, &used);

	CHECK(st != VIRTIO_BLK_S_OK || used == (type == VIRTIO_BLK_T_IN ? len + 1 : 1));
	return st;
}

static void *loop_main(void *opaque)
{
	evloop_run(opaque);
	return NULL;
}

static void world_init(struct world *w, bool ro, const char *serial)
{
	struct blk_config cfg = { .base = 0xd0000000, .gsi = 6, .read_only = ro, .serial = serial };

	memset(w, 0, sizeof(*w));
	w->ro = ro;
	w->fd = disk_new(w->path, sizeof(w->path), DISK_SIZE);
	CHECK(evloop_new(&w->loop) == 0);
	w->vm = fake_vm_new(RAM_SIZE, w->loop);
	cfg.path = w->path;
	CHECK(blk_new(w->vm, &cfg, &w->blk) == 0);
	CHECK(blk_capacity(w->blk) == DISK_SECTORS);
	CHECK(pthread_create(&w->thread, NULL, loop_main, w->loop) == 0);
	g_probe(w);
}

static void world_fini(struct world *w)
{
	evloop_stop(w->loop);
	CHECK(pthread_join(w->thread, NULL) == 0);
	blk_free(w->blk);
	fake_vm_free(w->vm);
	evloop_free(w->loop);
	close(w->fd);
	unlink(w->path);
}

/* A new VMM process: same guest memory, a fresh loop (not running yet), no device. */
static void world_reload(struct world *w)
{
	evloop_stop(w->loop);
	CHECK(pthread_join(w->thread, NULL) == 0);
	blk_free(w->blk);
	w->blk = NULL;
	evloop_free(w->loop);
	CHECK(evloop_new(&w->loop) == 0);
	w->vm->loop = w->loop;
}

/* Start the loop of a restored device and wait for the interrupt it owes the guest. */
static void world_resume(struct world *w)
{
	int e0 = fake_vm_irq_edges(w->vm);
	int64_t t0 = fake_test_now_ms();

	CHECK(pthread_create(&w->thread, NULL, loop_main, w->loop) == 0);
	while (fake_vm_irq_edges(w->vm) == e0) {
		CHECK(fake_test_now_ms() - t0 < 10000);
		poll(NULL, 0, 1);
	}
}

static void host_read(struct world *w, uint64_t off, void *buf, size_t len)
{
	CHECK(pread(w->fd, buf, len, (off_t)off) == (ssize_t)len);
}

/* A device made with cfg on w's VM must refuse the saved sections. */
static void restore_refused(struct world *w, const struct blk_config *cfg, const struct snap_reader *rd)
{
	struct blk *other = NULL;

	CHECK(blk_new(w->vm, cfg, &other) == 0);
	CHECK(blk_restore(other, rd, 1) == -EINVAL);
	blk_free(other);
}

/* Fill the whole disk with the pattern of seed; returns a copy of it (free it). */
static uint8_t *disk_fill(struct world *w, uint32_t seed)
{
	uint8_t *pat = malloc(DISK_SIZE);

	CHECK(pat);
	fake_test_pattern(pat, DISK_SIZE, seed);
	CHECK(pwrite(w->fd, pat, DISK_SIZE, 0) == DISK_SIZE);
	return pat;
}

/* CHECK the disk still holds what disk_fill() wrote (then free that copy). */
static void disk_unchanged(struct world *w, uint8_t *pat)
{
	uint8_t *now = malloc(DISK_SIZE);

	CHECK(now);
	host_read(w, 0, now, DISK_SIZE);
	CHECK(memcmp(pat, now, DISK_SIZE) == 0);
	free(now);
	free(pat);
}

/* ------------------------------------------------------------------ tests */

static void test_roundtrip(void)
{
	struct world w;
	uint32_t len = 64 * 1024 + 512;
	uint8_t *want = malloc(len), *got = malloc(len);
	uint8_t *src = NULL, *dst = NULL;
	int nseg;

	cur_test = "roundtrip";
	CHECK(want && got);
	world_init(&w, false, NULL);
	src = gmem(&w, G_DATA);
	dst = gmem(&w, G_DATA + (2u << 20));
	for (nseg = 1; nseg <= 62; nseg += 7) {
		uint64_t sector = 100 + (uint64_t)nseg * 200;

		fake_test_pattern(want, len, (uint32_t)nseg);
		memcpy(src, want, len);
		CHECK(g_io(&w, VIRTIO_BLK_T_OUT, sector, G_DATA, len, nseg) == VIRTIO_BLK_S_OK);
		host_read(&w, sector * 512, got, len);
		CHECK(memcmp(got, want, len) == 0); /* byte-exact on disk */
		memset(dst, 0xaa, len + 512);
		CHECK(g_io(&w, VIRTIO_BLK_T_IN, sector, G_DATA + (2u << 20), len, 63 - nseg) == VIRTIO_BLK_S_OK);
		CHECK(memcmp(dst, want, len) == 0);
		CHECK(fake_test_all(dst + len, 512, 0xaa)); /* nothing past the request */
	}

	/* the host's bytes reach the guest; a hole of the sparse file reads as zeros */
	fake_test_pattern(want, 4096, 77);
	CHECK(pwrite(w.fd, want, 4096, 7000 * 512) == 4096);
	memset(dst, 0xaa, 8192);
	CHECK(g_io(&w, VIRTIO_BLK_T_IN, 7000, G_DATA + (2u << 20), 8192, 3) == VIRTIO_BLK_S_OK);
	CHECK(memcmp(dst, want, 4096) == 0);
	CHECK(fake_test_all(dst + 4096, 4096, 0));

	/* other layouts: header and data in one descriptor, data and status in one */
	{
		struct virtio_blk_outhdr h = { .type = VIRTIO_BLK_T_OUT, .sector = 9000 };
		struct fake_seg s[2];
		int tag;
		uint32_t used;

		memcpy(src, &h, 16);
		fake_test_pattern(src + 16, 1024, 5);
		memcpy(want, src + 16, 1024);
		s[0] = (struct fake_seg){ G_DATA, 16 + 1024, false };
		s[1] = (struct fake_seg){ G_DATA + 4096, 1, true };
		src[4096] = 0xff;
		gq_add(&w, s, 2, 7);
		fake_ring_kick(&w.q);
		CHECK(fake_ring_wait(&w.q, &tag, &used) && tag == 7 && used == 1 && src[4096] == VIRTIO_BLK_S_OK);
		host_read(&w, 9000 * 512, got, 1024);
		CHECK(memcmp(got, want, 1024) == 0);

		h.type = VIRTIO_BLK_T_IN;
		memcpy(src, &h, 16);
		memset(dst, 0xaa, 2048);
		s[0] = (struct fake_seg){ G_DATA, 16, false };
		s[1] = (struct fake_seg){ G_DATA + (2u << 20), 1024 + 1, true };
		gq_add(&w, s, 2, 8);
		fake_ring_kick(&w.q);
		CHECK(fake_ring_wait(&w.q, &tag, &used) && tag == 8 && used == 1025 && dst[1024] == VIRTIO_BLK_S_OK);
		CHECK(memcmp(dst, want, 1024) == 0);

		/* the header itself split over two descriptors */
		struct fake_seg t[4] = { { G_DATA, 8, false }, { G_DATA + 8, 8, false },
				     { G_DATA + (2u << 20), 1024, true }, { G_DATA + 4096, 1, true } };

		memset(dst, 0xaa, 1024);
		src[4096] = 0xff;
		gq_add(&w, t, 4, 9);
		fake_ring_kick(&w.q);
		CHECK(fake_ring_wait(&w.q, &tag, &used) && tag == 9 && used == 1025 && src[4096] == VIRTIO_BLK_S_OK);
		CHECK(memcmp(dst, want, 1024) == 0);
	}

	/* the last sector; zero-length transfers are fine anywhere up to the end */
	fake_test_pattern(src, 512, 9);
	CHECK(g_io(&w, VIRTIO_BLK_T_OUT, DISK_SECTORS - 1, G_DATA, 512, 2) == VIRTIO_BLK_S_OK);
	host_read(&w, DISK_SIZE - 512, got, 512);
	CHECK(memcmp(got, src, 512) == 0);
	CHECK(g_do(&w, VIRTIO_BLK_T_IN, DISK_SECTORS, NULL, 0, NULL) == VIRTIO_BLK_S_OK);
	CHECK(!fake_driver_broken(w.vm));
	world_fini(&w);
	free(want);
	free(got);
}

static void test_many_in_flight(void)
{
	enum { N = 48, SZ = 32 * 1024 };
	struct world w;
	bool seen[N] = { false };
	int i, edges0;
	uint8_t *buf = malloc(SZ);

	cur_test = "many_in_flight";
	CHECK(buf);
	world_init(&w, false, NULL);
	/* writes to distinct places (5 descriptors each), all posted before one kick */
	for (i = 0; i < N; i++) {
		struct fake_seg s[3];
		int n = g_split(s, 3, G_DATA + (uint64_t)i * SZ / 4, SZ / 4, false);

		fake_test_pattern(gmem(&w, G_DATA + (uint64_t)i * SZ / 4), SZ / 4, (uint32_t)i + 1000);
		g_post(&w, i, VIRTIO_BLK_T_OUT, (uint64_t)i * (SZ / 512), s, n);
	}
	edges0 = fake_vm_irq_edges(w.vm);
	fake_ring_kick(&w.q);
	for (i = 0; i < N; i++) {
		int tag;
		uint32_t len;

		CHECK(fake_ring_wait(&w.q, &tag, &len));
		CHECK(tag >= 0 && tag < N && !seen[tag] && len == 1);
		CHECK(*gmem(&w, G_STATUS + (uint64_t)tag) == VIRTIO_BLK_S_OK);
		seen[tag] = true;
	}
	CHECK(fake_vm_irq_edges(w.vm) > edges0);
	/* and read them all back at once, larger than written: the rest is a hole */
	memset(gmem(&w, G_DATA), 0xaa, (size_t)N * SZ);
	for (i = 0; i < N; i++) {
		struct fake_seg s = { G_DATA + (uint64_t)i * SZ, SZ, true };

		g_post(&w, i, VIRTIO_BLK_T_IN, (uint64_t)i * (SZ / 512), &s, 1);
	}
	fake_ring_kick(&w.q);
	for (i = 0; i < N; i++) {
		int tag;
		uint32_t len;

		CHECK(fake_ring_wait(&w.q, &tag, &len) && len == SZ + 1);
		CHECK(*gmem(&w, G_STATUS + (uint64_t)tag) == VIRTIO_BLK_S_OK);
	}
	for (i = 0; i < N; i++) {
		fake_test_pattern(buf, SZ / 4, (uint32_t)i + 1000);
		CHECK(memcmp(gmem(&w, G_DATA + (uint64_t)i * SZ), buf, SZ / 4) == 0);
		CHECK(fake_test_all(gmem(&w, G_DATA + (uint64_t)i * SZ + SZ / 4), SZ - SZ / 4, 0));
	}
	world_fini(&w);
	free(buf);
}

static void test_flush_get_id_unsupp(void)
{
	struct world w;
	struct fake_seg id = { G_DATA, 20, true };
	uint32_t len;
	uint32_t types[] = { VIRTIO_BLK_T_SCSI_CMD, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES,
			     VIRTIO_BLK_T_SECURE_ERASE, 99, VIRTIO_BLK_T_BARRIER | VIRTIO_BLK_T_OUT };
	unsigned i;

	cur_test = "flush_get_id_unsupp";
	world_init(&w, false, "smolvm-disk-0");
	CHECK(g_do(&w, VIRTIO_BLK_T_FLUSH, 0, NULL, 0, &len) == VIRTIO_BLK_S_OK && len == 1);
	CHECK(g_do(&w, VIRTIO_BLK_T_FLUSH, UINT64_MAX, NULL, 0, &len) == VIRTIO_BLK_S_OK); /* sector unused */
	memset(gmem(&w, G_DATA), 0xaa, 64);
	CHECK(g_do(&w, VIRTIO_BLK_T_GET_ID, 0, &id, 1, &len) == VIRTIO_BLK_S_OK && len == 21);
	CHECK(memcmp(gmem(&w, G_DATA), "smolvm-disk-0\0\0\0\0\0\0\0", 20) == 0);
	CHECK(*gmem(&w, G_DATA + 20) == 0xaa);
	id.len = 5; /* a short buffer gets what fits */
	memset(gmem(&w, G_DATA), 0xaa, 64);
	CHECK(g_do(&w, VIRTIO_BLK_T_GET_ID, 0, &id, 1, &len) == VIRTIO_BLK_S_OK && len == 6);
	CHECK(memcmp(gmem(&w, G_DATA), "smolv\xaa", 6) == 0);
	for (i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
		struct fake_seg d = { G_DATA, 512, false };

		CHECK(g_do(&w, types[i], 0, &d, 1, &len) == VIRTIO_BLK_S_UNSUPP && len == 1);
	}
	/* FLUSH with data attached, GET_ID with a readable buffer */
	id.write = false;
	CHECK(g_do(&w, VIRTIO_BLK_T_FLUSH, 0, &id, 1, NULL) == VIRTIO_BLK_S_IOERR);
	CHECK(g_do(&w, VIRTIO_BLK_T_GET_ID, 0, &id, 1, NULL) == VIRTIO_BLK_S_IOERR);
	CHECK(!fake_driver_broken(w.vm));
	world_fini(&w);

	world_init(&w, false, "01234567890123456789"); /* exactly 20 bytes: no NUL */
	id = (struct fake_seg){ G_DATA, 32, true };
	memset(gmem(&w, G_DATA), 0xaa, 64);
	CHECK(g_do(&w, VIRTIO_BLK_T_GET_ID, 0, &id, 1, &len) == VIRTIO_BLK_S_OK && len == 21);
	CHECK(memcmp(gmem(&w, G_DATA), "01234567890123456789\xaa", 21) == 0);
	world_fini(&w);
}

/* Requests the device must answer with IOERR, leaving the disk as it was. */
static void test_bad_requests(void)
{
	struct world w;
	uint8_t *before;
	struct fake_seg s[64];
	uint32_t len;
	int i;

	cur_test = "bad_requests";
	world_init(&w, false, NULL);
	before = disk_fill(&w, 3);
	fake_test_pattern(gmem(&w, G_DATA), 1u << 20, 4);

	/* out of range: at the end, straddling it, far beyond, and sector * 512 or sector + n overflowing */
	CHECK(g_io(&w, VIRTIO_BLK_T_OUT, DISK_SECTORS, G_DATA, 512, 1) == VIRTIO_BLK_S_IOERR);
	CHECK(g_io(&w, VIRTIO_BLK_T_OUT, DISK_SECTORS - 1, G_DATA, 1024, 2) == VIRTIO_BLK_S_IOERR);
	CHECK(g_io(&w, VIRTIO_BLK_T_IN, DISK_SECTORS - 1, G_DATA, 1024, 2) == VIRTIO_BLK_S_IOERR);
	CHECK(g_io(&w, VIRTIO_BLK_T_OUT, 1ull << 40, G_DATA, 512, 1) == VIRTIO_BLK_S_IOERR);
	CHECK(g_io(&w, VIRTIO_BLK_T_OUT, (UINT64_MAX / 512) + 1, G_DATA, 512, 1) == VIRTIO_BLK_S_IOERR);
	CHECK(g_io(&w, VIRTIO_BLK_T_OUT, UINT64_MAX, G_DATA, 512, 1) == VIRTIO_BLK_S_IOERR);
	CHECK(g_io(&w, VIRTIO_BLK_T_IN, UINT64_MAX - 1, G_DATA, 1024, 1) == VIRTIO_BLK_S_IOERR);
	CHECK(g_do(&w, VIRTIO_BLK_T_IN, DISK_SECTORS + 1, NULL, 0, NULL) == VIRTIO_BLK_S_IOERR);

	/* length not a multiple of 512 */
	CHECK(g_io(&w, VIRTIO_BLK_T_OUT, 10, G_DATA, 1000, 3) == VIRTIO_BLK_S_IOERR);
	CHECK(g_io(&w, VIRTIO_BLK_T_OUT, 10, G_DATA, 511, 1) == VIRTIO_BLK_S_IOERR);
	CHECK(g_io(&w, VIRTIO_BLK_T_IN, 10, G_DATA, 513, 2) == VIRTIO_BLK_S_IOERR);

	/* data of the wrong direction */
	s[0] = (struct fake_seg){ G_DATA, 512, false };
	CHECK(g_do(&w, VIRTIO_BLK_T_IN, 10, s, 1, NULL) == VIRTIO_BLK_S_IOERR);
	s[0].write = true;
	memset(gmem(&w, G_DATA), 0x11, 512);
	CHECK(g_do(&w, VIRTIO_BLK_T_OUT, 10, s, 1, NULL) == VIRTIO_BLK_S_IOERR);
	CHECK(fake_test_all(gmem(&w, G_DATA), 512, 0x11));

	/* more data than BLK_MAX_DATA: 62 segments of 4 MiB, all over the same guest pages */
	for (i = 0; i < 62; i++)
		s[i] = (struct fake_seg){ G_DATA, 4u << 20, true };
	CHECK(g_do(&w, VIRTIO_BLK_T_IN, 0, s, 62, NULL) == VIRTIO_BLK_S_IOERR);
	CHECK(fake_test_all(gmem(&w, G_DATA), 512, 0x11)); /* untouched */
	for (i = 0; i < 62; i++)
		s[i].write = false;
	CHECK(g_do(&w, VIRTIO_BLK_T_OUT, 0, s, 62, NULL) == VIRTIO_BLK_S_IOERR);

	/* header too short (8 bytes), or none at all */
	{
		int tag;
		struct fake_seg c[2] = { { G_HDR, 8, false }, { G_STATUS, 1, true } };

		*gmem(&w, G_STATUS) = 0xff;
		memset(gmem(&w, G_HDR), 0, 16); /* would be a valid IN of sector 0 if 16 bytes long */
		gq_add(&w, c, 2, 1);
		fake_ring_kick(&w.q);
		CHECK(fake_ring_wait(&w.q, &tag, &len) && tag == 1 && len == 1);
		CHECK(*gmem(&w, G_STATUS) == VIRTIO_BLK_S_IOERR);
		*gmem(&w, G_STATUS) = 0xff;
		gq_add(&w, c + 1, 1, 2);
		fake_ring_kick(&w.q);
		CHECK(fake_ring_wait(&w.q, &tag, &len) && tag == 2 && len == 1);
		CHECK(*gmem(&w, G_STATUS) == VIRTIO_BLK_S_IOERR);
	}
	CHECK(!fake_driver_broken(w.vm));
	disk_unchanged(&w, before);
	world_fini(&w);
}

/* Chains that break the protocol: the device must stop (NEEDS_RESET) and work again after a reset. */
static void test_device_errors(void)
{
	struct world w;
	struct fake_seg s[80];
	int i, round;

	cur_test = "device_errors";
	world_init(&w, false, NULL);
	for (round = 0; round < 7; round++) {
		uint32_t len;
		int n;

		switch (round) {
		case 0: /* status not writable */
			s[0] = (struct fake_seg){ G_HDR, 16, false };
			s[1] = (struct fake_seg){ G_STATUS, 1, false };
			n = 2;
			break;
		case 1: /* writable status of length 0 */
			s[0] = (struct fake_seg){ G_HDR, 16, false };
			s[1] = (struct fake_seg){ G_DATA, 512, true };
			s[2] = (struct fake_seg){ G_STATUS, 0, true };
			n = 3;
			break;
		case 2: /* readable after writable (status not last) */
			s[0] = (struct fake_seg){ G_HDR, 16, false };
			s[1] = (struct fake_seg){ G_STATUS, 1, true };
			s[2] = (struct fake_seg){ G_DATA, 512, false };
			n = 3;
			break;
		case 3: /* chain too long: header, 70 data segments, status */
			s[0] = (struct fake_seg){ G_HDR, 16, false };
			for (i = 1; i <= 70; i++)
				s[i] = (struct fake_seg){ G_DATA + (uint64_t)i * 512, 512, true };
			s[71] = (struct fake_seg){ G_STATUS, 1, true };
			n = 72;
			break;
		case 4: /* data descriptor running off the end of RAM */
			s[0] = (struct fake_seg){ G_HDR, 16, false };
			s[1] = (struct fake_seg){ RAM_SIZE - 100, 512, true };
			s[2] = (struct fake_seg){ G_STATUS, 1, true };
			n = 3;
			break;
		case 5: /* data descriptor in the MMIO gap / far above RAM */
			s[0] = (struct fake_seg){ G_HDR, 16, false };
			s[1] = (struct fake_seg){ VM_GAP_START, 512, true };
			s[2] = (struct fake_seg){ UINT64_MAX - 100, 512, true };
			s[3] = (struct fake_seg){ G_STATUS, 1, true };
			n = 4;
			break;
		default: /* status byte outside RAM */
			s[0] = (struct fake_seg){ G_HDR, 16, false };
			s[1] = (struct fake_seg){ RAM_SIZE, 1, true };
			n = 2;
			break;
		}
		memset(gmem(&w, G_HDR), 0, 16); /* VIRTIO_BLK_T_IN, sector 0 */
		*gmem(&w, G_STATUS) = 0xff;
		gq_add(&w, s, n, round);
		fake_ring_kick(&w.q);
		g_wait_broken(&w);
		CHECK(*gmem(&w, G_STATUS) == 0xff);
		/* a reset brings it back */
		g_probe(&w);
		CHECK(!fake_driver_broken(w.vm));
		s[0] = (struct fake_seg){ G_DATA, 1024, true };
		CHECK(g_do(&w, VIRTIO_BLK_T_IN, 0, s, 1, &len) == VIRTIO_BLK_S_OK && len == 1025);
	}
	world_fini(&w);
}

static void test_read_only(void)
{
	struct world w;
	uint8_t *before;
	struct stat st0, st1;
	uint32_t len;

	cur_test = "read_only";
	world_init(&w, true, NULL);
	before = disk_fill(&w, 11);
	CHECK(fstat(w.fd, &st0) == 0);
	poll(NULL, 0, 20); /* so a write would move the mtime */
	fake_test_pattern(gmem(&w, G_DATA), 8192, 12);
	CHECK(g_io(&w, VIRTIO_BLK_T_OUT, 0, G_DATA, 4096, 3) == VIRTIO_BLK_S_IOERR);
	CHECK(g_io(&w, VIRTIO_BLK_T_OUT, 100, G_DATA, 512, 1) == VIRTIO_BLK_S_IOERR);
	CHECK(g_io(&w, VIRTIO_BLK_T_OUT, DISK_SECTORS, G_DATA, 512, 1) == VIRTIO_BLK_S_IOERR);
	CHECK(g_do(&w, VIRTIO_BLK_T_FLUSH, 0, NULL, 0, &len) == VIRTIO_BLK_S_OK && len == 1);
	CHECK(g_io(&w, VIRTIO_BLK_T_IN, 8, G_DATA, 8192, 4) == VIRTIO_BLK_S_OK);
	CHECK(memcmp(gmem(&w, G_DATA), before + 8 * 512, 8192) == 0);
	CHECK(!fake_driver_broken(w.vm));
	disk_unchanged(&w, before);
	CHECK(fstat(w.fd, &st1) == 0);
	CHECK(st0.st_mtim.tv_sec == st1.st_mtim.tv_sec && st0.st_mtim.tv_nsec == st1.st_mtim.tv_nsec);
	world_fini(&w);
}

/* The image shrinks under the device: reads past the new end of file are zero-filled. */
static void test_eof_zero_fill(void)
{
	struct world w;
	uint8_t buf[1024];

	cur_test = "eof_zero_fill";
	world_init(&w, false, NULL);
	fake_test_pattern(buf, sizeof(buf), 21);
	CHECK(pwrite(w.fd, buf, sizeof(buf), (4u << 20) - 1024) == 1024);
	CHECK(ftruncate(w.fd, 4u << 20) == 0);
	memset(gmem(&w, G_DATA), 0xaa, 16384);
	CHECK(g_io(&w, VIRTIO_BLK_T_IN, ((4u << 20) - 1024) / 512, G_DATA, 8192, 5) == VIRTIO_BLK_S_OK);
	CHECK(memcmp(gmem(&w, G_DATA), buf, 1024) == 0);
	CHECK(fake_test_all(gmem(&w, G_DATA + 1024), 8192 - 1024, 0));
	CHECK(fake_test_all(gmem(&w, G_DATA + 8192), 8192, 0xaa));
	memset(gmem(&w, G_DATA), 0xaa, 16384);
	CHECK(g_io(&w, VIRTIO_BLK_T_IN, (6u << 20) / 512, G_DATA, 4096, 2) == VIRTIO_BLK_S_OK);
	CHECK(fake_test_all(gmem(&w, G_DATA), 4096, 0));
	world_fini(&w);
}

/*
 * Reset with many reads in flight: once the reset write returns, the device
 * must never again write guest memory (data, status bytes or used ring).
 */
static void test_reset_in_flight(void)
{
	enum { N = 48, SZ = 256 * 1024 };
	struct world w;
	int round, i;

	cur_test = "reset_in_flight";
	world_init(&w, false, NULL);
	free(disk_fill(&w, 31));
	for (round = 0; round < 20; round++) {
		/* out of the page cache, so the reads really are in flight (where the file system allows) */
		CHECK(fdatasync(w.fd) == 0);
		posix_fadvise(w.fd, 0, 0, POSIX_FADV_DONTNEED);
		for (i = 0; i < N; i++) {
			struct fake_seg s[3];
			int n = g_split(s, 3, G_DATA + (uint64_t)i * SZ, SZ, true);

			g_post(&w, i, VIRTIO_BLK_T_IN, (uint64_t)((i * 7 + round) % 32) * (SZ / 512), s, n);
		}
		fake_ring_kick(&w.q);
		if (round % 4)
			poll(NULL, 0, round % 4 - 1); /* catch some of them done, some not */
		fake_vm_mw(w.vm, VIRTIO_MMIO_STATUS, 0);
		CHECK(fake_vm_mr(w.vm, VIRTIO_MMIO_STATUS) == 0);
		/* the reset is done: the guest owns all of this again */
		memset(gmem(&w, G_DATA), 0x5a, (size_t)N * SZ);
		memset(gmem(&w, G_STATUS), 0xee, N);
		memset(gmem(&w, G_QBASE + 0x2000), 0, 0x1000);
		poll(NULL, 0, 30);
		CHECK(fake_test_all(gmem(&w, G_DATA), (size_t)N * SZ, 0x5a));
		CHECK(fake_test_all(gmem(&w, G_STATUS), N, 0xee));
		CHECK(fake_test_all(gmem(&w, G_QBASE + 0x2000), 0x1000, 0));
		g_probe(&w);
	}
	/* and the device still works */
	CHECK(g_io(&w, VIRTIO_BLK_T_OUT, 3, G_DATA, 4096, 3) == VIRTIO_BLK_S_OK);
	memset(gmem(&w, G_DATA + 8192), 0, 4096);
	CHECK(g_io(&w, VIRTIO_BLK_T_IN, 3, G_DATA + 8192, 4096, 2) == VIRTIO_BLK_S_OK);
	CHECK(memcmp(gmem(&w, G_DATA), gmem(&w, G_DATA + 8192), 4096) == 0);

	/* free with requests in flight: blk_free waits for them */
	for (i = 0; i < N; i++) {
		struct fake_seg s = { G_DATA + (uint64_t)i * SZ, SZ, true };

		g_post(&w, i, VIRTIO_BLK_T_IN, (uint64_t)(i % 32) * (SZ / 512), &s, 1);
	}
	fake_ring_kick(&w.q);
	world_fini(&w);
}

/* The guest asks for no interrupts: completions still land, without an edge. */
static void test_no_interrupt(void)
{
	struct world w;
	struct fake_seg s = { G_DATA, 4096, true };
	int tag, e0;
	uint32_t len;

	cur_test = "no_interrupt";
	world_init(&w, false, NULL);
	__atomic_store_n(&w.q.avail->flags, VRING_AVAIL_F_NO_INTERRUPT, __ATOMIC_SEQ_CST);
	e0 = fake_vm_irq_edges(w.vm);
	g_post(&w, 0, VIRTIO_BLK_T_IN, 0, &s, 1);
	fake_ring_kick(&w.q);
	CHECK(fake_ring_wait(&w.q, &tag, &len) && len == 4097);
	CHECK(fake_vm_irq_edges(w.vm) == e0);
	__atomic_store_n(&w.q.avail->flags, 0, __ATOMIC_SEQ_CST);
	g_post(&w, 0, VIRTIO_BLK_T_IN, 0, &s, 1);
	fake_ring_kick(&w.q);
	CHECK(fake_ring_wait(&w.q, &tag, &len) && len == 4097);
	CHECK(fake_vm_irq_edges(w.vm) > e0);
	CHECK(fake_vm_mr(w.vm, VIRTIO_MMIO_INTERRUPT_STATUS) & 1);
	world_fini(&w);
}

/*
 * Snapshot with requests posted: blk_save completes them all before it
 * returns; a new device restored from the sections carries on, and sends
 * the guest an interrupt once its loop runs.
 */
static void test_save_restore(void)
{
	enum { N = 40, SZ = 64 * 1024 };
	struct blk_config cfg = { .base = 0xd0000000, .gsi = 6 };
	struct snap_writer wr = { 0 };
	struct snap_reader rd = { 0 };
	struct world w;
	uint8_t *pat;
	int i;

	cur_test = "save_restore";
	fake_snap_clear();
	world_init(&w, false, NULL);
	pat = disk_fill(&w, 41);
	memset(gmem(&w, G_DATA), 0xaa, (size_t)N * SZ);
	for (i = 0; i < N; i++) {
		struct fake_seg s = { G_DATA + (uint64_t)i * SZ, SZ, true };

		g_post(&w, i, VIRTIO_BLK_T_IN, (uint64_t)i * (SZ / 512), &s, 1);
		if (i == N / 2)
			fake_ring_kick(&w.q); /* the second half is posted but never kicked */
	}
	blk_save(w.blk, &wr, 1);
	CHECK(__atomic_load_n(&w.q.used->idx, __ATOMIC_ACQUIRE) == N); /* all done, no waiting */
	for (i = 0; i < N; i++) {
		int tag;
		uint32_t len;

		CHECK(fake_ring_used(&w.q, &tag, &len) && len == SZ + 1);
		CHECK(*gmem(&w, G_STATUS + (uint64_t)tag) == VIRTIO_BLK_S_OK);
		CHECK(memcmp(gmem(&w, G_DATA + (uint64_t)tag * SZ), pat + (size_t)tag * SZ, SZ) == 0);
	}
	CHECK(snap_get(&rd, SNAP_DEV_MMIO, 1, &(uint32_t){ 0 }) && snap_get(&rd, SNAP_DEV_BLK, 1, &(uint32_t){ 0 }));

	world_reload(&w);
	cfg.path = w.path;
	CHECK(ftruncate(w.fd, DISK_SIZE * 2) == 0); /* another disk: refused */
	restore_refused(&w, &cfg, &rd);
	CHECK(ftruncate(w.fd, DISK_SIZE) == 0);
	cfg.read_only = true;
	restore_refused(&w, &cfg, &rd);
	cfg.read_only = false;
	CHECK(blk_new(w.vm, &cfg, &w.blk) == 0);
	CHECK(blk_restore(w.blk, &rd, 2) == -EINVAL); /* no such slot */
	CHECK(blk_restore(w.blk, &rd, 1) == 0);
	CHECK(fake_vm_mr(w.vm, VIRTIO_MMIO_STATUS) == 0xf);
	world_resume(&w);
	fake_test_pattern(gmem(&w, G_DATA), 4096, 42);
	CHECK(g_io(&w, VIRTIO_BLK_T_OUT, 5, G_DATA, 4096, 3) == VIRTIO_BLK_S_OK);
	CHECK(g_io(&w, VIRTIO_BLK_T_IN, 5, G_DATA + SZ, 4096, 2) == VIRTIO_BLK_S_OK);
	CHECK(memcmp(gmem(&w, G_DATA), gmem(&w, G_DATA + SZ), 4096) == 0);
	CHECK(!fake_driver_broken(w.vm));
	world_fini(&w);
	free(pat);
}

/* A disk that was empty at save time comes back bigger: config-change interrupt, new capacity. */
static void test_restore_resized(void)
{
	struct blk_config cfg = { .base = 0xd0000000, .gsi = 6 };
	struct snap_writer wr = { 0 };
	struct snap_reader rd = { 0 };
	struct world w;
	uint64_t *cap;
	uint32_t len = 0, gen0;

	cur_test = "restore_resized";
	fake_snap_clear();
	world_init(&w, false, NULL);
	blk_save(w.blk, &wr, 1);
	cap = (uint64_t *)snap_get(&rd, SNAP_DEV_BLK, 1, &len); /* first field: capacity */
	CHECK(cap && len >= sizeof(*cap) && *cap == DISK_SECTORS);
	*cap = 0; /* as if the disk had been a 0-byte placeholder */
	world_reload(&w);
	cfg.path = w.path;
	cfg.read_only = true; /* a read-only disk must keep its size */
	restore_refused(&w, &cfg, &rd);
	cfg.read_only = false;
	CHECK(blk_new(w.vm, &cfg, &w.blk) == 0);
	CHECK(blk_restore(w.blk, &rd, 1) == 0);
	gen0 = fake_vm_mr(w.vm, VIRTIO_MMIO_CONFIG_GENERATION);
	CHECK(!(fake_vm_mr(w.vm, VIRTIO_MMIO_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG));
	world_resume(&w);
	CHECK(fake_vm_mr(w.vm, VIRTIO_MMIO_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG);
	CHECK(fake_vm_mr(w.vm, VIRTIO_MMIO_CONFIG_GENERATION) == gen0 + 1);
	CHECK(config_read64(&w, 0) == DISK_SECTORS);
	CHECK(g_io(&w, VIRTIO_BLK_T_IN, DISK_SECTORS - 8, G_DATA, 4096, 2) == VIRTIO_BLK_S_OK);
	CHECK(!fake_driver_broken(w.vm));
	world_fini(&w);
}

static void test_new_errors(void)
{
	struct evloop *loop = NULL;
	struct vm *vm;
	struct blk *b = (struct blk *)&b, *b2 = NULL, *b3 = NULL;
	struct blk_config cfg = { .base = 0xd0000000, .gsi = 6 };
	char path[256], dir[300];
	int fd;

	cur_test = "new_errors";
	CHECK(evloop_new(&loop) == 0);
	vm = fake_vm_new(RAM_SIZE, loop);
	fd = disk_new(path, sizeof(path), DISK_SIZE + 100);
	cfg.path = path;
	CHECK(blk_new(vm, &cfg, &b) == -EINVAL && b == NULL); /* size not a multiple of 512 */
	cfg.read_only = true;
	CHECK(blk_new(vm, &cfg, &b) == -EINVAL && b == NULL);
	CHECK(ftruncate(fd, DISK_SIZE) == 0);
	cfg.read_only = false;
	cfg.serial = "012345678901234567890"; /* 21 bytes */
	CHECK(blk_new(vm, &cfg, &b) == -EINVAL && b == NULL);
	cfg.serial = NULL;
	cfg.path = NULL;
	CHECK(blk_new(vm, &cfg, &b) == -EINVAL);
	snprintf(dir, sizeof(dir), "%s.missing", path);
	cfg.path = dir;
	CHECK(blk_new(vm, &cfg, &b) == -ENOENT);
	CHECK(mkdir(dir, 0700) == 0);
	cfg.read_only = true;
	CHECK(blk_new(vm, &cfg, &b) == -EINVAL); /* not a file */
	CHECK(rmdir(dir) == 0);
	cfg.path = path;
	vm->loop = NULL;
	CHECK(blk_new(vm, &cfg, &b) == -EINVAL);
	vm->loop = loop;
	CHECK(vm->nr_mmio == 0 && b == NULL);
	/* one writer excludes everyone else; readers share */
	cfg.read_only = false;
	CHECK(blk_new(vm, &cfg, &b) == 0 && b);
	CHECK(blk_new(vm, &cfg, &b2) == -EBUSY && b2 == NULL);
	cfg.read_only = true;
	CHECK(blk_new(vm, &cfg, &b2) == -EBUSY);
	blk_free(b);
	CHECK(blk_new(vm, &cfg, &b) == 0);
	CHECK(blk_new(vm, &cfg, &b2) == 0);
	cfg.read_only = false;
	CHECK(blk_new(vm, &cfg, &b3) == -EBUSY && b3 == NULL);
	blk_free(b);
	blk_free(b2);
	blk_free(NULL);
	/* a zero-length image is a disk of capacity 0 */
	CHECK(ftruncate(fd, 0) == 0);
	CHECK(blk_new(vm, &cfg, &b) == 0 && blk_capacity(b) == 0);
	blk_free(b);
	close(fd);
	unlink(path);
	fake_vm_free(vm);
	evloop_free(loop);
}

int main(void)
{
	struct evloop *probe = NULL;
	int err;

	setvbuf(stdout, NULL, _IONBF, 0);
	err = evloop_new(&probe);
	if (err == -ENOSYS || err == -EPERM) {
		printf("io_uring is not available here: %s\n", strerror(-err));
		return 77;
	}
	CHECK(err == 0);
	evloop_free(probe);
	test_new_errors();
	test_roundtrip();
	test_many_in_flight();
	test_flush_get_id_unsupp();
	test_bad_requests();
	test_device_errors();
	test_read_only();
	test_eof_zero_fill();
	test_reset_in_flight();
	test_no_interrupt();
	test_save_restore();
	test_restore_resized();
	printf("all blk tests passed\n");
	return 0;
}
