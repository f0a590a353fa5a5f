/* SETUP in the guest agent: entropy, clock, hostname, the network (netcfg.c) and the overlay root over the image. */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"
#include "netcfg.h"

#ifndef BLKGETSIZE64
#define BLKGETSIZE64 _IOR(0x12, 114, size_t) /* <linux/fs.h>, which clashes with <sys/mount.h> */
#endif

/* SETUP with SMOLVM_SETUP_ROOT: where the disks are mounted (init mode). */
#define SETUP_SCRATCH_DEV "/dev/vdb"
#define SETUP_SCRATCH_DIR "/run/smolvm/scratch"
#define SETUP_ROOT_DIR "/run/smolvm/root"
#define SETUP_ROOT_WAIT_MS 60000u /* how long /dev/vdb may stay at 0 bytes */
#define SETUP_ROOT_POLL_MS 10u

/* SETUP NET: what the last SETUP asked for; the files are written once the root is final. */
static struct netcfg setup_net;
static bool setup_net_files_due;

/* Move the mount at from to to (mkdir'ing to first). Returns 0 or -errno. */
static int setup_move_mount(const char *from, const char *to)
{
	if (mkdir(to, 0755) < 0 && errno != EEXIST)
		return -errno;
	return mount(from, to, NULL, MS_MOVE, NULL) < 0 ? -errno : 0;
}

/*
 * The scratch disk has its size: mount it, lay the overlay over the image,
 * move /dev, /proc and /sys into it, give it a fresh /run and make it the
 * root of the agent (and so of every later command). On failure msg names the
 * step, what was done is undone as far as it can be, and -errno is returned.
 */
static int setup_root_switch(char *msg, size_t cap)
{
	static const char *const moved[] = { "/dev", "/proc", "/sys" };
	const char *step;
	char dst[64];
	int ret, n_moved = 0;
	bool scratch = false, overlay = false, run = false;

	ret = init_mkdir_p(SETUP_SCRATCH_DIR, 0755);
	step = "mkdir -p " SETUP_SCRATCH_DIR;
	if (ret < 0)
		goto fail;
	step = "mount " SETUP_SCRATCH_DEV " (ext4) on " SETUP_SCRATCH_DIR;
	/* noinit_itable: the host made the file system with lazy init; zeroing tables here would be slow */
	if (mount(SETUP_SCRATCH_DEV, SETUP_SCRATCH_DIR, "ext4", MS_NOATIME, "noinit_itable") < 0)
		goto fail_errno;
	scratch = true;
	step = "mkdir " SETUP_SCRATCH_DIR "/upper";
	if (mkdir(SETUP_SCRATCH_DIR "/upper", 0755) < 0 && errno != EEXIST)
		goto fail_errno;
	step = "mkdir " SETUP_SCRATCH_DIR "/work";
	if (mkdir(SETUP_SCRATCH_DIR "/work", 0755) < 0 && errno != EEXIST)
		goto fail_errno;
	ret = init_mkdir_p(SETUP_ROOT_DIR, 0755);
	step = "mkdir -p " SETUP_ROOT_DIR;
	if (ret < 0)
		goto fail;
	step = "mount overlay on " SETUP_ROOT_DIR;
	if (mount("overlay", SETUP_ROOT_DIR, "overlay", 0,
		  "lowerdir=" AGENT_IMAGE_DIR ",upperdir=" SETUP_SCRATCH_DIR "/upper,workdir=" SETUP_SCRATCH_DIR "/work") < 0)
		goto fail_errno;
	overlay = true;
	for (; n_moved < 3; n_moved++) {
		snprintf(dst, sizeof(dst), "%s%s", SETUP_ROOT_DIR, moved[n_moved]);
		ret = setup_move_mount(moved[n_moved], dst);
		step = moved[n_moved];
		if (ret < 0) {
			snprintf(msg, cap, "move %s into the new root: %s", moved[n_moved], strerror(-ret));
			goto undo;
		}
	}
	step = "mount tmpfs on " SETUP_ROOT_DIR "/run";
	if ((mkdir(SETUP_ROOT_DIR "/run", 0755) < 0 && errno != EEXIST) ||
	    mount("tmpfs", SETUP_ROOT_DIR "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755") < 0)
		goto fail_errno;
	run = true;
	/* switch_root: the new root's mount goes over / (not pivot_root: the initramfs cannot be unmounted) */
	step = "chdir " SETUP_ROOT_DIR;
	if (chdir(SETUP_ROOT_DIR) < 0)
		goto fail_errno;
	step = "move " SETUP_ROOT_DIR " to /";
	if (mount(".", "/", NULL, MS_MOVE, NULL) < 0) {
		ret = -errno;
		if (chdir("/") < 0)
			agent_log("chdir /: %s", strerror(errno));
		goto fail;
	}
	/* from here there is no way back: the overlay is mounted over / */
	if (chroot(".") < 0 || chdir("/") < 0) {
		ret = -errno;
		snprintf(msg, cap, "chroot into the new root: %s", strerror(-ret));
		return ret;
	}
	return 0;

fail_errno:
	ret = -errno;
fail:
	snprintf(msg, cap, "%s: %s", step, strerror(-ret));
undo:
	if (run && umount2(SETUP_ROOT_DIR "/run", MNT_DETACH) < 0)
		agent_log("undo: umount %s/run: %s", SETUP_ROOT_DIR, strerror(errno));
	while (n_moved-- > 0) {
		snprintf(dst, sizeof(dst), "%s%s", SETUP_ROOT_DIR, moved[n_moved]);
		if (mount(dst, moved[n_moved], NULL, MS_MOVE, NULL) < 0)
			agent_log("undo: move %s back: %s", moved[n_moved], strerror(errno));
	}
	if (overlay && umount2(SETUP_ROOT_DIR, MNT_DETACH) < 0)
		agent_log("undo: umount %s: %s", SETUP_ROOT_DIR, strerror(errno));
	if (scratch && umount2(SETUP_SCRATCH_DIR, MNT_DETACH) < 0)
		agent_log("undo: umount %s: %s", SETUP_SCRATCH_DIR, strerror(errno));
	return ret;
}

