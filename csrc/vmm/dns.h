/* DNS messages the VMM answers for a filtered guest: one-question queries in, A / NODATA / NXDOMAIN answers out. */
#ifndef SMOLVM_DNS_H
#define SMOLVM_DNS_H

#include <stdbool.h>
#include <stdint.h>

#define DNS_HDR 12u
#define DNS_NAME_MAX 253u   /* text form, no trailing dot */
#define DNS_QNAME_MAX 255u  /* wire form */
#define DNS_MAX_ANSWERS 8u
#define DNS_MAX_REPLY 512u  /* answers always fit a plain UDP reply: no truncation, no TCP */

enum { DNS_TYPE_A = 1, DNS_TYPE_AAAA = 28, DNS_CLASS_IN = 1 };
enum { DNS_NOERROR = 0, DNS_FORMERR = 1, DNS_SERVFAIL = 2, DNS_NXDOMAIN = 3, DNS_NOTIMP = 4, DNS_REFUSED = 5 };

struct dns_query {
	uint16_t id, qtype, qclass;
	bool rd;
	bool name_ok;                /* every label is [A-Za-z0-9_-]; false: answer NXDOMAIN, never resolve */
	char name[DNS_NAME_MAX + 1]; /* lower case, labels joined by '.', no trailing dot; "" = the root */
	uint8_t qname[DNS_QNAME_MAX]; /* the question's name as sent (wire form), echoed in the answer */
	uint32_t qname_len;
};

/*
 * Parse a query: a 12-byte header with QR = 0, opcode 0, exactly one question
 * and no answer or authority records (additional records, e.g. EDNS, are
 * ignored), a name of uncompressed labels (1..63 bytes each, 255 bytes in
 * all), then type and class, all inside p[0..len). Returns 0 or -EINVAL
 * (a message not worth answering: the caller drops it).
 */
int dns_parse_query(const uint8_t *p, uint32_t len, struct dns_query *q);

/*
 * Write the answer to q into out[0..cap): rcode, and for DNS_NOERROR the
 * n (<= DNS_MAX_ANSWERS) IPv4 addresses (network order) as A records with
 * ttl seconds. Returns its length, or 0 if cap is too small (DNS_MAX_REPLY always suffices).
 */
uint32_t dns_build_answer(const struct dns_query *q, int rcode, const uint32_t *addrs, unsigned n, uint32_t ttl,
			  uint8_t *out, uint32_t cap);

/*
 * Does name (lower case text) match pattern? "api.example.com" matches itself
 * only; "*.example.org" matches any name ending in ".example.org" with at
 * least one label before it, but not "example.org" itself. Case-insensitive.
 */
bool dns_name_match(const char *pattern, const char *name);

/* Is s a host name or "*." + host name that dns_name_match accepts as a pattern? */
bool dns_pattern_valid(const char *s);

#endif
