/* Unit tests for csrc/vmm/net_filter.c, dns.c and resolver.c: well-formed and hostile frames and DNS messages. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dns.h"
#include "fake_test.h"
#include "net_filter.h"
#include "resolver.h"

static const uint8_t GMAC[6] = { 0x52, 0x54, 0x00, 0x12, 0x34, 0x56 };
static const uint8_t HMAC[6] = { 0x9a, 0x55, 0x9a, 0x55, 0x9a, 0x55 };
#define GUEST 0x0a00020fu
#define GW 0x0a000202u
#define DNSIP 0x0a000203u

static uint32_t be32(uint32_t v)
{
	return htonl(v);
}

static void put32(uint8_t *p, uint32_t v)
{
	memcpy(p, &v, 4);
}

static uint32_t get32(const uint8_t *p)
{
	uint32_t v;

	memcpy(&v, p, 4);
	return v;
}

static uint16_t sum16(const uint8_t *p, uint32_t len, uint32_t sum)
{
	for (uint32_t i = 0; i + 1 < len; i += 2)
		sum += (uint32_t)p[i] << 8 | p[i + 1];
	if (len & 1)
		sum += (uint32_t)p[len - 1] << 8;
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)sum;
}

/* Ethernet + IPv4 (20 bytes) + l4 payload of l4len bytes from the guest to dst; returns the frame length. */
static uint32_t mk_ip(uint8_t *f, uint8_t proto, uint32_t dst, const uint8_t *l4, uint32_t l4len)
{
	uint8_t *ip = f + 14;

	memcpy(f, HMAC, 6);
	memcpy(f + 6, GMAC, 6);
	f[12] = 0x08;
	f[13] = 0x00;
	memset(ip, 0, 20);
	ip[0] = 0x45;
	ip[2] = (uint8_t)((20 + l4len) >> 8);
	ip[3] = (uint8_t)(20 + l4len);
	ip[8] = 64;
	ip[9] = proto;
	put32(ip + 12, be32(GUEST));
	put32(ip + 16, be32(dst));
	memcpy(ip + 20, l4, l4len);
	return 14 + 20 + l4len;
}

static uint32_t mk_syn(uint8_t *f, uint32_t dst, uint16_t dport)
{
	uint8_t t[20] = { 0 };

	t[0] = 0xc0;
	t[1] = 0x01; /* sport 49153 */
	t[2] = (uint8_t)(dport >> 8);
	t[3] = (uint8_t)dport;
	put32(t + 4, be32(1000));
	t[12] = 5 << 4;
	t[13] = 0x02; /* SYN */
	return mk_ip(f, 6, dst, t, 20);
}

/* A DNS query for name (dotted) of qtype, as a UDP payload into q; returns its length. */
static uint32_t mk_query(uint8_t *q, const char *name, uint16_t qtype)
{
	uint32_t off = 12;
	const char *s = name;

	memset(q, 0, 12);
	q[0] = 0xab;
	q[1] = 0xcd;
	q[2] = 0x01; /* RD */
	q[5] = 1;
	while (*s) {
		const char *dot = strchr(s, '.');
		size_t l = dot ? (size_t)(dot - s) : strlen(s);

		q[off++] = (uint8_t)l;
		memcpy(q + off, s, l);
		off += (uint32_t)l;
		s += l + (dot ? 1 : 0);
	}
	q[off++] = 0;
	q[off++] = (uint8_t)(qtype >> 8);
	q[off++] = (uint8_t)qtype;
	q[off++] = 0;
	q[off++] = 1;
	return off;
}

static uint32_t mk_dns_frame(uint8_t *f, const char *name)
{
	uint8_t u[8 + 300];
	uint32_t ql = mk_query(u + 8, name, DNS_TYPE_A);

	u[0] = 0x9c;
	u[1] = 0x40;
	u[2] = 0;
	u[3] = 53;
	u[4] = (uint8_t)((8 + ql) >> 8);
	u[5] = (uint8_t)(8 + ql);
	u[6] = u[7] = 0;
	return mk_ip(f, 17, DNSIP, u, 8 + ql);
}

