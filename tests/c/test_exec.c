/* Host-only test of guest/agent/agent.c (run with --unix) against csrc/client/exec_client.c and setup_client.c: output, exit codes, timeouts, SETUP, bad frames, how the client waits (io_uring or poll()). */
#include "agent_test.h"

#include <dirent.h>
#include <pthread.h>
#include <spawn.h>
#include <sys/stat.h>

#include "setup_client.h"

extern char **environ;

static int test_run(const char *cmd, const char *cwd, const char *const *env, uint32_t n_env, uint32_t timeout_ms,
		    struct exec_output *o)
{
	struct exec_request r = { .command = cmd, .cwd = cwd, .env = env, .n_env = n_env, .timeout_ms = timeout_ms };

	return exec_run(test_sock, SMOLVM_AGENT_PORT, &r, 60000, NULL, NULL, o);
}

static bool test_eq(const uint8_t *buf, size_t len, const char *want)
{
	return len == strlen(want) && (len == 0 || memcmp(buf, want, len) == 0);
}

/* Wait until kill(target, 0) says ESRCH (target: pid, or -pgid). */
static bool test_gone(pid_t target, double secs)
{
	double end = test_now() + secs;

	while (test_now() < end) {
		if (kill(target, 0) < 0 && errno == ESRCH)
			return true;
		usleep(20000);
	}
	return false;
}

/* ---- raw frames, for what exec_client never sends ---- */

static void test_raw_frame(int fd, uint32_t magic, uint16_t type, uint32_t len, const void *payload, size_t plen)
{
	struct smolvm_frame h = { magic, type, 0, len };
	ssize_t r = send(fd, &h, sizeof(h), MSG_NOSIGNAL);

	if (plen && r == (ssize_t)sizeof(h))
		r = send(fd, payload, plen, MSG_NOSIGNAL);
	(void)r;
}

/* Payload of an EXEC frame built by hand. */
static size_t test_exec_payload(uint8_t *buf, uint32_t timeout_ms, uint32_t n_env, const void *strings, size_t slen)
{
	struct smolvm_exec ex = { timeout_ms, n_env, 0 };

	memcpy(buf, &ex, sizeof(ex));
	memcpy(buf + sizeof(ex), strings, slen);
	return sizeof(ex) + slen;
}

/* ---- tests ---- */

static void test_streams(void)
{
	struct exec_output o;
	int ret = test_run("echo out; echo err >&2; echo out2", NULL, NULL, 0, 0, &o);

	CHECK(ret == 0, "ret %d: %s", ret, o.error);
	CHECK(test_eq(o.out, o.out_len, "out\nout2\n"), "stdout %.*s", (int)o.out_len, o.out);
	CHECK(test_eq(o.err, o.err_len, "err\n"), "stderr %.*s", (int)o.err_len, o.err);
	CHECK(o.exit_code == 0 && o.signal == 0 && !o.timed_out, "exit %d", o.exit_code);
	exec_output_free(&o);

	ret = test_run("true", NULL, NULL, 0, 0, &o);
	CHECK(ret == 0 && o.out == NULL && o.err == NULL && o.out_len == 0, "empty output");
	exec_output_free(&o);
}

static void test_exit_codes(void)
{
	static const struct {
		const char *cmd;
		int code, sig;
	} cases[] = { { "exit 0", 0, 0 }, { "exit 1", 1, 0 }, { "exit 42", 42, 0 }, { "false", 1, 0 },
		      { "kill -9 $$", 137, 9 }, { "kill -TERM $$", 143, 15 } };

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct exec_output o;
		int ret = test_run(cases[i].cmd, NULL, NULL, 0, 0, &o);

		CHECK(ret == 0, "%s: ret %d %s", cases[i].cmd, ret, o.error);
		CHECK(o.exit_code == cases[i].code && o.signal == cases[i].sig && !o.timed_out, "%s: exit %d signal %d",
		      cases[i].cmd, o.exit_code, o.signal);
		exec_output_free(&o);
	}
}

