/*
 * libFuzzer harness: the host side of the agent protocol for commands
 * (csrc/client/exec_client.c and setup_client.c over agent_conn.c), facing a
 * hostile agent. The input's first byte picks the request (EXEC or SETUP, with
 * or without env); the rest is everything the "agent" sends back, starting
 * with the VMM's "OK <n>\n" handshake line.
 */
#include "fuzz_peer.h"

#include "exec_client.h"
#include "setup_client.h"
#include "proto.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static const char *env[] = { "A=1", "PATH=/bin" };
	static const uint8_t entropy[16] = { 1, 2, 3 };
	struct setup_request su = { .wall_ns = 1, .entropy = entropy, .entropy_len = sizeof(entropy), .hostname = "fuzz" };
	struct exec_request req = { .command = "echo hi", .cwd = "/tmp", .timeout_ms = 1000 };
	struct exec_output out;
	uint8_t mode;

	if (peer_listen < 0)
		peer_start();
	if (size < 1)
		return 0;
	mode = data[0];
	if (mode & 2) {
		req.env = env;
		req.n_env = 2;
	}
	peer_set(data + 1, size - 1);
	if (mode & 1) {
		struct agent_error guest;
		char error[256];

		setup_run(peer_path, SMOLVM_AGENT_PORT, &su, 10000, NULL, NULL, error, sizeof(error), &guest);
		PEER_CHECK(memchr(error, 0, sizeof(error)));
		peer_wait();
		return 0;
	}
	exec_run(peer_path, SMOLVM_AGENT_PORT, &req, 10000, NULL, NULL, &out);
	PEER_CHECK(memchr(out.error, 0, sizeof(out.error)));
	PEER_CHECK(!out.out == !out.out_len && !out.err == !out.err_len);
	if (out.out_len)
		(void)*(volatile uint8_t *)(out.out + out.out_len - 1);
	if (out.err_len)
		(void)*(volatile uint8_t *)(out.err + out.err_len - 1);
	exec_output_free(&out);
	peer_wait();
	return 0;
}
