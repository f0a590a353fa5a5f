/*
 * libFuzzer harness: the host side of file transfers (csrc/client/file_client.c,
 * over agent_conn.c) facing a hostile agent. Input:
 * [mode][local size] then everything the "agent" sends, starting with the
 * VMM's "OK <n>\n" line. mode & 1: GET, else PUT of a local file of
 * 0..765 bytes.
 */
#include "fuzz_peer.h"

#include <sys/mman.h>

#include "file_client.h"
#include "proto.h"

static int local_fd = -1;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static uint8_t body[1024];
	struct file_result res;
	uint8_t mode, lsize;

	if (peer_listen < 0) {
		peer_start();
		local_fd = memfd_create("fuzz-local", MFD_CLOEXEC);
		PEER_CHECK(local_fd >= 0);
		memset(body, 'b', sizeof(body));
	}
	if (size < 2)
		return 0;
	mode = data[0];
	lsize = data[1];
	PEER_CHECK(ftruncate(local_fd, 0) == 0 && lseek(local_fd, 0, SEEK_SET) == 0);
	peer_set(data + 2, size - 2);
	if (mode & 1) {
		file_get(peer_path, SMOLVM_AGENT_PORT, "/tmp/x", local_fd, 10000, NULL, NULL, &res);
	} else {
		PEER_CHECK(write(local_fd, body, 3u * lsize) == 3 * (ssize_t)lsize);
		PEER_CHECK(lseek(local_fd, 0, SEEK_SET) == 0);
		file_put(peer_path, SMOLVM_AGENT_PORT, local_fd, "/tmp/x", 0644, 10000, NULL, NULL, &res);
	}
	PEER_CHECK(memchr(res.error, 0, sizeof(res.error)));
	peer_wait();
	return 0;
}