static void test_dns_parse(void)
{
	uint8_t q[600], a[DNS_MAX_REPLY];
	struct dns_query dq;
	uint32_t len, addrs[2] = { be32(GW), be32(0x7f000001) }, n;

	cur_test = "dns_parse";
	len = mk_query(q, "Api.Example.COM", DNS_TYPE_A);
	CHECK(dns_parse_query(q, len, &dq) == 0);
	CHECK(strcmp(dq.name, "api.example.com") == 0 && dq.name_ok && dq.id == 0xabcd && dq.rd);
	CHECK(dq.qtype == DNS_TYPE_A && dq.qclass == DNS_CLASS_IN);
	n = dns_build_answer(&dq, DNS_NOERROR, addrs, 2, 300, a, sizeof(a));
	CHECK(n == len + 32 && a[0] == 0xab && a[1] == 0xcd && (a[2] & 0x80) && (a[3] & 0xf) == 0 && a[7] == 2);
	CHECK(memcmp(a + 12, q + 12, len - 12) == 0);
	CHECK(memcmp(a + n - 4, &addrs[1], 4) == 0 && a[n - 16] == 0xc0 && a[n - 15] == 12);
	n = dns_build_answer(&dq, DNS_NXDOMAIN, addrs, 2, 300, a, sizeof(a));
	CHECK(n == len && (a[3] & 0xf) == DNS_NXDOMAIN && a[7] == 0);
	CHECK(dns_build_answer(&dq, DNS_NOERROR, addrs, 2, 300, a, len + 31) == 0); /* too small: nothing */
	/* every truncation of a good query is refused, never read past */
	for (uint32_t l = 0; l < len; l++) {
		uint8_t *c = malloc(l ? l : 1);

		memcpy(c, q, l);
		CHECK(dns_parse_query(c, l, &dq) == -EINVAL);
		free(c);
	}
	/* a response, two questions, an answer record, a compression pointer, a long label */
	q[2] |= 0x80;
	CHECK(dns_parse_query(q, len, &dq) == -EINVAL);
	q[2] &= 0x7f;
	q[5] = 2;
	CHECK(dns_parse_query(q, len, &dq) == -EINVAL);
	q[5] = 1;
	q[7] = 1;
	CHECK(dns_parse_query(q, len, &dq) == -EINVAL);
	q[7] = 0;
	q[12] = 0xc0;
	CHECK(dns_parse_query(q, len, &dq) == -EINVAL);
	q[12] = 64;
	CHECK(dns_parse_query(q, len, &dq) == -EINVAL);
	/* a name over 255 bytes on the wire */
	{
		char big[400];

		memset(big, 'a', sizeof(big));
		for (int i = 63; i < 399; i += 64)
			big[i] = '.';
		big[399] = 0;
		len = mk_query(q, big, DNS_TYPE_A);
		CHECK(dns_parse_query(q, len, &dq) == -EINVAL);
		big[252] = 0; /* 253 characters: the longest name */
		len = mk_query(q, big, DNS_TYPE_A);
		CHECK(dns_parse_query(q, len, &dq) == 0 && strlen(dq.name) == 252);
	}
	/* odd characters parse but are never resolved; a NUL inside a label cannot cut the name */
	len = mk_query(q, "evil.x.example.org", DNS_TYPE_A);
	q[13 + 1] = '.';
	q[13 + 2] = 0;
	CHECK(dns_parse_query(q, len, &dq) == 0 && !dq.name_ok && strlen(dq.name) == strlen("evil.x.example.org"));
	/* the root name */
	len = mk_query(q, "", DNS_TYPE_A);
	CHECK(dns_parse_query(q, len, &dq) == 0 && dq.name[0] == 0);
}