static void test_big_output(void)
{
	size_t len = 1u << 20;
	uint8_t *data = malloc(len);
	uint32_t s = 12345;
	char path[128], cmd[512];
	struct exec_output o;
	FILE *f;
	int ret;

	for (size_t i = 0; i < len; i++) {
		s ^= s << 13, s ^= s >> 17, s ^= s << 5;
		data[i] = (uint8_t)(s >> 7);
	}
	snprintf(path, sizeof(path), "%s/blob", test_dir);
	f = fopen(path, "wb");
	CHECK(f && fwrite(data, 1, len, f) == len, "writing %s", path);
	if (f)
		fclose(f);

	snprintf(cmd, sizeof(cmd), "cat %s; cat %s >&2; cat %s", path, path, path);
	ret = test_run(cmd, NULL, NULL, 0, 0, &o);
	CHECK(ret == 0 && o.exit_code == 0, "ret %d %s", ret, o.error);
	CHECK(o.out_len == 2 * len && memcmp(o.out, data, len) == 0 && memcmp(o.out + len, data, len) == 0,
	      "stdout %zu bytes, not byte-exact", o.out_len);
	CHECK(o.err_len == len && memcmp(o.err, data, len) == 0, "stderr %zu bytes, not byte-exact", o.err_len);
	exec_output_free(&o);
	free(data);
}

static void test_binary(void)
{
	static const uint8_t want[] = { 0xff, 0xfe, 0x00, 0x80, 0xc3, 0x28, '\n' };
	struct exec_output o;
	int ret = test_run("printf '\\377\\376\\000\\200\\303\\050\\n'; printf '\\300\\000' >&2", NULL, NULL, 0, 0, &o);

	CHECK(ret == 0, "ret %d %s", ret, o.error);
	CHECK(o.out_len == sizeof(want) && memcmp(o.out, want, sizeof(want)) == 0, "stdout %zu bytes", o.out_len);
	CHECK(o.err_len == 2 && o.err[0] == 0xc0 && o.err[1] == 0, "stderr %zu bytes", o.err_len);
	exec_output_free(&o);
}

static void test_timeout(void)
{
	struct exec_output o;
	double t0 = test_now();
	int ret = test_run("echo before; sleep 1000 & echo $!; sleep 1000", NULL, NULL, 0, 300, &o);
	double dt = test_now() - t0;
	long bg = 0;

	CHECK(ret == 0, "ret %d %s", ret, o.error);
	CHECK(o.exit_code == 124 && o.timed_out, "exit %d timed_out %d", o.exit_code, o.timed_out);
	CHECK(dt >= 0.29 && dt < 10, "took %.2f s", dt);
	CHECK(o.out_len > 7 && memcmp(o.out, "before\n", 7) == 0, "output before the timeout is kept");
	if (o.out_len > 7) {
		char buf[32] = { 0 };
		memcpy(buf, o.out + 7, o.out_len - 7 < 31 ? o.out_len - 7 : 31);
		bg = strtol(buf, NULL, 10);
	}
	CHECK(bg > 1, "background pid in %.*s", (int)o.out_len, o.out);
	if (bg > 1) {
		bool gone = test_gone((pid_t)bg, 5);
		CHECK(gone, "background sleep %ld survived the timeout", bg);
		if (!gone)
			kill((pid_t)bg, SIGKILL);
	}
	exec_output_free(&o);
}

/* A background child keeps the pipes open: EXIT must still come when the shell exits. */
static void test_background_holds_pipes(void)
{
	struct exec_output o;
	double t0 = test_now();
	int ret = test_run("sleep 1000 & echo $!; echo bye >&2", NULL, NULL, 0, 0, &o);
	double dt = test_now() - t0;
	long bg = o.out ? strtol((const char *)o.out, NULL, 10) : 0;

	CHECK(ret == 0 && o.exit_code == 0, "ret %d exit %d %s", ret, o.exit_code, o.error);
	CHECK(dt < 5, "EXIT waited %.2f s for the background child", dt);
	CHECK(test_eq(o.err, o.err_len, "bye\n"), "stderr");
	CHECK(bg > 1, "pid");
	if (bg > 1) {
		kill((pid_t)bg, SIGKILL);
		CHECK(test_gone((pid_t)bg, 5), "reaped");
	}
	exec_output_free(&o);
}

static void test_env(void)
{
	static const char *const env[] = { "FOO=bar baz", "PATH=/usr/bin:/bin", "HOME=/tmp", "EMPTY=", "FOO=last" };
	struct exec_output o;
	int ret = test_run("printf '%s|%s|%s|%s|%s|%s|%s' \"$FOO\" \"$PATH\" \"$HOME\" \"$LANG\" \"$TERM\" "
			   "\"${EMPTY-unset}\" \"${SMOLVM_TEST_LEAK-unset}\"",
			   NULL, env, 5, 0, &o);

	CHECK(ret == 0, "ret %d %s", ret, o.error);
	CHECK(test_eq(o.out, o.out_len, "last|/usr/bin:/bin|/tmp|C.UTF-8|dumb||unset"), "got %.*s", (int)o.out_len,
	      o.out);
	exec_output_free(&o);

	ret = test_run("printf '%s|%s' \"$PATH\" \"$HOME\"", NULL, NULL, 0, 0, &o);
	CHECK(test_eq(o.out, o.out_len, "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin|/root"),
	      "base env %.*s", (int)o.out_len, o.out);
	exec_output_free(&o);
}

