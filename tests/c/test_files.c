/* Host-only test of the agent's PUT/GET (guest/agent/agent.c with --unix, so "guest" paths are host paths) against csrc/client/file_client.c. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "exec_client.h"
#include "file_client.h"
#include "proto.h"

extern char **environ;

#define TEST_BIG (8u << 20)
#define TEST_FSIZE_LIMIT (24u << 20) /* RLIMIT_FSIZE of the agent: a bigger PUT fails with EFBIG */

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

static double test_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* test_dir/name into buf. */
static const char *test_path(char *buf, size_t cap, const char *name)
{
	snprintf(buf, cap, "%s/%s", test_dir, name);
	return buf;
}

/* A file of len pseudo-random bytes (seeded) at path. */
static bool test_write_random(const char *path, size_t len, unsigned seed)
{
	uint8_t *buf = malloc(len ? len : 1);
	uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	bool ok;

	for (size_t i = 0; i < len; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		buf[i] = (uint8_t)x;
	}
	ok = buf && fd >= 0 && write(fd, buf, len) == (ssize_t)len;
	if (fd >= 0)
		close(fd);
	free(buf);
	return ok;
}

/* The whole file at path (malloc'd) or NULL; *len its size. */
static uint8_t *test_slurp(const char *path, size_t *len)
{
	struct stat st;
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	uint8_t *buf = NULL;

	*len = 0;
	if (fd < 0 || fstat(fd, &st) < 0)
		goto out;
	buf = malloc((size_t)st.st_size + 1);
	if (buf && read(fd, buf, (size_t)st.st_size) != st.st_size) {
		free(buf);
		buf = NULL;
		goto out;
	}
	*len = (size_t)st.st_size;
out:
	if (fd >= 0)
		close(fd);
	return buf;
}

static bool test_same_file(const char *a, const char *b)
{
	size_t la, lb;
	uint8_t *pa = test_slurp(a, &la), *pb = test_slurp(b, &lb);
	bool same = pa && pb && la == lb && memcmp(pa, pb, la) == 0;

	free(pa);
	free(pb);
	return same;
}

/* Temporary files the agent left in dir (".NAME.smolvm-XXXXXX"). */
static int test_count_temps(const char *dir)
{
	DIR *d = opendir(dir);
	struct dirent *e;
	int n = 0;

	while (d && (e = readdir(d)))
		n += e->d_name[0] == '.' && strstr(e->d_name, ".smolvm-") != NULL;
	if (d)
		closedir(d);
	return n;
}

static bool test_no_temps_within(const char *dir, double secs)
{
	double end = test_now() + secs;

	while (test_count_temps(dir) && test_now() < end)
		usleep(20000);
	return test_count_temps(dir) == 0;
}

static int test_put(const char *local, const char *guest, uint32_t mode, struct file_result *res)
{
	int fd = open(local, O_RDONLY | O_CLOEXEC), ret;

	if (fd < 0) {
		memset(res, 0, sizeof(*res));
		snprintf(res->error, sizeof(res->error), "open %s: %s", local, strerror(errno));
		return -errno;
	}
	ret = file_put(test_sock, SMOLVM_AGENT_PORT, fd, guest, mode, 60000, NULL, NULL, res);
	close(fd);
	return ret;
}

static int test_get(const char *guest, const char *local, struct file_result *res)
{
	int fd = open(local, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600), ret;

	if (fd < 0) {
		memset(res, 0, sizeof(*res));
		snprintf(res->error, sizeof(res->error), "open %s: %s", local, strerror(errno));
		return -errno;
	}
	ret = file_get(test_sock, SMOLVM_AGENT_PORT, guest, fd, 60000, NULL, NULL, res);
	close(fd);
	return ret;
}

/* ---- raw protocol client, for what file_client never sends ---- */

static int test_raw_connect(void)
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
	int len = snprintf(line, sizeof(line), "CONNECT %u\n", SMOLVM_AGENT_PORT);
	if (send(fd, line, (size_t)len, MSG_NOSIGNAL) != len)
		goto fail;
	while (n < sizeof(line) - 1) {
		if (read(fd, line + n, 1) != 1)
			goto fail;
		if (line[n++] == '\n')
			break;
	}
	if (strncmp(line, "OK ", 3) != 0)
		goto fail;
	return fd;