/* Write /etc/resolv.conf and /etc/hosts if a SETUP NET is waiting for them. 0, or ERROR queued. */
static int setup_net_files(struct agent_conn *c)
{
	char msg[200], host[SMOLVM_SETUP_MAX_HOSTNAME + 1] = "";
	int ret;

	if (!setup_net_files_due)
		return 0;
	setup_net_files_due = false;
	gethostname(host, sizeof(host) - 1);
	ret = netcfg_files(&setup_net, host, msg, sizeof(msg));
	return ret ? conn_fail(c, -ret, "SETUP net: %s", msg) : 0;
}

/* The network files if due, then EXIT (or their ERROR). 0 or -ENOMEM. */
static int setup_done(struct agent_conn *c)
{
	int ret = setup_net_files(c);

	if (ret < 0 || c->state == AGENT_C_CLOSING)
		return ret; /* ERROR queued, or no memory for it */
	return conn_done(c);
}

/*
 * SETUP ROOT, waiting for the scratch disk: after a restore it is a 0-byte
 * placeholder until the VMM's config-change interrupt and the kernel's
 * workqueue give it its size. Called at once and then every
 * SETUP_ROOT_POLL_MS from agent_timeouts(). Returns 0 (EXIT or ERROR queued,
 * or still waiting) or -ENOMEM.
 */
int setup_root_poll(struct agent *a, struct agent_conn *c)
{
	uint64_t size = 0, now;
	char msg[200];
	int fd, err = 0, ret;

	fd = open(SETUP_SCRATCH_DEV, O_RDONLY | O_CLOEXEC);
	if (fd < 0 || ioctl(fd, BLKGETSIZE64, &size) < 0)
		err = errno;
	if (fd >= 0)
		close(fd);
	if (size == 0) {
		now = agent_now_ms();
		if (now < c->deadline_ms) {
			c->poll_at_ms = now + SETUP_ROOT_POLL_MS;
			return 0;
		}
		a->root_conn = NULL;
		return conn_fail(c, err ? err : ETIMEDOUT, "SETUP root: the scratch disk %s %s after %u s",
				 SETUP_SCRATCH_DEV, err ? strerror(err) : "still has 0 bytes", SETUP_ROOT_WAIT_MS / 1000);
	}
	a->root_conn = NULL;
	ret = setup_root_switch(msg, sizeof(msg));
	if (ret < 0)
		return conn_fail(c, -ret, "SETUP root: %s", msg);
	a->boot.root_done = true;
	agent_log("root: overlay of %s and %s (%llu MiB)", AGENT_IMAGE_DEV, SETUP_SCRATCH_DEV,
		  (unsigned long long)(size >> 20));
	return setup_done(c);
}