static void test_cwd(void)
{
	char path[128], want[160];
	struct exec_output o;
	int ret;

	ret = test_run("pwd", test_dir, NULL, 0, 0, &o);
	snprintf(want, sizeof(want), "%s\n", test_dir);
	CHECK(ret == 0 && test_eq(o.out, o.out_len, want), "ret %d pwd %.*s", ret, (int)o.out_len, o.out);
	exec_output_free(&o);

	ret = test_run("pwd", "", NULL, 0, 0, &o);
	CHECK(ret == 0 && test_eq(o.out, o.out_len, "/\n"), "cwd \"\": %.*s", (int)o.out_len, o.out);
	exec_output_free(&o);

	ret = test_run("pwd", "/nonexistent-smolvm", NULL, 0, 0, &o);
	CHECK(ret == -EPROTO && o.guest_err == ENOENT && o.guest_code == SMOLVM_ERRC_CWD, "ret %d err %d code %d", ret,
	      o.guest_err, o.guest_code);
	CHECK(strcmp(o.error, "cwd /nonexistent-smolvm: No such file or directory") == 0, "error %s", o.error);
	exec_output_free(&o);

	snprintf(path, sizeof(path), "%s/blob", test_dir);
	ret = test_run("pwd", path, NULL, 0, 0, &o);
	CHECK(ret == -EPROTO && strstr(o.error, "Not a directory") && o.guest_code == SMOLVM_ERRC_CWD, "ret %d error %s",
	      ret, o.error);
	exec_output_free(&o);
}

/* stdin: 1 MiB through cat byte-exact (input and output interleave), input nobody reads, empty input. */
static void test_stdin(void)
{
	size_t len = (1u << 20) + 17;
	uint8_t *data = malloc(len);
	struct exec_request r = { .command = "cat", .has_input = true };
	struct exec_output o;
	uint32_t x = 99;
	int ret;

	for (size_t i = 0; i < len; i++) {
		x = x * 1103515245u + 12345u;
		data[i] = (uint8_t)(x >> 16);
	}
	r.input = data;
	r.input_len = len;
	ret = exec_run(test_sock, SMOLVM_AGENT_PORT, &r, 60000, NULL, NULL, &o);
	CHECK(ret == 0 && o.exit_code == 0 && o.out_len == len && memcmp(o.out, data, len) == 0,
	      "cat: ret %d exit %d out %zu/%zu %s", ret, o.exit_code, o.out_len, len, o.error);
	exec_output_free(&o);

	r.command = "head -c 3; echo; exit 5";
	ret = exec_run(test_sock, SMOLVM_AGENT_PORT, &r, 60000, NULL, NULL, &o);
	CHECK(ret == 0 && o.exit_code == 5 && o.out_len == 4, "head: ret %d exit %d out %zu %s", ret, o.exit_code,
	      o.out_len, o.error);
	exec_output_free(&o);

	r.command = "wc -c";
	r.input_len = 0;
	ret = exec_run(test_sock, SMOLVM_AGENT_PORT, &r, 60000, NULL, NULL, &o);
	CHECK(ret == 0 && test_eq(o.out, o.out_len, "0\n"), "empty: ret %d out %.*s", ret, (int)o.out_len, o.out);
	exec_output_free(&o);

	r.has_input = false; /* no input: /dev/null, cat ends at once */
	r.command = "cat; echo done";
	ret = exec_run(test_sock, SMOLVM_AGENT_PORT, &r, 60000, NULL, NULL, &o);
	CHECK(ret == 0 && test_eq(o.out, o.out_len, "done\n"), "devnull: ret %d out %.*s", ret, (int)o.out_len, o.out);
	exec_output_free(&o);
	free(data);
}

struct test_thread {
	int id;
	bool ok;
	char detail[512];
};

