/* Dropping what the VMM does not need once it is set up: namespaces, fds, capabilities, dumpability, limits. */
#define _GNU_SOURCE
#include "jail.h"
#include "procfs.h"

#include <dirent.h>
#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <linux/capability.h>

static void jail_note(char *list, size_t len, const char *what)
{
	size_t used = strlen(list);

	snprintf(list + used, len - used, "%s%s", used ? "," : "", what);
}

static void jail_skip(struct jail *j, const char *what, int err)
{
	size_t used = strlen(j->skipped);
	const char *name = err == EPERM ? "EPERM" : err == EINVAL ? "EINVAL" : err == ENOSPC ? "ENOSPC"
			 : err == EUSERS ? "EUSERS" : err == ENOENT ? "ENOENT" : "error";

	snprintf(j->skipped + used, sizeof(j->skipped) - used, "%s%s:%s", used ? "," : "", what, name);
}

static unsigned long jail_ns_inode(const char *name)
{
	char path[64];
	struct stat st;

	snprintf(path, sizeof(path), "/proc/self/ns/%s", name);
	return stat(path, &st) == 0 ? (unsigned long)st.st_ino : 0;
}

/* Every fd > 2 but keep: close_range around it, or /proc/self/fd on kernels before 5.9. */
static int jail_close_fds(int keep)
{
	DIR *d;
	struct dirent *e;
	int ret = 0;

	if (keep > 3 && syscall(SYS_close_range, 3u, (unsigned)keep - 1, 0u) < 0)
		ret = -errno;
	if (!ret && syscall(SYS_close_range, keep >= 3 ? (unsigned)keep + 1 : 3u, ~0u, 0u) < 0)
		ret = -errno;
	if (ret != -ENOSYS)
		return ret;
	d = opendir("/proc/self/fd");
	if (!d)
		return -errno;
	while ((e = readdir(d)) != NULL) {
		int fd = atoi(e->d_name);

		if (fd > 2 && fd != keep && fd != dirfd(d))
			close(fd);
	}
	closedir(d);
	return 0;
}

/* The highest open fd, or -errno. */
static int jail_max_fd(void)
{
	DIR *d = opendir("/proc/self/fd");
	struct dirent *e;
	int max = -1;

	if (!d)
		return -errno;
	while ((e = readdir(d)) != NULL) {
		int fd = e->d_name[0] >= '0' && e->d_name[0] <= '9' ? atoi(e->d_name) : -1;

		if (fd > max && fd != dirfd(d))
			max = fd;
	}
	closedir(d);
	return max;
}

/* Lower both limits of res to want (never above the hard limit the VMM got). 0 or -errno. */
static int jail_limit(int res, rlim_t want)
{
	struct rlimit rl;

	if (getrlimit(res, &rl) < 0)
		return -errno;
	if (rl.rlim_max != RLIM_INFINITY && rl.rlim_max < want)
		want = rl.rlim_max;
	rl.rlim_cur = rl.rlim_max = want;
	return setrlimit(res, &rl) < 0 ? -errno : 0;
}

int jail_early(struct jail *j, int keep_fd, char *err, size_t errlen)
{
	int ret;

	j->ns_ipc_caller = j->ns_ipc = jail_ns_inode("ipc");
	j->ns_uts_caller = j->ns_uts = jail_ns_inode("uts");
	if (!j->on)
		return 0;
	if (unshare(CLONE_NEWIPC | CLONE_NEWUTS) == 0) {
		jail_note(j->done, sizeof(j->done), "ns");
		j->ns_ipc = jail_ns_inode("ipc");
		j->ns_uts = jail_ns_inode("uts");
	} else if (errno == EPERM || errno == EINVAL || errno == ENOSPC || errno == EUSERS) {
		jail_skip(j, "ns", errno); /* not permitted here (no CAP_SYS_ADMIN, a limit, no kernel support) */
	} else {
		ret = -errno;
		snprintf(err, errlen, "jail: unshare(CLONE_NEWIPC | CLONE_NEWUTS): %s", strerror(-ret));
		return ret;
	}
	ret = jail_close_fds(keep_fd);
	if (ret) {
		snprintf(err, errlen, "jail: closing inherited fds: %s", strerror(-ret));
		return ret;
	}
	jail_note(j->done, sizeof(j->done), "fds");
	return 0;
}

int jail_thread(const struct jail *j)
{
	struct __user_cap_header_struct hdr = { _LINUX_CAPABILITY_VERSION_3, 0 };
	struct __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3];

	if (!j->on)
		return 0;
	/* The bounding set first: dropping from it needs CAP_SETPCAP, which capset() below removes. */
	for (int c = 0; c < 64; c++) {
		int in = prctl(PR_CAPBSET_READ, c, 0, 0, 0);

		if (in < 0)
			break; /* EINVAL: past the kernel's last capability */
		if (in && prctl(PR_CAPBSET_DROP, c, 0, 0, 0) < 0) {
			if (errno != EPERM)
				return -errno;
			break; /* no CAP_SETPCAP (a non-root caller): the set stays, unusable without exec */
		}
	}
	if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0 && errno != EINVAL)
		return -errno; /* EINVAL: a kernel before 4.3, which has no ambient set */
	memset(data, 0, sizeof(data));
	if (syscall(SYS_capset, &hdr, data) < 0)
		return -errno;
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
		return -errno;
	return 0;
}

int jail_enter(struct jail *j, unsigned long nofile_runtime, uint64_t as_runtime, char *err, size_t errlen)
{
	const char *what = "capabilities";
	int ret, max_fd;

	if (!j->on)
		return 0;
	ret = jail_thread(j);
	if (ret)
		goto out;
	jail_note(j->done, sizeof(j->done), "caps");
	if (prctl(PR_CAPBSET_READ, 0, 0, 0, 0) == 1)
		jail_skip(j, "bset", EPERM);
	else
		jail_note(j->done, sizeof(j->done), "bset");
	jail_note(j->done, sizeof(j->done), "nnp");
	what = "PR_SET_DUMPABLE";
	if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0) {
		ret = -errno;
		goto out;
	}
	jail_note(j->done, sizeof(j->done), "nodump");
	what = "RLIMIT_NOFILE";
	max_fd = jail_max_fd();
	ret = max_fd < 0 ? max_fd : jail_limit(RLIMIT_NOFILE, (rlim_t)max_fd + 1 + nofile_runtime);
	if (ret)
		goto out;
	jail_note(j->done, sizeof(j->done), "nofile");
	what = "RLIMIT_CORE";
	ret = jail_limit(RLIMIT_CORE, 0);
	if (ret)
		goto out;
	jail_note(j->done, sizeof(j->done), "core");
	if (as_runtime) {
		uint64_t now = procfs_kib_field("/proc/self/status", "VmSize");

		what = "RLIMIT_AS";
		if (!now) {
			jail_skip(j, "as", ENOENT);
		} else {
			ret = jail_limit(RLIMIT_AS, (rlim_t)(now + as_runtime));
			if (ret)
				goto out;
			jail_note(j->done, sizeof(j->done), "as");
		}
	}
out:
	if (ret)
		snprintf(err, errlen, "jail: %s: %s", what, strerror(-ret));
	return ret;
}
