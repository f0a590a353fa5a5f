/* Shared by the host-only agent tests (test_exec.c, test_files.c): the agent in --unix mode in a temporary folder, a raw protocol client for what the host side never sends, and the test runner. */
#ifndef SMOLVM_AGENT_TEST_H
#define SMOLVM_AGENT_TEST_H

#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <liburing.h>
#include <signal.h>
#include <stddef.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "exec_client.h"
#include "proto.h"

static int test_failures;
static char test_dir[64];
static char test_sock[128];
static pid_t test_agent = -1;

#define CHECK(cond, fmt, ...)                                                                                   \
	do {                                                                                                        \
		if (!(cond)) {                                                                                      \
			test_failures++;                                                                            \
			fprintf(stderr, "FAIL %s:%d: %s: " fmt "\n", __func__, __LINE__, #cond, ##__VA_ARGS__); \
		}                                                                                                   \
	} while (0)

struct agent_test {
	const char *name;
	void (*fn)(void);
};

static inline double test_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Run "true" until the agent answers (up to 20 s). Returns exec_run()'s last result. */
static inline int agent_test_wait_ready(void)
{
	struct exec_request r = { .command = "true" };
	struct exec_output o;
	double end = test_now() + 20;
	int ret;

	do {
		ret = exec_run(test_sock, SMOLVM_AGENT_PORT, &r, 10000, NULL, NULL, &o);
		exec_output_free(&o);
		if (ret != -ENOENT && ret != -ECONNREFUSED)
			break;
		usleep(20000);
	} while (test_now() < end);
	if (ret != 0)
		fprintf(stderr, "agent not answering on %s: %d %s\n", test_sock, ret, o.error);
	return ret;
}

/* ---- io_uring, and the poll() fallback where it is unavailable ---- */

/* How many io_uring instances this process holds open. */
static inline int agent_test_rings(void)
{
	DIR *d = opendir("/proc/self/fd");
	struct dirent *e;
	int n = 0;

	while (d && (e = readdir(d))) {
		char path[300], link[64];
		ssize_t len;

		snprintf(path, sizeof(path), "/proc/self/fd/%s", e->d_name);
		len = readlink(path, link, sizeof(link) - 1);
		if (len > 0) {
			link[len] = 0;
			n += strcmp(link, "anon_inode:[io_uring]") == 0;
		}
	}
	if (d)
		closedir(d);
	return n;
}

/* Can this process make a ring? */
static inline bool agent_test_have_uring(void)
{
	struct io_uring ring;

	if (io_uring_queue_init(4, &ring, 0) < 0)
		return false;
	io_uring_queue_exit(&ring);
	return true;
}

/*
 * Run fn in a child where io_uring_setup fails with ENOSYS (a seccomp filter,
 * as a container runtime may install), so the client takes its poll() path;
 * CHECK that the child's tests passed. Skipped where seccomp is unavailable.
 */
static inline void agent_test_without_uring(void (*fn)(void))
{
	struct sock_filter f[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_setup, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOSYS),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	struct sock_fprog prog = { sizeof(f) / sizeof(f[0]), f };
	int status = -1;
	pid_t pid;

	fflush(stdout);
	fflush(stderr);
	pid = fork();
	if (pid == 0) {
		test_failures = 0; /* the exit status is about fn's tests, not the failures before the fork */
		if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 ||
		    prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) < 0) {
			fprintf(stderr, "no seccomp here (%s): the poll() fallback is not tested\n", strerror(errno));
			_exit(0);
		}
		CHECK(!agent_test_have_uring(), "io_uring_setup still works under the filter");
		fn();
		exit(test_failures ? 1 : 0);
	}
	CHECK(pid > 0 && waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0,
	      "without io_uring (see above): status 0x%x", status);
}

/* ---- raw protocol client ---- */

/*
 * read(), again on EINTR. The raw sockets have SO_RCVTIMEO (test_raw_connect), and with it a
 * blocking socket read returns EINTR instead of restarting on any wake-up, no handler needed:
 * e.g. the io_uring task work (TWA_SIGNAL) the kernel sends this thread when an earlier
 * exec_run()'s ring is torn down.
 */
static inline ssize_t test_read(int fd, void *buf, size_t len)
{
	ssize_t n;

	while ((n = read(fd, buf, len)) < 0 && errno == EINTR)
		;
	return n;
}