static void *test_thread_main(void *arg)
{
	struct test_thread *t = arg;
	char env0[32], *want_out = NULL, *want_err = NULL;
	const char *const env[] = { env0 };
	size_t cap = 4000 * 32, lo = 0, le = 0;
	struct exec_output o;
	int ret;

	snprintf(env0, sizeof(env0), "T=%d", t->id);
	want_out = malloc(cap);
	want_err = malloc(cap);
	for (int i = 0; i < 3000; i++) {
		lo += (size_t)sprintf(want_out + lo, "t%d out %d\n", t->id, i);
		le += (size_t)sprintf(want_err + le, "t%d err %d\n", t->id, i);
	}
	ret = test_run("i=0; while [ $i -lt 3000 ]; do echo \"t$T out $i\"; echo \"t$T err $i\" >&2; i=$((i+1)); "
		       "done; exit $T",
		       NULL, env, 1, 0, &o);
	t->ok = ret == 0 && o.exit_code == t->id && o.out_len == lo && o.err_len == le &&
		memcmp(o.out, want_out, lo) == 0 && memcmp(o.err, want_err, le) == 0;
	snprintf(t->detail, sizeof(t->detail), "ret %d exit %d out %zu/%zu err %zu/%zu %s", ret, o.exit_code,
		 o.out_len, lo, o.err_len, le, o.error);
	exec_output_free(&o);
	free(want_out);
	free(want_err);
	return NULL;
}

static void test_concurrent(void)
{
	pthread_t th[4];
	struct test_thread t[4];

	for (int i = 0; i < 4; i++) {
		t[i] = (struct test_thread){ .id = i + 1 };
		pthread_create(&th[i], NULL, test_thread_main, &t[i]);
	}
	for (int i = 0; i < 4; i++) {
		pthread_join(th[i], NULL);
		CHECK(t[i].ok, "thread %d: %s", t[i].id, t[i].detail);
	}
}

static void test_bad_frames(void)
{
	static const struct {
		const char *name;
		uint32_t magic;
		uint16_t type;
		uint32_t n_env;
		const char *strings;
		size_t slen;
		int64_t len; /* -1: the payload's size */
		const char *want;
	} cases[] = {
		{ "magic", 0xdeadbeef, SMOLVM_EXEC, 0, "true\0", 6, -1, "magic 0xdeadbeef" },
		{ "type", SMOLVM_PROTO_MAGIC, SMOLVM_STDOUT, 0, "true\0", 6, -1, "type 2, want EXEC" },
		{ "oversized", SMOLVM_PROTO_MAGIC, SMOLVM_EXEC, 0, "", 0, SMOLVM_MAX_PAYLOAD + 1, "over the limit" },
		{ "short", SMOLVM_PROTO_MAGIC, SMOLVM_EXEC, 0, "", 0, 4, "shorter than its 12-byte header" },
		{ "unterminated command", SMOLVM_PROTO_MAGIC, SMOLVM_EXEC, 0, "true", 4, -1, "command string is not NUL" },
		{ "no cwd", SMOLVM_PROTO_MAGIC, SMOLVM_EXEC, 0, "true", 5, -1, "cwd string is missing" },
		{ "n_env too big", SMOLVM_PROTO_MAGIC, SMOLVM_EXEC, 2, "true\0\0A=1", 10, -1, "env entry 1 is missing" },
		{ "env not KEY=VALUE", SMOLVM_PROTO_MAGIC, SMOLVM_EXEC, 1, "true\0\0NOEQ", 11, -1, "is not KEY=VALUE" },
		{ "env =x", SMOLVM_PROTO_MAGIC, SMOLVM_EXEC, 1, "true\0\0=x", 9, -1, "is not KEY=VALUE" },
		{ "trailing bytes", SMOLVM_PROTO_MAGIC, SMOLVM_EXEC, 0, "true\0\0xyz", 9, -1, "3 bytes after" },
	};
	uint8_t payload[64];

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		int fd = test_raw_connect(SMOLVM_AGENT_PORT);
		size_t plen;

		CHECK(fd >= 0, "%s: connect", cases[i].name);
		if (fd < 0)
			continue;
		plen = test_exec_payload(payload, 0, cases[i].n_env, cases[i].strings, cases[i].slen);
		if (cases[i].len >= 0)
			plen = cases[i].len < (int64_t)plen ? (size_t)cases[i].len : 0;
		test_raw_frame(fd, cases[i].magic, cases[i].type, cases[i].len >= 0 ? (uint32_t)cases[i].len : (uint32_t)plen,
			       payload, plen);
		const char *text;
		int err = test_raw_error(fd, &text);
		CHECK(err == 0 && strstr(text, cases[i].want), "%s: err %d \"%s\"", cases[i].name, err, text);
		/* closed: EOF, or ECONNRESET when the agent closed with our bytes unread */
		char c;
		ssize_t n = test_read(fd, &c, 1);
		CHECK(n == 0 || (n < 0 && errno == ECONNRESET), "%s: connection not closed after ERROR", cases[i].name);
		close(fd);
	}

	/* a port nobody listens on: the connection is dropped before OK */
	int fd = test_raw_connect(99);
	char c;
	CHECK(fd >= 0 && test_read(fd, &c, 1) == 0, "wrong port not refused");
	if (fd >= 0)
		close(fd);
	struct exec_request r = { .command = "true" };
	struct exec_output o;
	int ret = exec_run(test_sock, 99, &r, 10000, NULL, NULL, &o);
	CHECK(ret == -ECONNREFUSED, "wrong port: ret %d %s", ret, o.error);
	exec_output_free(&o);
}