static void test_dns_match(void)
{
	cur_test = "dns_match";
	CHECK(dns_name_match("api.example.com", "api.example.com"));
	CHECK(dns_name_match("API.example.com", "api.EXAMPLE.com"));
	CHECK(!dns_name_match("api.example.com", "x.api.example.com"));
	CHECK(!dns_name_match("api.example.com", "api.example.co"));
	CHECK(dns_name_match("*.example.org", "a.example.org"));
	CHECK(dns_name_match("*.example.org", "a.b.example.org"));
	CHECK(!dns_name_match("*.example.org", "example.org"));
	CHECK(!dns_name_match("*.example.org", "badexample.org"));
	CHECK(!dns_name_match("*.example.org", ".example.org"));
	CHECK(!dns_name_match("*.example.org", ""));
	CHECK(dns_pattern_valid("a.b") && dns_pattern_valid("*.b.c") && dns_pattern_valid("x_y.z"));
	CHECK(!dns_pattern_valid("") && !dns_pattern_valid("*") && !dns_pattern_valid("*.") && !dns_pattern_valid("a..b"));
	CHECK(!dns_pattern_valid("a.*.b") && !dns_pattern_valid("-a.b") && !dns_pattern_valid("a-.b") &&
	      !dns_pattern_valid("a b") && !dns_pattern_valid("a.") && !dns_pattern_valid(".a"));
}

static void test_table(void)
{
	struct netf *f;

	cur_test = "table";
	CHECK(netf_new(&f) == 0);
	CHECK(netf_add_cidr(f, "10.0.2.2/32") == 0 && netf_add_cidr(f, "192.0.2.0/24") == 0 &&
	      netf_add_cidr(f, "198.51.100.7") == 0);
	{
		static const char *const bad[] = { "10.0.2.2/33", "10.0.2/8", "10.0.2.2/", "10.0.2.2/-1", "1.2.3.4/8x",
						   "::1/128", "", "/8", "1.2.3.4/0008", "256.1.1.1", "1.2.3.4 " };

		for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
			CHECK(netf_add_cidr(f, bad[i]) == -EINVAL);
	}
	CHECK(netf_addr_allowed(f, be32(GW), 0) && netf_addr_allowed(f, be32(0xc0000263), 0) &&
	      netf_addr_allowed(f, be32(0xc6336407), 0));
	CHECK(!netf_addr_allowed(f, be32(0x0a000203), 0) && !netf_addr_allowed(f, be32(0xc6336408), 0) &&
	      !netf_addr_allowed(f, 0, 0));
	CHECK(netf_add_domain(f, "Api.Test") == 0 && netf_add_domain(f, "*.wild.test") == 0);
	CHECK(netf_add_domain(f, "*") == -EINVAL && netf_add_domain(f, "a..b") == -EINVAL);
	CHECK(netf_name_allowed(f, "api.test") && netf_name_allowed(f, "x.wild.test") && !netf_name_allowed(f, "wild.test"));
	CHECK(netf_add_host(f, "api.test=10.0.2.2") == 0);
	CHECK(netf_add_host(f, "api.test") == -EINVAL && netf_add_host(f, "=1.2.3.4") == -EINVAL &&
	      netf_add_host(f, "a=1.2.3") == -EINVAL && netf_add_host(f, "*.a=1.2.3.4") == -EINVAL);
	{
		uint32_t ip = 0;

		CHECK(netf_host_lookup(f, "api.test", &ip) && ip == be32(GW) && !netf_host_lookup(f, "x.test", &ip));
	}
	/* learned addresses expire after the TTL; a full table drops the one expiring first */
	CHECK(!netf_addr_allowed(f, be32(0x7f000002), 100));
	netf_learn(f, be32(0x7f000002), 100);
	CHECK(netf_addr_allowed(f, be32(0x7f000002), 100 + NETF_TTL_S - 1));
	CHECK(!netf_addr_allowed(f, be32(0x7f000002), 100 + NETF_TTL_S));
	for (uint32_t i = 0; i < NETF_MAX_LEARNED + 10; i++)
		netf_learn(f, be32(0x7f100000 + i), 1000 + i);
	CHECK(!netf_addr_allowed(f, be32(0x7f100000), 1000 + 20));
	CHECK(netf_addr_allowed(f, be32(0x7f100000 + NETF_MAX_LEARNED + 9), 1000 + 20));
	netf_free(f);
	CHECK(netf_new(&f) == 0);
	for (unsigned i = 0; i < NETF_MAX_CIDRS; i++)
		CHECK(netf_add_cidr(f, "10.9.9.9") == 0);
	CHECK(netf_add_cidr(f, "10.9.9.9") == -E2BIG);
	netf_free(f);
}