fail:
	if (fd >= 0)
		close(fd);
	return -1;
}

/* One frame (payload a then b) in one send: the agent may answer ERROR and close after reading the header. */
static bool test_raw_send(int fd, uint16_t type, const void *a, size_t alen, const void *b, size_t blen)
{
	struct smolvm_frame h = { SMOLVM_PROTO_MAGIC, type, 0, (uint32_t)(alen + blen) };
	uint8_t buf[sizeof(h) + 8192];
	size_t len = sizeof(h) + alen + blen;

	if (len > sizeof(buf))
		return false;
	memcpy(buf, &h, sizeof(h));
	if (alen)
		memcpy(buf + sizeof(h), a, alen);
	if (blen)
		memcpy(buf + sizeof(h) + alen, b, blen);
	return send(fd, buf, len, MSG_NOSIGNAL) == (ssize_t)len;
}

static bool test_read_full(int fd, void *buf, size_t len)
{
	uint8_t *p = buf;

	while (len) {
		ssize_t n = read(fd, p, len);
		if (n <= 0)
			return false;
		p += n;
		len -= (size_t)n;
	}
	return true;
}

/* One frame; payload malloc'd and NUL-terminated. */
static bool test_raw_read(int fd, struct smolvm_frame *h, uint8_t **payload)
{
	*payload = NULL;
	if (!test_read_full(fd, h, sizeof(*h)) || h->magic != SMOLVM_PROTO_MAGIC || h->len > SMOLVM_MAX_PAYLOAD)
		return false;
	*payload = calloc(1, h->len + 1);
	return *payload && test_read_full(fd, *payload, h->len);
}

/* The errno of an ERROR frame (-1: not one) and its message. */
static int test_error_of(const struct smolvm_frame *h, const uint8_t *payload, const char **msg)
{
	struct smolvm_error e;

	*msg = "";
	if (h->type != SMOLVM_ERROR || h->len < sizeof(e))
		return -1;
	memcpy(&e, payload, sizeof(e));
	*msg = (const char *)payload + sizeof(e);
	return e.err;
}

/* ---- tests ---- */

static void test_round_trips(void)
{
	static const size_t sizes[] = { 0, 1, 4095, TEST_BIG, TEST_BIG + 12345 };
	char local[160], guest[160], back[160];

	for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
		struct file_result res;
		struct stat st;
		int ret;

		test_path(local, sizeof(local), "local.bin");
		test_path(guest, sizeof(guest), "guest.bin");
		test_path(back, sizeof(back), "back.bin");
		CHECK(test_write_random(local, sizes[i], (unsigned)i + 1), "write %s", local);
		ret = test_put(local, guest, 0640, &res);
		CHECK(ret == 0 && res.size == sizes[i], "put %zu: ret %d size %llu %s", sizes[i], ret,
		      (unsigned long long)res.size, res.error);
		CHECK(test_same_file(local, guest), "put %zu: contents differ", sizes[i]);
		CHECK(stat(guest, &st) == 0 && (st.st_mode & 07777) == 0640, "put %zu: mode %o", sizes[i],
		      st.st_mode & 07777);
		ret = test_get(guest, back, &res);
		CHECK(ret == 0 && res.size == sizes[i] && res.mode == (S_IFREG | 0640), "get %zu: ret %d size %llu mode %o %s",
		      sizes[i], ret, (unsigned long long)res.size, res.mode, res.error);
		CHECK(test_same_file(local, back), "get %zu: contents differ", sizes[i]);
		unlink(local);
		unlink(guest);
		unlink(back);
	}
	CHECK(test_count_temps(test_dir) == 0, "temporary files left");
}