/* Apply entropy, clock and hostname (init mode only). */
static void setup_identity(const uint8_t *entropy, uint32_t elen, const uint8_t *host, uint32_t hlen, uint64_t wall)
{
	if (elen) {
		struct {
			int entropy_count, buf_size;
			uint8_t buf[SMOLVM_SETUP_MAX_ENTROPY];
		} pool;
		int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);

		pool.entropy_count = (int)elen * 8;
		pool.buf_size = (int)elen;
		memcpy(pool.buf, entropy, elen);
		if (fd < 0 || ioctl(fd, RNDADDENTROPY, &pool) < 0)
			agent_log("RNDADDENTROPY: %s", strerror(errno));
		/* Credited entropy alone waits for the next periodic reseed: force one now. */
		else if (ioctl(fd, RNDRESEEDCRNG) < 0 && errno != ENODATA)
			agent_log("RNDRESEEDCRNG: %s", strerror(errno));
		if (fd >= 0)
			close(fd);
	}
	if (wall) {
		struct timespec ts = { (time_t)(wall / 1000000000u), (long)(wall % 1000000000u) };

		if (clock_settime(CLOCK_REALTIME, &ts) < 0)
			agent_log("clock_settime: %s", strerror(errno));
	}
	if (hlen && sethostname((const char *)host, hlen) < 0)
		agent_log("sethostname: %s", strerror(errno));
}

/*
 * Fresh entropy (credited), the host's wall clock and the hostname, so that sandboxes restored
 * from one snapshot differ; with SMOLVM_SETUP_ROOT also the overlay root. In --unix test mode
 * the frame is checked but nothing is applied (that would change the host).
 */
int setup_start(struct agent *a, struct agent_conn *c)
{
	uint32_t len = le32toh(c->hdr.len);
	struct smolvm_setup su;
	const uint8_t *entropy, *host;
	uint32_t elen, hlen, flags;

	if (len < sizeof(su))
		return conn_fail(c, 0, "bad SETUP frame: %u bytes, shorter than its header", len);
	memcpy(&su, c->payload, sizeof(su));
	elen = le32toh(su.entropy_len);
	hlen = le32toh(su.hostname_len);
	flags = le32toh(su.flags);
	if (elen > SMOLVM_SETUP_MAX_ENTROPY || hlen > SMOLVM_SETUP_MAX_HOSTNAME ||
	    (uint64_t)sizeof(su) + elen + hlen > len || (!(flags & SMOLVM_SETUP_NET) && sizeof(su) + elen + hlen != len))
		return conn_fail(c, 0, "bad SETUP frame: entropy %u, hostname %u, payload %u bytes", elen, hlen, len);
	if (flags & ~(SMOLVM_SETUP_ROOT | SMOLVM_SETUP_NET))
		return conn_fail(c, EINVAL, "bad SETUP frame: unknown flags 0x%x",
				 flags & ~(SMOLVM_SETUP_ROOT | SMOLVM_SETUP_NET));
	entropy = c->payload + sizeof(su);
	host = entropy + elen;
	if ((flags & SMOLVM_SETUP_NET) &&
	    netcfg_parse(host + hlen, len - (uint32_t)sizeof(su) - elen - hlen, &setup_net) < 0)
		return conn_fail(c, EINVAL, "bad SETUP frame: the network part is malformed");
	if (getpid() != 1)
		return conn_done(c);
	setup_identity(entropy, elen, host, hlen, le64toh(su.wall_ns));
	if (flags & SMOLVM_SETUP_NET) {
		char msg[200];
		int ret = netcfg_link(&setup_net, msg, sizeof(msg));

		if (ret)
			return conn_fail(c, -ret, "SETUP net: %s", msg);
		setup_net_files_due = true;
	}
	if (!(flags & SMOLVM_SETUP_ROOT) || a->boot.root_done)
		return setup_done(c);
	if (!a->boot.image_mounted)
		return conn_fail(c, a->boot.image_err ? a->boot.image_err : ENODEV, "SETUP root: the image is not mounted: %s",
				 a->boot.image_error[0] ? a->boot.image_error : "unknown reason");
	if (a->root_conn)
		return conn_fail(c, EBUSY, "SETUP root: another SETUP is setting up the root");
	free(c->payload);
	c->payload = NULL;
	a->root_conn = c;
	c->state = AGENT_C_ROOT_WAIT;
	c->deadline_ms = agent_now_ms() + SETUP_ROOT_WAIT_MS;
	return setup_root_poll(a, c);
}