static int test_setup_run(const struct setup_request *su, struct agent_error *guest, char *error, size_t size)
{
	return setup_run(test_sock, SMOLVM_AGENT_PORT, su, 10000, NULL, NULL, error, size, guest);
}

/* SETUP: accepted (and, in --unix mode, not applied); malformed ones get ERROR. */
static void test_setup(void)
{
	static const uint8_t entropy[32] = { 1, 2, 3 };
	struct setup_request su = { .wall_ns = 1700000000000000000ull, .entropy = entropy,
				    .entropy_len = sizeof(entropy), .hostname = "vm-test" };
	struct agent_error g;
	char e[256];
	int ret = test_setup_run(&su, &g, e, sizeof(e));

	CHECK(ret == 0 && !g.set, "setup: ret %d %s", ret, e);

	/* SMOLVM_SETUP_ROOT is accepted and ignored in --unix mode; unknown flags are refused */
	su.flags = SMOLVM_SETUP_ROOT;
	ret = test_setup_run(&su, &g, e, sizeof(e));
	CHECK(ret == 0, "setup root: ret %d %s", ret, e);
	su.flags = 0x80;
	ret = test_setup_run(&su, &g, e, sizeof(e));
	CHECK(ret == -EPROTO && g.set && g.err == EINVAL && g.code == SMOLVM_ERRC_REQUEST && strstr(e, "unknown flags 0x80"),
	      "setup flags 0x80: ret %d err %d %s", ret, g.err, e);
	su.flags = 0;

	/* SMOLVM_SETUP_NET: its data is checked (and not applied in --unix mode) */
	struct {
		struct smolvm_setup_net n;
		char hosts[16];
	} net = { { { 10, 0, 2, 15 }, { 10, 0, 2, 2 }, { 10, 0, 2, 3 }, 24, 0, 65520, 14 }, "10.0.2.2\tdb.x\n" };
	const struct {
		const char *what;
		uint8_t prefix;
		uint16_t mtu;
		uint32_t hosts_len, extra_len;
		bool ok;
	} nets[] = {
		{ "valid", 24, 65520, 14, sizeof(net.n) + 14, true },
		{ "no hosts", 24, 1500, 0, sizeof(net.n), true },
		{ "prefix 0", 0, 1500, 0, sizeof(net.n), false },
		{ "prefix 31", 31, 1500, 0, sizeof(net.n), false },
		{ "mtu 67", 24, 67, 0, sizeof(net.n), false },
		{ "hosts_len past the end", 24, 1500, 15, sizeof(net.n) + 14, false },
		{ "bytes after the hosts", 24, 1500, 0, sizeof(net.n) + 1, false },
		{ "hosts_len huge", 24, 1500, 0xffffffffu, sizeof(net.n) + 15, false },
		{ "truncated struct", 24, 1500, 0, sizeof(net.n) - 1, false },
		{ "no data", 24, 1500, 0, 0, false },
	};
	for (size_t i = 0; i < sizeof(nets) / sizeof(nets[0]); i++) {
		net.n.prefix = nets[i].prefix;
		net.n.mtu = nets[i].mtu;
		net.n.hosts_len = nets[i].hosts_len;
		su.flags = SMOLVM_SETUP_NET;
		su.extra = (const uint8_t *)&net;
		su.extra_len = nets[i].extra_len;
		ret = test_setup_run(&su, &g, e, sizeof(e));
		if (nets[i].ok)
			CHECK(ret == 0, "setup net %s: ret %d %s", nets[i].what, ret, e);
		else
			CHECK(ret == -EPROTO && g.err == EINVAL && strstr(e, "network part"), "setup net %s: ret %d err %d %s",
			      nets[i].what, ret, g.err, e);
	}
	/* a NUL inside the hosts text */
	net.n.prefix = 24;
	net.n.hosts_len = 14;
	net.hosts[3] = 0;
	su.extra_len = sizeof(net.n) + 14;
	ret = test_setup_run(&su, &g, e, sizeof(e));
	CHECK(ret == -EPROTO && g.err == EINVAL, "setup net NUL in hosts: ret %d %s", ret, e);
	su.flags = 0;
	su.extra = NULL;
	su.extra_len = 0;

	su.entropy_len = SMOLVM_SETUP_MAX_ENTROPY + 1;
	ret = test_setup_run(&su, &g, e, sizeof(e));
	CHECK(ret == -EINVAL, "oversized entropy: ret %d", ret);

	/* entropy_len says 16 but the payload holds only the header */
	struct smolvm_setup bad = { 0, 16, 0, 0, 0 };
	int fd = test_raw_connect(SMOLVM_AGENT_PORT);
	const char *text;
	int err;

	CHECK(fd >= 0, "setup: connect");
	if (fd < 0)
		return;
	test_raw_frame(fd, SMOLVM_PROTO_MAGIC, SMOLVM_SETUP, sizeof(bad), &bad, sizeof(bad));
	err = test_raw_error(fd, &text);
	CHECK(err == 0 && strstr(text, "bad SETUP frame"), "bad setup: err %d \"%s\"", err, text);
	close(fd);
}