static void test_verdicts(void)
{
	uint8_t fr[2048], out[NETF_MAX_REPLY];
	struct netf_pkt p;
	struct netf *f;
	uint32_t len, n;

	cur_test = "verdicts";
	CHECK(netf_new(&f) == 0);
	/* blocked SYN: an RST+ACK back, from the address it went to */
	len = mk_syn(fr, GW, 8080);
	CHECK(netf_parse(fr, len, &p) == 0 && p.l4_ok && p.dport == 8080 && p.tcp_flags == 0x02);
	CHECK(netf_check(f, fr, len, &p, be32(DNSIP), 5) == NETF_REJECT);
	n = netf_build_reject(fr, len, &p, out, sizeof(out));
	CHECK(n == 54 && memcmp(out, GMAC, 6) == 0 && memcmp(out + 6, HMAC, 6) == 0);
	CHECK(get32(out + 26) == be32(GW) && get32(out + 30) == be32(GUEST));
	CHECK(out[34 + 13] == 0x14 && get32(out + 34 + 8) == be32(1001)); /* RST|ACK, ack = seq + 1 */
	CHECK(sum16(out + 14, 20, 0) == 0xffff);                                       /* IP checksum */
	{
		uint8_t ph[12];

		memcpy(ph, out + 26, 8);
		ph[8] = 0;
		ph[9] = 6;
		ph[10] = 0;
		ph[11] = 20;
		CHECK(sum16(out + 34, 20, sum16(ph, 12, 0)) == 0xffff); /* TCP checksum */
	}
	/* an RST is never answered */
	fr[14 + 20 + 13] = 0x04;
	CHECK(netf_parse(fr, len, &p) == 0 && netf_check(f, fr, len, &p, be32(DNSIP), 5) == NETF_DROP);
	/* allowed once learned, and only then */
	len = mk_syn(fr, GW, 8080);
	netf_parse(fr, len, &p);
	netf_learn(f, be32(GW), 5);
	CHECK(netf_check(f, fr, len, &p, be32(DNSIP), 6) == NETF_PASS);
	CHECK(netf_check(f, fr, len, &p, be32(DNSIP), 5 + NETF_TTL_S) == NETF_PASS); /* the frame at 6 kept it fresh */
	/* UDP to a blocked address: ICMP unreachable quoting it */
	{
		uint8_t u[12] = { 0x10, 0x00, 0x00, 0x7b, 0x00, 0x0c, 0, 0, 'p', 'i', 'n', 'g' };

		len = mk_ip(fr, 17, 0x7f000009, u, sizeof(u));
		CHECK(netf_parse(fr, len, &p) == 0 && netf_check(f, fr, len, &p, be32(DNSIP), 6) == NETF_REJECT);
		n = netf_build_reject(fr, len, &p, out, sizeof(out));
		CHECK(n == 14 + 20 + 8 + 28 && out[34] == 3 && out[35] == 13 && memcmp(out + 42, fr + 14, 28) == 0);
		CHECK(sum16(out + 34, n - 34, 0) == 0xffff);
	}
	/* DNS to the intercepted address, and the reply frame around an answer */
	len = mk_dns_frame(fr, "api.test");
	CHECK(netf_parse(fr, len, &p) == 0 && netf_check(f, fr, len, &p, be32(DNSIP), 6) == NETF_DNS);
	{
		uint8_t msg[4] = { 1, 2, 3, 4 };

		n = netf_build_udp_reply(fr, &p, msg, 4, out, sizeof(out));
		CHECK(n == 46 && out[34] == 0 && out[35] == 53 && out[36] == 0x9c && out[37] == 0x40);
		CHECK(get32(out + 26) == be32(DNSIP) && memcmp(out + 42, msg, 4) == 0);
		CHECK(netf_build_udp_reply(fr, &p, msg, 4, out, 45) == 0);
	}
	/* a fragment to the DNS address never reaches the backend */
	fr[14 + 6] = 0x20;
	CHECK(netf_parse(fr, len, &p) == 0 && netf_check(f, fr, len, &p, be32(DNSIP), 6) == NETF_DROP);
	/* IPv6 and unknown ethertypes drop, ARP passes */
	fr[12] = 0x86;
	fr[13] = 0xdd;
	CHECK(netf_parse(fr, len, &p) == 0 && netf_check(f, fr, len, &p, be32(DNSIP), 6) == NETF_DROP);
	fr[12] = 0x08;
	fr[13] = 0x06;
	CHECK(netf_parse(fr, len, &p) == 0 && netf_check(f, fr, len, &p, be32(DNSIP), 6) == NETF_PASS);
	/* IPv4 headers that lie about their lengths */
	len = mk_syn(fr, 0x7f000009, 80);
	fr[14] = 0x44;
	CHECK(netf_parse(fr, len, &p) == -EINVAL);
	fr[14] = 0x4f; /* IHL 60 > total 40 */
	CHECK(netf_parse(fr, len, &p) == -EINVAL);
	fr[14] = 0x45;
	fr[16] = 0x10; /* total length past the frame */
	CHECK(netf_parse(fr, len, &p) == -EINVAL);
	fr[16] = 0;
	fr[14 + 20 + 12] = 0xf0; /* TCP data offset 60 > segment */
	CHECK(netf_parse(fr, len, &p) == 0 && !p.l4_ok && netf_check(f, fr, len, &p, be32(DNSIP), 6) == NETF_DROP);
	CHECK(netf_build_reject(fr, len, &p, out, sizeof(out)) == 0);
	for (uint32_t l = 0; l < 54; l++) /* every truncation: parsed within bounds */
		if (netf_parse(fr, l, &p) == 0 && p.ethertype == NETF_ETH_IP4)
			CHECK(p.l4 + p.l4_len <= l);
	netf_free(f);
}

