/* Host-only test of the agent's PUT/GET (guest/agent/agent.c with --unix, so "guest" paths are host paths) against csrc/client/file_client.c. */
#include "agent_test.h"

#include <dirent.h>
#include <fcntl.h>
#include <pthread.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include "file_client.h"

extern char **environ;

#define TEST_BIG (8u << 20)
#define TEST_FSIZE_LIMIT (24u << 20) /* RLIMIT_FSIZE of the agent: a bigger PUT fails with EFBIG */

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

/* A write error in the guest (EFBIG past the agent's RLIMIT_FSIZE): the agent takes the rest of the DATA and
 * answers ERROR (not a reset), no file left. The sent count is at least what the agent wrote before the
 * limit; the last chunk counts only once its write completion is seen, which may come after the ERROR. */
static void test_write_error(void)
{
	char local[160], guest[160];
	struct file_result res;
	int ret;

	test_path(local, sizeof(local), "big.local");
	test_path(guest, sizeof(guest), "big.guest");
	CHECK(test_write_random(local, TEST_FSIZE_LIMIT + (1u << 20), 9), "write");
	ret = test_put(local, guest, 0644, &res);
	CHECK(ret == -EFBIG && res.origin == FILE_ORIGIN_GUEST && res.size >= TEST_FSIZE_LIMIT &&
		      res.size <= TEST_FSIZE_LIMIT + (1u << 20),
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
	struct exec_request r = { .command = "i=0; while [ $i -lt 2000 ]; do echo line $i; i=$((i+1)); done" };
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
	int fd = test_raw_connect(SMOLVM_AGENT_PORT);

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
	static const struct {
		const char *name;
		uint16_t type;      /* SMOLVM_PUT or SMOLVM_GET */
		uint32_t put_flags;
		int path;           /* 1: the path and its NUL, 0: without the NUL, -1: no payload at all */
		uint16_t then;      /* a frame sent after READY, or 0 */
		const char *data;   /* its payload (NULL: the path and its NUL) */
		size_t data_len;
		int err;
		const char *want;
	} cases[] = {
		{ "unterminated path", SMOLVM_PUT, 0, 0, 0, NULL, 0, 0, "NUL-terminated" },
		{ "oversized DATA", SMOLVM_PUT, 0, 1, SMOLVM_DATA, "0123456789ab", 12, 0, "only 10 announced" },
		{ "GET inside PUT", SMOLVM_PUT, 0, 1, SMOLVM_GET, NULL, 0, 0, "bad frame during PUT" },
		{ "PUT flags", SMOLVM_PUT, 1, 1, 0, NULL, 0, EINVAL, "flags" },
		{ "empty GET", SMOLVM_GET, 0, -1, 0, NULL, 0, 0, "bad GET frame" },
	};
	char guest[160];

	test_path(guest, sizeof(guest), "bad");
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct smolvm_put put = { 10, 0644, cases[i].put_flags };
		size_t plen = cases[i].path < 0 ? 0 : strlen(guest) + (size_t)cases[i].path;
		bool is_put = cases[i].type == SMOLVM_PUT && cases[i].path >= 0;
		struct smolvm_frame h;
		uint8_t *msg = NULL;
		const char *text;
		int fd = test_raw_connect(SMOLVM_AGENT_PORT), err;

		CHECK(fd >= 0 && test_raw_send(fd, cases[i].type, &put, is_put ? sizeof(put) : 0, guest, plen), "%s: send",
		      cases[i].name);
		if (cases[i].then) {
			CHECK(test_raw_read(fd, &h, &msg) && h.type == SMOLVM_READY, "%s: READY", cases[i].name);
			free(msg);
			CHECK(test_raw_send(fd, cases[i].then, cases[i].data ? cases[i].data : guest,
					    cases[i].data ? cases[i].data_len : strlen(guest) + 1, NULL, 0),
			      "%s: send", cases[i].name);
		}
		err = test_raw_error(fd, &text);
		CHECK(err == cases[i].err && strstr(text, cases[i].want), "%s: err %d %s", cases[i].name, err, text);
		if (fd >= 0)
			close(fd);
	}
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
	fd = test_raw_connect(SMOLVM_AGENT_PORT);
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

static void test_no_uring_body(void)
{
	test_round_trips();
	test_errors();
}

/* Where io_uring is unavailable, transfers work through poll(). */
static void test_no_uring(void)
{
	agent_test_without_uring(test_no_uring_body);
}

static int test_start_agent(const char *agent)
{
	char *argv[] = { (char *)agent, "--unix", test_sock, NULL };
	struct rlimit lim = { TEST_FSIZE_LIMIT, TEST_FSIZE_LIMIT };

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
	return agent_test_wait_ready();
}

int main(int argc, char **argv)
{
	static const struct agent_test tests[] = {
		{ "round_trips", test_round_trips },
		{ "modes_and_overwrite", test_modes_and_overwrite },
		{ "errors", test_errors },
		{ "write_error", test_write_error },
		{ "concurrent", test_concurrent },
		{ "cut_put", test_cut_put },
		{ "bad_frames", test_bad_frames },
		{ "get_shrinks", test_get_shrinks },
		{ "no_uring", test_no_uring },
	};

	return agent_test_main(argc, argv, "files", tests, sizeof(tests) / sizeof(tests[0]), test_start_agent, NULL);
}