/* The host goes away mid-command: the agent kills the process group. */
static void test_host_close(void)
{
	int fd = test_raw_connect(SMOLVM_AGENT_PORT);
	static const char strings[] = "echo $$; sleep 1000 & sleep 1000\0";
	uint8_t payload[64], *msg = NULL;
	struct smolvm_frame h;
	size_t plen = test_exec_payload(payload, 0, 0, strings, sizeof(strings));
	long pgid = 0;

	CHECK(fd >= 0, "connect");
	if (fd < 0)
		return;
	test_raw_frame(fd, SMOLVM_PROTO_MAGIC, SMOLVM_EXEC, (uint32_t)plen, payload, plen);
	if (test_raw_read(fd, &h, &msg) && h.type == SMOLVM_STDOUT)
		pgid = strtol((char *)msg, NULL, 10);
	free(msg);
	CHECK(pgid > 1, "no pid");
	usleep(100000);
	close(fd);
	if (pgid > 1) {
		bool gone = test_gone(-(pid_t)pgid, 5);
		CHECK(gone, "process group %ld survived the host's close", pgid);
		if (!gone)
			kill(-(pid_t)pgid, SIGKILL);
	}
}

/* A slow reader: the agent stops reading the pipes but loses nothing. */
static void test_backpressure(void)
{
	int fd = test_raw_connect(SMOLVM_AGENT_PORT);
	static const char strings[] = "head -c 8388608 /dev/zero; echo done >&2\0";
	uint8_t payload[96], *msg = NULL;
	size_t plen = test_exec_payload(payload, 0, 0, strings, sizeof(strings)), out = 0, err = 0;
	struct smolvm_frame h;
	bool zeros = true, exited = false;
	int frames = 0;

	CHECK(fd >= 0, "connect");
	if (fd < 0)
		return;
	test_raw_frame(fd, SMOLVM_PROTO_MAGIC, SMOLVM_EXEC, (uint32_t)plen, payload, plen);
	usleep(500000);
	while (test_raw_read(fd, &h, &msg)) {
		frames++;
		if (h.type == SMOLVM_STDOUT) {
			CHECK(h.len <= 65536 && h.len > 0, "frame of %u bytes", h.len);
			for (uint32_t i = 0; i < h.len; i++)
				zeros &= msg[i] == 0;
			out += h.len;
		} else if (h.type == SMOLVM_STDERR) {
			err += h.len;
		} else if (h.type == SMOLVM_EXIT) {
			struct smolvm_exit ex;
			memcpy(&ex, msg, sizeof(ex));
			exited = ex.exit_code == 0;
			free(msg);
			break;
		}
		free(msg);
		if (frames % 16 == 0)
			usleep(5000);
	}
	CHECK(out == 8388608 && zeros && err == 5 && exited, "out %zu err %zu exited %d", out, err, exited);
	close(fd);
}

static int test_interrupt_cb(void *opaque)
{
	int *calls = opaque;

	return ++*calls >= 3;
}

