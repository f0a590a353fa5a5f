/* Host side of SETUP: the builder of its frame and the handler of its one answer (EXIT), over agent_conn.c. */
#define _GNU_SOURCE
#include "setup_client.h"

#include <endian.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "proto.h"

static int setup_client_header(void *ctx, uint16_t type, uint32_t len)
{
	struct agent_conn *c = ctx;

	if (type != SMOLVM_EXIT || len != sizeof(struct smolvm_exit))
		return agent_conn_fail(c, -EPROTO, "bad frame from the guest agent: type %u of %u bytes where EXIT was due",
				       type, len);
	return 0;
}

static int setup_client_frame(void *ctx, uint16_t type, const uint8_t *payload, size_t kept, uint32_t len)
{
	struct agent_conn *c = ctx;
	struct smolvm_exit ex;

	(void)type;
	(void)kept;
	(void)len;
	memcpy(&ex, payload, sizeof(ex));
	if (ex.exit_code != 0)
		return agent_conn_fail(c, -EPROTO, "the guest agent ended SETUP with status %d",
				       (int32_t)le32toh((uint32_t)ex.exit_code));
	return 1;
}

static const struct agent_conn_ops setup_client_ops = {
	.header = setup_client_header,
	.frame = setup_client_frame,
};

/* The SETUP frame: struct smolvm_setup, entropy, hostname, the flags' data. */
static int setup_client_build(struct agent_conn *c, const struct setup_request *su)
{
	size_t hlen = su->hostname ? strlen(su->hostname) : 0, off;
	struct smolvm_setup body;
	uint8_t *m;

	m = agent_conn_frame(c, sizeof(body) + su->entropy_len + hlen + su->extra_len);
	if (!m)
		return -ENOMEM;
	memset(&body, 0, sizeof(body));
	body.wall_ns = htole64(su->wall_ns);
	body.entropy_len = htole32(su->entropy_len);
	body.hostname_len = htole32((uint32_t)hlen);
	body.flags = htole32(su->flags);
	memcpy(m, &body, sizeof(body));
	off = sizeof(body);
	if (su->entropy_len)
		memcpy(m + off, su->entropy, su->entropy_len);
	off += su->entropy_len;
	if (hlen)
		memcpy(m + off, su->hostname, hlen);
	off += hlen;
	if (su->extra_len)
		memcpy(m + off, su->extra, su->extra_len);
	agent_conn_frame_done(c, SMOLVM_SETUP, off + su->extra_len);
	return 0;
}

int setup_run(const char *uds_path, uint32_t port, const struct setup_request *req, int host_timeout_ms,
	      int (*interrupted)(void *), void *opaque, char *error, size_t error_size, struct agent_error *guest)
{
	size_t hlen = req && req->hostname ? strlen(req->hostname) : 0;
	struct agent_conn c = { .fd = -1 };
	int ret;

	if (guest)
		memset(guest, 0, sizeof(*guest));
	if (error_size)
		error[0] = 0;
	if (!req || req->entropy_len > SMOLVM_SETUP_MAX_ENTROPY || hlen > SMOLVM_SETUP_MAX_HOSTNAME ||
	    (req->entropy_len && !req->entropy) || req->extra_len > SMOLVM_MAX_PAYLOAD / 2 ||
	    (req->extra_len && !req->extra)) {
		snprintf(error, error_size, "setup: entropy (%u), hostname (%zu) or extra data (%u) too long",
			 req ? req->entropy_len : 0, hlen, req ? req->extra_len : 0);
		return -EINVAL;
	}
	ret = agent_conn_open(&c, uds_path, port, host_timeout_ms, &setup_client_ops, &c, error, error_size);
	if (ret == 0)
		ret = setup_client_build(&c, req);
	if (ret == 0)
		ret = agent_conn_run(&c, interrupted, opaque);
	if (guest)
		*guest = c.guest;
	agent_conn_close(&c);
	if (ret < 0 && error_size && !error[0])
		snprintf(error, error_size, "%s", strerror(-ret));
	return ret;
}