/* Connect and do the handshake for port; a refused port gives an fd that reads EOF. -1 on failure. */
static inline int test_raw_connect(uint32_t port)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct timeval tv = { 20, 0 };
	char line[64];
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	size_t n = 0;

	strcpy(sa.sun_path, test_sock);
	if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
		goto fail;
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	int len = snprintf(line, sizeof(line), "CONNECT %u\n", port);
	if (send(fd, line, (size_t)len, MSG_NOSIGNAL) != len)
		goto fail;
	while (n < sizeof(line) - 1) {
		if (test_read(fd, line + n, 1) != 1)
			return fd; /* refused: the caller sees EOF */
		if (line[n++] == '\n')
			break;
	}
	line[n] = 0;
	if (strncmp(line, "OK ", 3) != 0)
		goto fail;
	return fd;
fail:
	if (fd >= 0)
		close(fd);
	return -1;
}

static inline bool test_read_full(int fd, void *buf, size_t len)
{
	uint8_t *p = buf;

	while (len) {
		ssize_t n = test_read(fd, p, len);
		if (n <= 0)
			return false;
		p += n;
		len -= (size_t)n;
	}
	return true;
}

/* Read one frame; payload malloc'd (NUL-terminated). Returns false at EOF or on error. */
static inline bool test_raw_read(int fd, struct smolvm_frame *h, uint8_t **payload)
{
	*payload = NULL;
	if (!test_read_full(fd, h, sizeof(*h)) || h->magic != SMOLVM_PROTO_MAGIC || h->len > SMOLVM_MAX_PAYLOAD)
		return false;
	*payload = calloc(1, h->len + 1);
	return *payload && test_read_full(fd, *payload, h->len);
}

/* The errno of an ERROR frame (-1: not a valid ERROR) and its message ("" then). */
static inline int test_error_of(const struct smolvm_frame *h, const uint8_t *payload, const char **msg)
{
	struct smolvm_error e;

	*msg = "";
	if (!payload || h->type != SMOLVM_ERROR || h->len < sizeof(e))
		return -1;
	memcpy(&e, payload, sizeof(e));
	*msg = (const char *)payload + sizeof(e);
	return e.err;
}

/* Read one frame from fd and give its ERROR errno and message (-2: no frame came). */
static inline int test_raw_error(int fd, const char **msg)
{
	struct smolvm_frame h;
	uint8_t *payload = NULL;
	static char keep[512];
	int err = -2;

	*msg = "";
	if (test_raw_read(fd, &h, &payload)) {
		const char *text;

		err = test_error_of(&h, payload, &text);
		snprintf(keep, sizeof(keep), "%s", text);
		*msg = keep;
	}
	free(payload);
	return err;
}

/*
 * main() of an agent test: make /tmp/smolvm-<kind>-XXXXXX, start the agent
 * (argv[1]) with start(), run the tests named on the command line (all when
 * none), stop the agent, cleanup() (may be NULL), remove the folder.
 */
static inline int agent_test_main(int argc, char **argv, const char *kind, const struct agent_test *tests, size_t n,
				  int (*start)(const char *agent), void (*cleanup)(void))
{
	int status, rc = 1;

	if (argc < 2) {
		fprintf(stderr, "usage: %s AGENT [TEST...]\n", argv[0]);
		return 2;
	}
	signal(SIGPIPE, SIG_IGN);
	snprintf(test_dir, sizeof(test_dir), "/tmp/smolvm-%s-XXXXXX", kind);
	if (!mkdtemp(test_dir)) {
		perror("mkdtemp");
		return 1;
	}
	snprintf(test_sock, sizeof(test_sock), "%s/vsock.sock", test_dir);
	if (start(argv[1]) < 0)
		goto out;
	for (size_t i = 0; i < n; i++) {
		bool wanted = argc == 2;
		for (int j = 2; j < argc; j++)
			wanted |= strcmp(argv[j], tests[i].name) == 0;
		if (!wanted)
			continue;
		int before = test_failures;
		double t0 = test_now();
		tests[i].fn();
		printf("%s %s (%.2f s)\n", test_failures == before ? "ok" : "FAILED", tests[i].name, test_now() - t0);
		fflush(stdout);
	}
	rc = test_failures ? 1 : 0;
out:
	if (test_agent > 0) {
		kill(test_agent, SIGTERM);
		waitpid(test_agent, &status, 0);
	}
	if (cleanup)
		cleanup();
	unlink(test_sock);
	if (rmdir(test_dir) < 0)
		fprintf(stderr, "%s not empty after the tests\n", test_dir);
	printf("%d failure(s)\n", test_failures);
	return rc;
}

#endif
