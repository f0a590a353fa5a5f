/* Host-only PTY tests: csrc/client/pty_client.c against the agent (guest/agent/pty.c) in --unix mode, also under ASan+UBSan. */
#include "agent_test.h"

#include <spawn.h>

#include "pty_client.h"

extern char **environ;

/* Wait until kill(pid, 0) says ESRCH (the agent, a subreaper in --unix mode, reaped it). */
static bool test_gone(pid_t pid, double secs)
{
	double end = test_now() + secs;

	while (test_now() < end) {
		if (kill(pid, 0) < 0 && errno == ESRCH)
			return true;
		usleep(20000);
	}
	return false;
}

/* Drive ps until its output (appended to buf) contains want, or it ends, or 20 s pass. */
static bool test_until(struct pty_session *ps, char *buf, size_t cap, size_t *len, const char *want, int *ret)
{
	double end = test_now() + 20;

	*ret = 0;
	while (test_now() < end) {
		size_t n;
		const uint8_t *p = pty_session_output(ps, &n);

		if (n > cap - 1 - *len)
			n = cap - 1 - *len;
		if (n)
			memcpy(buf + *len, p, n);
		*len += n;
		buf[*len] = 0;
		pty_session_consume(ps, n);
		if (want && strstr(buf, want))
			return true;
		if (*ret != 0)
			return false;
		*ret = pty_session_step(ps);
		if (*ret == 0)
			*ret = pty_session_wait(ps, 100);
	}
	return false;
}

static void test_session(void)
{
	struct pty_request req = { .command = "stty size; echo T=$TERM; read x; stty size; echo got $x; exit 3",
				   .rows = 24, .cols = 80 };
	struct pty_session *ps = NULL;
	struct pty_status st;
	char buf[4096];
	size_t len = 0;
	int ret = pty_session_open(&ps, test_sock, SMOLVM_AGENT_PORT, &req, 20000, &st);

	CHECK(ret == 0, "open %d %s", ret, st.error);
	if (ret)
		return;
	CHECK(test_until(ps, buf, sizeof(buf), &len, "T=xterm-256color\r\n", &ret), "output \"%s\" ret %d", buf, ret);
	CHECK(strstr(buf, "24 80\r\n") && st.pid > 1, "output \"%s\" pid %d", buf, st.pid);
	CHECK(pty_session_resize(ps, 0, 80) == -EINVAL && pty_session_resize(ps, 24, SMOLVM_PTY_MAX_DIM + 1) == -EINVAL,
	      "bad sizes accepted");
	CHECK(pty_session_resize(ps, 40, 100) == 0 && pty_session_write(ps, (const uint8_t *)"hello\n", 6) == 0, "queue");
	test_until(ps, buf, sizeof(buf), &len, NULL, &ret);
	CHECK(ret == 1 && strstr(buf, "40 100\r\ngot hello\r\n"), "ret %d output \"%s\" %s", ret, buf, st.error);
	CHECK(st.exit_code == 3 && st.signal == 0 && !st.timed_out, "exit %d signal %d", st.exit_code, st.signal);
	pty_session_free(ps);
}

static void test_close_kills_the_session(void)
{
	struct pty_request req = { .command = "set -m; sleep 1000 & echo job=$! ; exec sleep 1000", .rows = 5, .cols = 5 };
	struct pty_session *ps = NULL;
	struct pty_status st;
	char buf[1024], *job;
	size_t len = 0;
	int ret = pty_session_open(&ps, test_sock, SMOLVM_AGENT_PORT, &req, 20000, &st);

	CHECK(ret == 0, "open %d %s", ret, st.error);
	if (ret)
		return;
	CHECK(test_until(ps, buf, sizeof(buf), &len, "\r\n", &ret), "output \"%s\" ret %d", buf, ret);
	job = strstr(buf, "job=");
	pty_session_free(ps);
	if (job && atoi(job + 4) > 1) {
		CHECK(test_gone(atoi(job + 4), 5), "the job %d outlived its closed session", atoi(job + 4));
		CHECK(test_gone(st.pid, 5), "the shell %d outlived its closed session", st.pid);
	} else {
		CHECK(false, "no job pid in \"%s\"", buf);
	}
}

static void test_bad_requests(void)
{
	struct pty_request req = { .command = "true", .rows = 0, .cols = 80 };
	struct pty_session *ps = NULL;
	struct pty_status st;
	char buf[256];
	size_t len = 0;
	int ret = pty_session_open(&ps, test_sock, SMOLVM_AGENT_PORT, &req, 20000, &st);

	CHECK(ret == -EINVAL && !ps && strstr(st.error, "1..4096"), "rows 0: %d %s", ret, st.error);
	req.rows = 24;
	req.cwd = "/nonexistent-smolvm";
	ret = pty_session_open(&ps, test_sock, SMOLVM_AGENT_PORT, &req, 20000, &st);
	CHECK(ret == 0, "open %d %s", ret, st.error);
	if (ret)
		return;
	test_until(ps, buf, sizeof(buf), &len, NULL, &ret);
	CHECK(ret == -EPROTO && st.guest_err == ENOENT && st.guest_code == SMOLVM_ERRC_CWD, "cwd: %d %d %s", ret,
	      st.guest_err, st.error);
	pty_session_free(ps);
}

static int test_start_agent(const char *agent)
{
	char *argv[] = { (char *)agent, "--unix", test_sock, NULL };
	int ret = posix_spawn(&test_agent, agent, NULL, NULL, argv, environ);

	if (ret) {
		fprintf(stderr, "cannot start %s: %s\n", agent, strerror(ret));
		return -1;
	}
	return agent_test_wait_ready();
}

int main(int argc, char **argv)
{
	static const struct agent_test tests[] = {
		{ "session", test_session },
		{ "close_kills_the_session", test_close_kills_the_session },
		{ "bad_requests", test_bad_requests },
	};

	return agent_test_main(argc, argv, "pty", tests, sizeof(tests) / sizeof(tests[0]), test_start_agent, NULL);
}
