/* The egress policy of a filtered NIC: frame parsing (Ethernet, IPv4, IPv6, UDP, TCP), the allow table, crafted replies. */
#ifndef SMOLVM_NET_FILTER_H
#define SMOLVM_NET_FILTER_H

#include <stdbool.h>
#include <stdint.h>

#define NETF_MAX_DOMAINS 256u
#define NETF_MAX_CIDRS 256u
#define NETF_MAX_HOSTS 256u
#define NETF_MAX_LEARNED 1024u /* addresses handed out; the one expiring first makes room */
#define NETF_TTL_S 300u        /* getaddrinfo gives no TTL: every answer says this, and the table keeps it this long */
#define NETF_MAX_REPLY 1600u   /* longest frame netf_build_* writes */

#define NETF_ETH_HLEN 14u
#define NETF_ETH_IP4 0x0800u
#define NETF_ETH_ARP 0x0806u
#define NETF_ETH_IP6 0x86ddu

/* What netf_parse saw. Addresses in network order; offsets into the frame. */
struct netf_pkt {
	uint16_t ethertype;
	uint8_t proto;        /* IPv4 protocol (6 TCP, 17 UDP, 1 ICMP) */
	bool first_frag;      /* the L4 header is in this frame (fragment offset 0) */
	bool more_frags;      /* MF set */
	uint32_t src, dst;    /* IPv4 */
	uint32_t l3, l3_len;  /* IPv4 header offset and length (IHL) */
	uint32_t l4, l4_len;  /* L4 offset and its length to the end of the datagram (total length bound) */
	uint16_t sport, dport; /* TCP / UDP, when first_frag and the header fits */
	uint8_t tcp_flags;
	uint32_t seq, ack;     /* TCP, host order */
	uint32_t tcp_hlen;
	bool l4_ok;            /* the TCP/UDP/ICMP header fits in l4_len */
};

/*
 * Parse frame[0..len). Returns 0 with p filled for IPv4 (every length checked
 * against the frame and the IP total length), 0 with only ethertype set for
 * other ethertypes, -EINVAL for a frame too short or an IPv4 header that lies.
 */
int netf_parse(const uint8_t *frame, uint32_t len, struct netf_pkt *p);

struct netf;

/* An empty policy (everything blocked). Returns 0 or -ENOMEM. */
int netf_new(struct netf **out);
void netf_free(struct netf *f);

/* Building the policy (before the device runs). Each returns 0, -EINVAL (malformed) or -E2BIG (table full). */
int netf_add_domain(struct netf *f, const char *pattern); /* "name" or "*.name" (dns_name_match) */
int netf_add_cidr(struct netf *f, const char *cidr);      /* "a.b.c.d/n" or "a.b.c.d" (= /32) */
int netf_add_host(struct netf *f, const char *name_eq_ip); /* "name=a.b.c.d": answered before the resolver */

/* Is name (lower case) allowed by allowed_domains? */
bool netf_name_allowed(const struct netf *f, const char *name);

/* extra_hosts: the address of name into *ip (network order) and true, or false. */
bool netf_host_lookup(const struct netf *f, const char *name, uint32_t *ip);

/* Remember ip (network order) as handed out for an allowed name, until now_s + NETF_TTL_S (or later). */
void netf_learn(struct netf *f, uint32_t ip, uint64_t now_s);

/* May the guest send to ip at now_s: in an allowed CIDR or learned and not expired. */
bool netf_addr_allowed(struct netf *f, uint32_t ip, uint64_t now_s);

enum netf_verdict {
	NETF_PASS,   /* to the backend */
	NETF_DROP,   /* silently */
	NETF_REJECT, /* not to the backend; netf_build_reject gives the guest its refusal */
	NETF_DNS,    /* a UDP query to the intercepted DNS address: the VMM answers it */
};

/*
 * The verdict on a guest frame, dns_ip (network order) being the address whose
 * port 53 the VMM answers. ARP passes; IPv6 and other ethertypes drop (the
 * guest runs IPv4 only); IPv4 to an address netf_addr_allowed refuses is
 * rejected (TCP, UDP, ICMP echo) or dropped (the rest, and fragments after
 * the first). A passing frame keeps its learned address fresh.
 */
enum netf_verdict netf_check(struct netf *f, const uint8_t *frame, uint32_t len, const struct netf_pkt *p,
			     uint32_t dns_ip, uint64_t now_s);

/*
 * The refusal of a rejected frame, as a frame to the guest in out[0..cap):
 * TCP RST (nothing for an RST), ICMP destination unreachable, communication
 * administratively prohibited for the rest. Returns its length or 0 (none).
 */
uint32_t netf_build_reject(const uint8_t *frame, uint32_t len, const struct netf_pkt *p, uint8_t *out, uint32_t cap);

/* A UDP datagram from (p's dst, dport) back to (p's src, sport) carrying payload, as a frame. Returns its length or 0. */
uint32_t netf_build_udp_reply(const uint8_t *frame, const struct netf_pkt *p, const uint8_t *payload, uint32_t plen,
			      uint8_t *out, uint32_t cap);

#endif
