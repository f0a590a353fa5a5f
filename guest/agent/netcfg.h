/* Guest network set-up from SETUP's SMOLVM_SETUP_NET data: eth0 address, route, MTU; /etc/resolv.conf and /etc/hosts. */
#ifndef SMOLVM_AGENT_NETCFG_H
#define SMOLVM_AGENT_NETCFG_H

#include <stddef.h>
#include <stdint.h>

#include "proto.h"

struct netcfg {
	struct smolvm_setup_net n;
	char hosts[SMOLVM_SETUP_MAX_HOSTS + 1]; /* NUL-terminated copy of the hosts text */
};

/* Check and copy p[0..len) (exactly struct + hosts_len bytes, no NUL in the text). 0 or -EINVAL. */
int netcfg_parse(const uint8_t *p, uint32_t len, struct netcfg *out);

/* Configure eth0 and the default route (again after a restore: existing ones are fine). 0 or -errno, msg says which step. */
int netcfg_link(const struct netcfg *c, char *msg, size_t cap);

/* Write /etc/resolv.conf and /etc/hosts in the current root, hostname included. 0 or -errno. */
int netcfg_files(const struct netcfg *c, const char *hostname, char *msg, size_t cap);

#endif
