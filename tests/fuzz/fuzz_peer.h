/*
 * For the host-side agent-protocol harnesses (csrc/client/: exec, setup, files):
 * a hostile "VMM + agent" on a Unix socket. A thread accepts each connection,
 * reads the "CONNECT <port>\n" line, answers with the fuzz input verbatim
 * (the "OK <n>\n" line is part of the input, so the handshake parser is
 * fuzzed too), shuts its write side and drains whatever the client sends
 * until the client closes.
 */
#ifndef SMOLVM_FUZZ_PEER_H
#define SMOLVM_FUZZ_PEER_H

#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* A harness invariant broke: say which and abort, so libFuzzer keeps the input. */
static void peer_check_failed(const char *file, int line, const char *what)
{
	fprintf(stderr, "fuzz harness: %s:%d: %s\n", file, line, what);
	abort();
}

#define PEER_CHECK(cond) ((cond) ? (void)0 : peer_check_failed(__FILE__, __LINE__, #cond))

static char peer_path[108];
static int peer_listen = -1;
static const uint8_t *peer_data;
static size_t peer_len;
static sem_t peer_done;

static void *peer_thread(void *arg)
{
	static uint8_t junk[1 << 16];

	(void)arg;
	for (;;) {
		int fd = accept(peer_listen, NULL, NULL);
		size_t off = 0;
		char ch;

		if (fd < 0)
			continue;
		while (read(fd, &ch, 1) == 1 && ch != '\n')
			;
		while (off < peer_len) {
			ssize_t n = send(fd, peer_data + off, peer_len - off, MSG_NOSIGNAL);

			if (n <= 0)
				break;
			off += (size_t)n;
		}
		shutdown(fd, SHUT_WR);
		while (read(fd, junk, sizeof(junk)) > 0)
			;
		close(fd);
		sem_post(&peer_done);
	}
	return NULL;
}

static void peer_unlink(void)
{
	unlink(peer_path);
}

static void peer_start(void)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	const char *tmp = getenv("TMPDIR");
	pthread_t t;

	snprintf(peer_path, sizeof(peer_path), "%s/smolvm-fuzz-peer-%d.sock", tmp && *tmp ? tmp : "/tmp",
		 (int)getpid());
	unlink(peer_path);
	strcpy(sa.sun_path, peer_path);
	peer_listen = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	PEER_CHECK(peer_listen >= 0);
	PEER_CHECK(bind(peer_listen, (struct sockaddr *)&sa, sizeof(sa)) == 0);
	PEER_CHECK(listen(peer_listen, 4) == 0);
	atexit(peer_unlink);
	PEER_CHECK(sem_init(&peer_done, 0, 0) == 0);
	PEER_CHECK(pthread_create(&t, NULL, peer_thread, NULL) == 0);
	pthread_detach(t);
}

/* The next connection gets these bytes. */
static void peer_set(const uint8_t *data, size_t len)
{
	peer_data = data;
	peer_len = len;
}

/* After the client call returned: wait until the peer is done with the input's bytes. */
static void peer_wait(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	ts.tv_sec += 10;
	while (sem_timedwait(&peer_done, &ts) < 0 && errno == EINTR)
		;
}

#endif