static void test_modes_and_overwrite(void)
{
	char local[160], guest[160];
	struct file_result res;
	struct stat st;
	int ret;

	test_path(local, sizeof(local), "m.local");
	test_path(guest, sizeof(guest), "m.guest");
	CHECK(test_write_random(local, 100, 7), "write");
	ret = test_put(local, guest, 04751, &res);
	CHECK(ret == 0 && stat(guest, &st) == 0 && (st.st_mode & 07777) == 04751, "mode 4751: ret %d %o %s", ret,
	      st.st_mode & 07777, res.error);
	/* only the permission bits count */
	ret = test_put(local, guest, S_IFDIR | 0600, &res);
	CHECK(ret == 0 && stat(guest, &st) == 0 && S_ISREG(st.st_mode) && (st.st_mode & 07777) == 0600,
	      "mode S_IFDIR|600: ret %d %o %s", ret, st.st_mode, res.error);
	/* an existing file is replaced */
	CHECK(test_write_random(local, 5000, 8), "write");
	ret = test_put(local, guest, 0644, &res);
	CHECK(ret == 0 && test_same_file(local, guest), "overwrite: ret %d %s", ret, res.error);
	unlink(local);
	unlink(guest);
}

static void test_errors(void)
{
	char local[160], guest[160], fifo[160];
	struct file_result res;
	int ret;

	test_path(local, sizeof(local), "e.local");
	CHECK(test_write_random(local, 1000, 3), "write");

	/* a missing folder: ENOENT from the guest, nothing created */
	test_path(guest, sizeof(guest), "no-such-dir/f");
	ret = test_put(local, guest, 0644, &res);
	CHECK(ret == -ENOENT && res.origin == FILE_ORIGIN_GUEST && res.guest_err == ENOENT && strstr(res.error, guest),
	      "put into a missing folder: ret %d origin %d err %d %s", ret, res.origin, res.guest_err, res.error);
	CHECK(access(guest, F_OK) < 0 && test_count_temps(test_dir) == 0, "put into a missing folder left a file");

	/* a folder as the target */
	ret = test_put(local, test_dir, 0644, &res);
	CHECK(ret == -EISDIR && res.origin == FILE_ORIGIN_GUEST, "put onto a folder: ret %d %s", ret, res.error);
	snprintf(guest, sizeof(guest), "%s/", test_dir);
	ret = test_put(local, guest, 0644, &res);
	CHECK(ret == -EISDIR, "put to a path ending in /: ret %d %s", ret, res.error);

	/* relative paths */
	ret = test_put(local, "relative/f", 0644, &res);
	CHECK(ret == -EINVAL && res.origin == FILE_ORIGIN_GUEST && strstr(res.error, "absolute"), "put relative: ret %d %s",
	      ret, res.error);
	ret = test_get("relative/f", local, &res);
	CHECK(ret == -EINVAL && res.origin == FILE_ORIGIN_GUEST, "get relative: ret %d %s", ret, res.error);
	CHECK(test_write_random(local, 1000, 3), "write");

	/* downloads: missing, a folder, a FIFO (must not hang the agent) */
	test_path(guest, sizeof(guest), "missing");
	ret = test_get(guest, local, &res);
	CHECK(ret == -ENOENT && res.origin == FILE_ORIGIN_GUEST && res.guest_err == ENOENT, "get missing: ret %d %s", ret,
	      res.error);
	ret = test_get(test_dir, local, &res);
	CHECK(ret == -EISDIR && res.guest_err == EISDIR, "get folder: ret %d %s", ret, res.error);
	test_path(fifo, sizeof(fifo), "fifo");
	CHECK(mkfifo(fifo, 0600) == 0, "mkfifo: %s", strerror(errno));
	ret = test_get(fifo, local, &res);
	CHECK(ret == -EINVAL && strstr(res.error, "not a regular file"), "get fifo: ret %d %s", ret, res.error);
	unlink(fifo);

	/* local side: a folder to upload */
	int dfd = open(test_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	ret = file_put(test_sock, SMOLVM_AGENT_PORT, dfd, "/tmp/x", 0644, 10000, NULL, NULL, &res);
	CHECK(ret == -EISDIR && res.origin == FILE_ORIGIN_LOCAL, "put a local folder: ret %d %s", ret, res.error);
	close(dfd);

	/* nothing listens */
	int fd = open(local, O_RDONLY | O_CLOEXEC);
	ret = file_put("/nonexistent-smolvm/vsock.sock", SMOLVM_AGENT_PORT, fd, "/tmp/x", 0644, 1000, NULL, NULL, &res);
	CHECK(ret == -ENOENT && res.origin == FILE_ORIGIN_TRANSPORT, "no socket: ret %d %s", ret, res.error);
	close(fd);
	unlink(local);
}

/* A write error in the guest (EFBIG past the agent's RLIMIT_FSIZE): all DATA is taken, then ERROR, no file left. */
static void test_write_error(void)
{
	char local[160], guest[160];
	struct file_result res;
	int ret;

	test_path(local, sizeof(local), "big.local");
	test_path(guest, sizeof(guest), "big.guest");
	CHECK(test_write_random(local, TEST_FSIZE_LIMIT + (1u << 20), 9), "write");
	ret = test_put(local, guest, 0644, &res);
	CHECK(ret == -EFBIG && res.origin == FILE_ORIGIN_GUEST && res.size == TEST_FSIZE_LIMIT + (1u << 20),
	      "put past RLIMIT_FSIZE: ret %d origin %d sent %llu %s", ret, res.origin, (unsigned long long)res.size,
	      res.error);
	CHECK(access(guest, F_OK) < 0 && test_count_temps(test_dir) == 0, "failed put left a file");
	unlink(local);
}

struct test_xfer {
	int id;
	bool ok;
	char detail[600];
};

/* One thread: put a random file, get it back, compare. */
static void *test_xfer_main(void *arg)
{
	struct test_xfer *t = arg;
	char local[160], guest[160], back[160], name[32];
	struct file_result pr, gr;
	int pret = -1, gret = -1;

	snprintf(name, sizeof(name), "c%d.local", t->id);
	test_path(local, sizeof(local), name);
	snprintf(name, sizeof(name), "c%d.guest", t->id);
	test_path(guest, sizeof(guest), name);
	snprintf(name, sizeof(name), "c%d.back", t->id);
	test_path(back, sizeof(back), name);
	memset(&pr, 0, sizeof(pr));
	memset(&gr, 0, sizeof(gr));
	if (test_write_random(local, TEST_BIG + (size_t)t->id, 100u + (unsigned)t->id)) {
		pret = test_put(local, guest, 0600, &pr);
		gret = test_get(guest, back, &gr);
	}
	t->ok = pret == 0 && gret == 0 && test_same_file(local, back);
	snprintf(t->detail, sizeof(t->detail), "put %d %s / get %d %s", pret, pr.error, gret, gr.error);
	unlink(local);
	unlink(guest);
	unlink(back);
	return NULL;
}

/* Transfers on several connections at once, with a command running beside them. */
static void test_concurrent(void)
{
	pthread_t th[3];
	struct test_xfer t[3];
	struct exec_request r = { "i=0; while [ $i -lt 2000 ]; do echo line $i; i=$((i+1)); done", NULL, NULL, 0, 0, NULL, false, NULL, 0 };
	struct exec_output o;
	int ret;

	for (int i = 0; i < 3; i++) {
		t[i] = (struct test_xfer){ .id = i };
		pthread_create(&th[i], NULL, test_xfer_main, &t[i]);
	}
	ret = exec_run(test_sock, SMOLVM_AGENT_PORT, &r, 60000, NULL, NULL, &o);
	CHECK(ret == 0 && o.exit_code == 0 && o.out_len > 10000, "exec beside transfers: ret %d %s", ret, o.error);
	exec_output_free(&o);
	for (int i = 0; i < 3; i++) {
		pthread_join(th[i], NULL);
		CHECK(t[i].ok, "transfer %d: %s", t[i].id, t[i].detail);
	}
}

/* The host disappears mid-PUT: the temporary file exists while the PUT runs and is gone after. */
static void test_cut_put(void)
{
	char guest[160], data[1000];
	struct smolvm_put put = { 1u << 20, 0644, 0 };
	struct smolvm_frame h;
	uint8_t *msg = NULL;
	int fd = test_raw_connect();

	CHECK(fd >= 0, "connect");
	if (fd < 0)
		return;
	test_path(guest, sizeof(guest), "cut");
	memset(data, 'x', sizeof(data));
	CHECK(test_raw_send(fd, SMOLVM_PUT, &put, sizeof(put), guest, strlen(guest) + 1), "send PUT");
	CHECK(test_raw_read(fd, &h, &msg) && h.type == SMOLVM_READY && h.len == 0, "READY: type %u", h.type);
	free(msg);
	CHECK(test_raw_send(fd, SMOLVM_DATA, data, sizeof(data), NULL, 0), "send DATA");
	usleep(100000);
	CHECK(test_count_temps(test_dir) == 1, "%d temporary files during the PUT", test_count_temps(test_dir));
	close(fd);
	CHECK(test_no_temps_within(test_dir, 5), "a cut PUT left its temporary file");
	CHECK(access(guest, F_OK) < 0, "a cut PUT created %s", guest);
}

/* Malformed PUT/GET frames get ERROR with err 0 (a protocol error) and leave nothing behind. */
static void test_bad_frames(void)
{
	char guest[160];
	struct smolvm_put put = { 10, 0644, 0 };
	struct smolvm_frame h;
	uint8_t *msg = NULL;
	const char *text = "";
	int fd, err;

	test_path(guest, sizeof(guest), "bad");

	/* path without its NUL */
	fd = test_raw_connect();
	CHECK(fd >= 0 && test_raw_send(fd, SMOLVM_PUT, &put, sizeof(put), guest, strlen(guest)), "send");
	err = test_raw_read(fd, &h, &msg) ? test_error_of(&h, msg, &text) : -2;
	CHECK(err == 0 && strstr(text, "NUL-terminated"), "unterminated path: err %d %s", err, text);
	free(msg);
	close(fd);

	/* DATA beyond the announced size */
	fd = test_raw_connect();
	CHECK(fd >= 0 && test_raw_send(fd, SMOLVM_PUT, &put, sizeof(put), guest, strlen(guest) + 1), "send");
	CHECK(test_raw_read(fd, &h, &msg) && h.type == SMOLVM_READY, "READY");
	free(msg);
	CHECK(test_raw_send(fd, SMOLVM_DATA, "0123456789ab", 12, NULL, 0), "send DATA");
	err = test_raw_read(fd, &h, &msg) ? test_error_of(&h, msg, &text) : -2;
	CHECK(err == 0 && strstr(text, "only 10 announced"), "oversized DATA: err %d %s", err, text);
	free(msg);
	close(fd);

	/* another frame type in the middle of a PUT */
	fd = test_raw_connect();
	CHECK(fd >= 0 && test_raw_send(fd, SMOLVM_PUT, &put, sizeof(put), guest, strlen(guest) + 1), "send");
	CHECK(test_raw_read(fd, &h, &msg) && h.type == SMOLVM_READY, "READY");
	free(msg);
	CHECK(test_raw_send(fd, SMOLVM_GET, guest, strlen(guest) + 1, NULL, 0), "send GET");
	err = test_raw_read(fd, &h, &msg) ? test_error_of(&h, msg, &text) : -2;
	CHECK(err == 0 && strstr(text, "bad frame during PUT"), "GET inside PUT: err %d %s", err, text);
	free(msg);
	close(fd);

	/* PUT flags must be 0 */
	put.flags = 1;
	fd = test_raw_connect();
	CHECK(fd >= 0 && test_raw_send(fd, SMOLVM_PUT, &put, sizeof(put), guest, strlen(guest) + 1), "send");
	err = test_raw_read(fd, &h, &msg) ? test_error_of(&h, msg, &text) : -2;
	CHECK(err == EINVAL && strstr(text, "flags"), "PUT flags: err %d %s", err, text);
	free(msg);
	close(fd);

	/* empty GET */
	fd = test_raw_connect();
	CHECK(fd >= 0 && test_raw_send(fd, SMOLVM_GET, NULL, 0, NULL, 0), "send");
	err = test_raw_read(fd, &h, &msg) ? test_error_of(&h, msg, &text) : -2;
	CHECK(err == 0 && strstr(text, "bad GET frame"), "empty GET: err %d %s", err, text);
	free(msg);
	close(fd);

	CHECK(test_no_temps_within(test_dir, 5) && access(guest, F_OK) < 0, "bad frames left a file");
}

/*
 * GET streams with bounded memory (a reader that does not read gets at most a
 * few chunks plus the socket buffers), and a file that shrinks meanwhile ends
 * in ERROR EIO after what was sent.
 */
static void test_get_shrinks(void)
{
	char guest[160];
	struct smolvm_file info;
	struct smolvm_frame h;
	uint8_t *msg = NULL;
	uint64_t got = 0;
	const char *text = "";
	int fd, err = -2;

	test_path(guest, sizeof(guest), "shrinks");
	fd = open(guest, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	CHECK(fd >= 0 && ftruncate(fd, 256u << 20) == 0, "make a 256 MiB sparse file");
	if (fd >= 0)
		close(fd);
	fd = test_raw_connect();
	CHECK(fd >= 0 && test_raw_send(fd, SMOLVM_GET, guest, strlen(guest) + 1, NULL, 0), "send GET");
	CHECK(test_raw_read(fd, &h, &msg) && h.type == SMOLVM_READY && h.len == sizeof(info), "READY");
	if (msg && h.len == sizeof(info)) {
		memcpy(&info, msg, sizeof(info));
		CHECK(info.size == 256u << 20 && S_ISREG(info.mode), "READY: size %llu mode %o",
		      (unsigned long long)info.size, info.mode);
	}
	free(msg);
	usleep(300000); /* the agent fills the socket and stops */
	CHECK(truncate(guest, 1000) == 0, "truncate");
	while (test_raw_read(fd, &h, &msg)) {
		if (h.type == SMOLVM_DATA) {
			got += h.len;
			free(msg);
			continue;
		}
		err = test_error_of(&h, msg, &text);
		break;
	}
	CHECK(err == EIO && strstr(text, "shrank"), "after truncate: err %d \"%s\" after %llu bytes", err, text,
	      (unsigned long long)got);
	CHECK(got >= 1000 && got < (32u << 20), "%llu bytes sent before the end", (unsigned long long)got);
	free(msg);
	close(fd);
	unlink(guest);
}

static int test_start_agent(const char *agent)
{
	char *argv[] = { (char *)agent, "--unix", test_sock, NULL };
	struct rlimit lim = { TEST_FSIZE_LIMIT, TEST_FSIZE_LIMIT };
	struct exec_request r = { "true", NULL, NULL, 0, 0, NULL, false, NULL, 0 };
	struct exec_output o;
	double end;
	int ret;

	test_agent = fork();
	if (test_agent < 0) {
		perror("fork");
		return -1;
	}
	if (test_agent == 0) {
		/* the agent must not outlive a crashed test (it would hold the caller's output pipes) */
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		signal(SIGXFSZ, SIG_IGN); /* writes past the limit fail with EFBIG instead of killing the agent */
		if (setrlimit(RLIMIT_FSIZE, &lim) < 0)
			perror("setrlimit(RLIMIT_FSIZE)");
		execve(agent, argv, environ);
		fprintf(stderr, "cannot start %s: %s\n", agent, strerror(errno));
		_exit(127);
	}
	end = test_now() + 20;
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

int main(int argc, char **argv)
{
	static const struct {
		const char *name;
		void (*fn)(void);
	} tests[] = {
		{ "round_trips", test_round_trips },
		{ "modes_and_overwrite", test_modes_and_overwrite },
		{ "errors", test_errors },
		{ "write_error", test_write_error },
		{ "concurrent", test_concurrent },
		{ "cut_put", test_cut_put },
		{ "bad_frames", test_bad_frames },
		{ "get_shrinks", test_get_shrinks },
	};
	int status, rc = 1;

	if (argc < 2) {
		fprintf(stderr, "usage: %s AGENT [TEST...]\n", argv[0]);
		return 2;
	}
	signal(SIGPIPE, SIG_IGN);
	snprintf(test_dir, sizeof(test_dir), "/tmp/smolvm-files-XXXXXX");
	if (!mkdtemp(test_dir)) {
		perror("mkdtemp");
		return 1;
	}
	snprintf(test_sock, sizeof(test_sock), "%s/vsock.sock", test_dir);
	if (test_start_agent(argv[1]) < 0)
		goto out;
	for (size_t i = 0; i < sizeof(tests) / sizeof(tests[0]); i++) {
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
	unlink(test_sock);
	if (rmdir(test_dir) < 0)
		fprintf(stderr, "%s not empty after the tests\n", test_dir);
	printf("%d failure(s)\n", test_failures);
	return rc;
}