static void test_host_side_limits(void)
{
	struct exec_request r = { .command = "sleep 5" };
	struct exec_output o;
	double t0 = test_now();
	int calls = 0, ret;

	ret = exec_run(test_sock, SMOLVM_AGENT_PORT, &r, 300, NULL, NULL, &o);
	CHECK(ret == -ETIMEDOUT && test_now() - t0 < 3, "host timeout: ret %d after %.2f s", ret, test_now() - t0);
	exec_output_free(&o);

	t0 = test_now();
	ret = exec_run(test_sock, SMOLVM_AGENT_PORT, &r, -1, test_interrupt_cb, &calls, &o);
	CHECK(ret == -EINTR && calls == 3 && test_now() - t0 < 3, "interrupt: ret %d calls %d after %.2f s", ret, calls,
	      test_now() - t0);
	exec_output_free(&o);

	ret = exec_run("/nonexistent-smolvm/vsock.sock", SMOLVM_AGENT_PORT, &r, 1000, NULL, NULL, &o);
	CHECK(ret == -ENOENT && strstr(o.error, "/nonexistent-smolvm"), "missing socket: ret %d %s", ret, o.error);
	exec_output_free(&o);

	/* request size: near the frame limit works (9 entries: exec takes at most 128 KiB per string) */
	enum { N_BIG = 9, BIG = 110000 };
	char *vals[N_BIG + 1];
	for (int i = 0; i <= N_BIG; i++) {
		vals[i] = malloc(BIG + 1);
		memset(vals[i], 'x', BIG);
		memcpy(vals[i], "B0=", 3);
		vals[i][1] = (char)('0' + i);
		vals[i][BIG] = 0;
	}
	ret = test_run("echo ${#B0} ${#B8}", NULL, (const char *const *)vals, N_BIG, 0, &o);
	char want[32];
	snprintf(want, sizeof(want), "%d %d\n", BIG - 3, BIG - 3);
	CHECK(ret == 0 && test_eq(o.out, o.out_len, want), "big env: ret %d %s out %.*s", ret, o.error,
	      (int)o.out_len, o.out);
	exec_output_free(&o);
	ret = test_run("true", NULL, (const char *const *)vals, N_BIG + 1, 0, &o);
	CHECK(ret == -E2BIG, "oversized request: ret %d", ret);
	exec_output_free(&o);
	for (int i = 0; i <= N_BIG; i++)
		free(vals[i]);
}

static void test_on_signal(int sig)
{
	(void)sig;
}

struct test_asks {
	int calls, rings;
};

static int test_asks_cb(void *opaque)
{
	struct test_asks *a = opaque;

	a->rings += agent_test_rings() > 0;
	return ++a->calls >= 5;
}

/*
 * How the client waits: exec_run() on a ring of its own where io_uring works
 * (none left afterwards), interrupted() asked at once after a signal (one
 * every 10 ms: 5 asks long before 5 slices of 100 ms); exec_stream_wait()
 * blocks until output comes (no spinning) and serves a stream whose input
 * and output interleave.
 */
static void test_waits(void)
{
	struct sigaction sa = { .sa_handler = test_on_signal }, old; /* no SA_RESTART, like Python's handlers */
	struct itimerval every = { { 0, 10000 }, { 0, 10000 } }, off = { { 0, 0 }, { 0, 0 } };
	struct exec_request r = { .command = "sleep 5" };
	size_t len = (1u << 20) + 5, waits = 0;
	bool ring = agent_test_have_uring();
	struct test_asks a = { 0, 0 };
	struct exec_stream *xs = NULL;
	uint8_t *data = malloc(len);
	struct exec_output o;
	double t0 = test_now();
	int ret;

	sigaction(SIGALRM, &sa, &old);
	setitimer(ITIMER_REAL, &every, NULL);
	ret = exec_run(test_sock, SMOLVM_AGENT_PORT, &r, 10000, test_asks_cb, &a, &o);
	setitimer(ITIMER_REAL, &off, NULL);
	sigaction(SIGALRM, &old, NULL);
	CHECK(ret == -EINTR && a.calls == 5 && test_now() - t0 < 0.4, "signals: ret %d, %d asks in %.2f s", ret,
	      a.calls, test_now() - t0);
	CHECK(a.rings == (ring ? a.calls : 0), "a ring during %d of %d asks (io_uring here: %d)", a.rings, a.calls,
	      ring);
	CHECK(agent_test_rings() == 0, "%d ring(s) left after exec_run()", agent_test_rings());
	exec_output_free(&o);

	r.command = "sleep 0.3; echo x";
	ret = exec_stream_open(&xs, test_sock, SMOLVM_AGENT_PORT, &r, 60000, 0, &o);
	while (ret == 0 && (ret = exec_stream_step(xs)) == 0 && waits < 1000) {
		ret = exec_stream_wait(xs, 50);
		waits++;
	}
	CHECK(ret == 1 && test_eq(o.out, o.out_len, "x\n") && waits >= 3 && waits < 100,
	      "stream: ret %d after %zu waits of 50 ms %s", ret, waits, o.error);
	exec_stream_free(xs);
	exec_output_free(&o);

	for (size_t i = 0; i < len; i++)
		data[i] = (uint8_t)(i * 7 + i / 4093);
	r = (struct exec_request){ .command = "cat", .has_input = true, .input = data, .input_len = len };
	ret = exec_stream_open(&xs, test_sock, SMOLVM_AGENT_PORT, &r, 60000, 0, &o);
	while (ret == 0 && (ret = exec_stream_step(xs)) == 0)
		ret = exec_stream_wait(xs, 1000);
	CHECK(ret == 1 && o.out_len == len && memcmp(o.out, data, len) == 0, "stream stdin: ret %d out %zu/%zu %s", ret,
	      o.out_len, len, o.error);
	exec_stream_free(xs);
	exec_output_free(&o);
	CHECK(agent_test_rings() == 0, "%d ring(s) left after exec_stream_free()", agent_test_rings());
	free(data);
}