/* resolver_new's confine hook: runs on the resolver's own thread, and its failure is resolver_new's. */
static int confine_calls;
static pthread_t confine_thread;

static int confine_ok(void *arg)
{
	confine_calls++;
	confine_thread = pthread_self();
	return *(int *)arg;
}

static void test_resolver_confine(void)
{
	struct resolver *r = NULL;
	int want = 0;

	cur_test = "resolver confine";
	CHECK(resolver_new(&r, confine_ok, &want) == 0 && r);
	CHECK(confine_calls == 1 && !pthread_equal(confine_thread, pthread_self()));
	resolver_free(r);
	want = -EPERM;
	r = NULL;
	CHECK(resolver_new(&r, confine_ok, &want) == -EPERM && !r); /* the thread ended; nothing leaks (ASan) */
	CHECK(confine_calls == 2);
}

static void test_resolver(void)
{
	struct resolver *r;
	struct resolver_result res;
	struct pollfd pfd;
	int got = 0;

	cur_test = "resolver";
	CHECK(resolver_new(&r, NULL, NULL) == 0);
	CHECK(resolver_submit(r, "localhost", 7) == 0);
	CHECK(resolver_submit(r, "", 8) == -EINVAL);
	pfd.fd = resolver_fd(r);
	pfd.events = POLLIN;
	while (!got) {
		CHECK(poll(&pfd, 1, 30000) == 1);
		got = resolver_take(r, &res);
	}
	CHECK(res.cookie == 7 && res.rcode == DNS_NOERROR && res.n >= 1 && res.addrs[0] == be32(0x7f000001));
	for (unsigned i = 0; i < RESOLVER_QUEUE; i++)
		resolver_submit(r, "localhost", i);
	CHECK(resolver_submit(r, "localhost", 99) == -EAGAIN); /* finished lookups hold their slot until taken */
	resolver_free(r); /* with lookups queued: the thread finishes and frees */
}

int main(void)
{
	test_dns_parse();
	test_dns_match();
	test_table();
	test_verdicts();
	test_resolver();
	test_resolver_confine();
	printf("all net_filter tests passed\n");
	return 0;
}
