/* The host's resolver off the event loop: one thread per NIC running getaddrinfo, results signalled on an eventfd. */
#ifndef SMOLVM_RESOLVER_H
#define SMOLVM_RESOLVER_H

#include <stdint.h>

#include "dns.h"

#define RESOLVER_QUEUE 32u /* names waiting or being resolved; more: -EAGAIN */

struct resolver;

struct resolver_result {
	uint64_t cookie;
	int rcode;                       /* DNS_NOERROR (n may be 0), DNS_NXDOMAIN or DNS_SERVFAIL */
	unsigned n;
	uint32_t addrs[DNS_MAX_ANSWERS]; /* IPv4, network order */
};

/*
 * Run first thing on the resolver's thread, before it resolves anything: the VMM
 * confines the thread here (its capabilities, its seccomp filter). Returns 0 or
 * -errno; the thread then ends and resolver_new() fails with that.
 */
typedef int resolver_confine_fn(void *arg);

/*
 * Start the thread ("smolvm-dns": getaddrinfo(AF_INET) and whatever the host's
 * NSS does for it, futex, write to its eventfd; nothing else), and wait until
 * confine(arg) (NULL: none) has run on it. Returns 0 or -errno.
 */
int resolver_new(struct resolver **out, resolver_confine_fn *confine, void *arg);

/* The eventfd that becomes readable when results wait (the owner watches it; resolver_take drains it). */
int resolver_fd(const struct resolver *r);

/* Queue name (a valid host name) with cookie. Returns 0, -EAGAIN (queue full) or -EINVAL (too long). */
int resolver_submit(struct resolver *r, const char *name, uint64_t cookie);

/* One finished lookup into *res: 1, or 0 if none is ready. */
int resolver_take(struct resolver *r, struct resolver_result *res);

/*
 * Stop: the thread ends after its current getaddrinfo (which is not waited
 * for: the last of the owner and the thread frees what they share). Stop
 * watching resolver_fd before calling this.
 */
void resolver_free(struct resolver *r);

#endif