static void test_no_uring_body(void)
{
	test_big_output();
	test_stdin();
	test_host_side_limits();
	test_waits();
}

/* Where io_uring is unavailable, the same requests work through poll(). */
static void test_no_uring(void)
{
	agent_test_without_uring(test_no_uring_body);
}

/* Every exited child of the agent (it is a subreaper here, as PID 1 in the guest) is reaped. */
static void test_no_zombies(void)
{
	double end = test_now() + 5;
	int zombies;

	do {
		DIR *d = opendir("/proc");
		struct dirent *e;

		zombies = 0;
		while (d && (e = readdir(d))) {
			char path[300], buf[512], *p;
			int ppid = 0;
			char state = 0;
			FILE *f;

			if (e->d_name[0] < '0' || e->d_name[0] > '9')
				continue;
			snprintf(path, sizeof(path), "/proc/%s/stat", e->d_name);
			f = fopen(path, "r");
			if (!f)
				continue;
			if (fgets(buf, sizeof(buf), f) && (p = strrchr(buf, ')')) && sscanf(p + 1, " %c %d", &state, &ppid) == 2 &&
			    ppid == test_agent && state == 'Z')
				zombies++;
			fclose(f);
		}
		if (d)
			closedir(d);
		if (!zombies)
			break;
		usleep(50000);
	} while (test_now() < end);
	CHECK(zombies == 0, "%d zombie children of the agent", zombies);
}

static int test_start_agent(const char *agent)
{
	char *argv[] = { (char *)agent, "--unix", test_sock, NULL };
	int ret;

	setenv("SMOLVM_TEST_LEAK", "1", 1);
	ret = posix_spawn(&test_agent, agent, NULL, NULL, argv, environ);
	unsetenv("SMOLVM_TEST_LEAK");
	if (ret) {
		fprintf(stderr, "cannot start %s: %s\n", agent, strerror(ret));
		return -1;
	}
	return agent_test_wait_ready();
}

static void test_cleanup(void)
{
	char path[160];

	snprintf(path, sizeof(path), "%s/blob", test_dir);
	unlink(path);
}

int main(int argc, char **argv)
{
	static const struct agent_test tests[] = {
		{ "streams", test_streams },
		{ "exit_codes", test_exit_codes },
		{ "big_output", test_big_output },
		{ "binary", test_binary },
		{ "timeout", test_timeout },
		{ "background_holds_pipes", test_background_holds_pipes },
		{ "env", test_env },
		{ "cwd", test_cwd },
		{ "stdin", test_stdin },
		{ "concurrent", test_concurrent },
		{ "bad_frames", test_bad_frames },
		{ "setup", test_setup },
		{ "host_close", test_host_close },
		{ "backpressure", test_backpressure },
		{ "host_side_limits", test_host_side_limits },
		{ "waits", test_waits },
		{ "no_uring", test_no_uring },
		{ "no_zombies", test_no_zombies },
	};

	return agent_test_main(argc, argv, "exec", tests, sizeof(tests) / sizeof(tests[0]), test_start_agent, test_cleanup);
}
