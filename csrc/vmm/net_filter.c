/* Egress policy for a filtered NIC: bounds-checked header parsing, the allow table and the frames the VMM answers with. */
#define _GNU_SOURCE
#include "net_filter.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dns.h"

struct netf_cidr {
	uint32_t net, mask; /* host order */
};

struct netf_host {
	char name[DNS_NAME_MAX + 1];
	uint32_t ip; /* network order */
};

struct netf_learned {
	uint32_t ip; /* network order; 0 = free */
	uint64_t until_s;
};

struct netf {
	unsigned nr_domains, nr_cidrs, nr_hosts;
	char *domains[NETF_MAX_DOMAINS];
	struct netf_cidr cidrs[NETF_MAX_CIDRS];
	struct netf_host hosts[NETF_MAX_HOSTS];
	struct netf_learned learned[NETF_MAX_LEARNED];
	unsigned last; /* learned[] index of the last hit */
};

static uint16_t netf_get16(const uint8_t *p)
{
	return (uint16_t)(p[0] << 8 | p[1]);
}

static uint32_t netf_get32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void netf_put16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)(v >> 8);
	p[1] = (uint8_t)v;
}

static void netf_put32(uint8_t *p, uint32_t v)
{
	netf_put16(p, (uint16_t)(v >> 16));
	netf_put16(p + 2, (uint16_t)v);
}

/* ---- parsing ---- */

int netf_parse(const uint8_t *frame, uint32_t len, struct netf_pkt *p)
{
	const uint8_t *ip;
	uint32_t ihl, total, frag;

	memset(p, 0, sizeof(*p));
	if (len < NETF_ETH_HLEN)
		return -EINVAL;
	p->ethertype = netf_get16(frame + 12);
	if (p->ethertype != NETF_ETH_IP4)
		return 0;
	p->l3 = NETF_ETH_HLEN;
	if (len - p->l3 < 20)
		return -EINVAL;
	ip = frame + p->l3;
	ihl = (uint32_t)(ip[0] & 0xf) * 4;
	total = netf_get16(ip + 2);
	if ((ip[0] >> 4) != 4 || ihl < 20 || total < ihl || total > len - p->l3)
		return -EINVAL;
	p->l3_len = ihl;
	p->proto = ip[9];
	memcpy(&p->src, ip + 12, 4);
	memcpy(&p->dst, ip + 16, 4);
	frag = netf_get16(ip + 6);
	p->more_frags = frag & 0x2000;
	p->first_frag = (frag & 0x1fff) == 0;
	p->l4 = p->l3 + ihl;
	p->l4_len = total - ihl;
	if (!p->first_frag)
		return 0;
	if (p->proto == 6 && p->l4_len >= 20) {
		const uint8_t *t = frame + p->l4;

		p->tcp_hlen = (uint32_t)(t[12] >> 4) * 4;
		if (p->tcp_hlen < 20 || p->tcp_hlen > p->l4_len)
			return 0; /* l4_ok stays false: such a frame is refused, never answered */
		p->sport = netf_get16(t);
		p->dport = netf_get16(t + 2);
		p->seq = netf_get32(t + 4);
		p->ack = netf_get32(t + 8);
		p->tcp_flags = t[13];
		p->l4_ok = true;
	} else if (p->proto == 17 && p->l4_len >= 8) {
		const uint8_t *u = frame + p->l4;
		uint16_t ulen = netf_get16(u + 4);

		if (ulen < 8 || ulen > p->l4_len)
			return 0;
		p->sport = netf_get16(u);
		p->dport = netf_get16(u + 2);
		p->l4_len = ulen; /* the datagram, without IP padding */
		p->l4_ok = true;
	} else if (p->proto == 1 && p->l4_len >= 8) {
		p->l4_ok = true;
	}
	return 0;
}

/* ---- the table ---- */

int netf_new(struct netf **out)
{
	*out = calloc(1, sizeof(**out));
	return *out ? 0 : -ENOMEM;
}

void netf_free(struct netf *f)
{
	if (!f)
		return;
	for (unsigned i = 0; i < f->nr_domains; i++)
		free(f->domains[i]);
	free(f);
}

int netf_add_domain(struct netf *f, const char *pattern)
{
	char *copy;

	if (!dns_pattern_valid(pattern))
		return -EINVAL;
	if (f->nr_domains >= NETF_MAX_DOMAINS)
		return -E2BIG;
	copy = strdup(pattern);
	if (!copy)
		return -ENOMEM;
	for (char *c = copy; *c; c++)
		if (*c >= 'A' && *c <= 'Z')
			*c = (char)(*c + 32);
	f->domains[f->nr_domains++] = copy;
	return 0;
}

/* "a.b.c.d" strictly (inet_pton) into *ip, network order. */
static int netf_parse_ip(const char *s, size_t n, uint32_t *ip)
{
	char buf[16];
	struct in_addr a;

	if (n == 0 || n >= sizeof(buf))
		return -EINVAL;
	memcpy(buf, s, n);
	buf[n] = 0;
	if (inet_pton(AF_INET, buf, &a) != 1)
		return -EINVAL;
	*ip = a.s_addr;
	return 0;
}

int netf_add_cidr(struct netf *f, const char *cidr)
{
	const char *slash = strchr(cidr, '/');
	unsigned long bits = 32;
	uint32_t ip, mask;

	if (netf_parse_ip(cidr, slash ? (size_t)(slash - cidr) : strlen(cidr), &ip))
		return -EINVAL;
	if (slash) {
		char *end;

		if (slash[1] < '0' || slash[1] > '9')
			return -EINVAL;
		bits = strtoul(slash + 1, &end, 10);
		if (*end || bits > 32 || end - slash > 3)
			return -EINVAL;
	}
	mask = bits ? ~0u << (32 - bits) : 0;
	if (f->nr_cidrs >= NETF_MAX_CIDRS)
		return -E2BIG;
	f->cidrs[f->nr_cidrs].net = ntohl(ip) & mask;
	f->cidrs[f->nr_cidrs].mask = mask;
	f->nr_cidrs++;
	return 0;
}

int netf_add_host(struct netf *f, const char *name_eq_ip)
{
	const char *eq = strchr(name_eq_ip, '=');
	size_t nl;
	struct netf_host *h;

	if (!eq)
		return -EINVAL;
	nl = (size_t)(eq - name_eq_ip);
	if (nl == 0 || nl > DNS_NAME_MAX || name_eq_ip[0] == '*')
		return -EINVAL;
	if (f->nr_hosts >= NETF_MAX_HOSTS)
		return -E2BIG;
	h = &f->hosts[f->nr_hosts];
	memcpy(h->name, name_eq_ip, nl);
	h->name[nl] = 0;
	if (!dns_pattern_valid(h->name) || netf_parse_ip(eq + 1, strlen(eq + 1), &h->ip))
		return -EINVAL;
	for (char *c = h->name; *c; c++)
		if (*c >= 'A' && *c <= 'Z')
			*c = (char)(*c + 32);
	f->nr_hosts++;
	return 0;
}

bool netf_name_allowed(const struct netf *f, const char *name)
{
	for (unsigned i = 0; i < f->nr_domains; i++)
		if (dns_name_match(f->domains[i], name))
			return true;
	return false;
}

bool netf_host_lookup(const struct netf *f, const char *name, uint32_t *ip)
{
	for (unsigned i = 0; i < f->nr_hosts; i++)
		if (strcmp(f->hosts[i].name, name) == 0) {
			*ip = f->hosts[i].ip;
			return true;
		}
	return false;
}

void netf_learn(struct netf *f, uint32_t ip, uint64_t now_s)
{
	unsigned victim = 0;

	if (ip == 0)
		return;

	for (unsigned i = 0; i < NETF_MAX_LEARNED; i++) {
		if (f->learned[i].ip == ip && ip) {
			if (f->learned[i].until_s < now_s + NETF_TTL_S)
				f->learned[i].until_s = now_s + NETF_TTL_S;
			return;
		}
		if (f->learned[i].until_s < f->learned[victim].until_s)
			victim = i; /* free slots have until_s 0 and win */
	}
	f->learned[victim].ip = ip;
	f->learned[victim].until_s = now_s + NETF_TTL_S;
}

bool netf_addr_allowed(struct netf *f, uint32_t ip, uint64_t now_s)
{
	uint32_t h = ntohl(ip);
	struct netf_learned *l = &f->learned[f->last];

	for (unsigned i = 0; i < f->nr_cidrs; i++)
		if ((h & f->cidrs[i].mask) == f->cidrs[i].net)
			return true;
	if (ip == 0)
		return false;
	if (l->ip == ip && l->until_s > now_s)
		return true;
	for (unsigned i = 0; i < NETF_MAX_LEARNED; i++)
		if (f->learned[i].ip == ip && f->learned[i].until_s > now_s) {
			f->last = i;
			return true;
		}
	return false;
}

/* Traffic to a learned address keeps it: a download longer than the TTL is not cut off. */
static void netf_touch(struct netf *f, uint32_t ip, uint64_t now_s)
{
	struct netf_learned *l = &f->learned[f->last];

	if (l->ip == ip && l->until_s > now_s && l->until_s < now_s + NETF_TTL_S)
		l->until_s = now_s + NETF_TTL_S;
}

enum netf_verdict netf_check(struct netf *f, const uint8_t *frame, uint32_t len, const struct netf_pkt *p,
			     uint32_t dns_ip, uint64_t now_s)
{
	(void)frame;
	(void)len;
	if (p->ethertype == NETF_ETH_ARP)
		return NETF_PASS;
	if (p->ethertype != NETF_ETH_IP4)
		return NETF_DROP;
	if (p->dst == dns_ip && p->proto == 17 && (!p->first_frag || p->more_frags || !p->l4_ok))
		return NETF_DROP; /* a fragment or broken datagram to the DNS address: never to the backend */
	if (p->dst == dns_ip && p->proto == 17 && p->dport == 53)
		return NETF_DNS;
	if (netf_addr_allowed(f, p->dst, now_s)) {
		netf_touch(f, p->dst, now_s);
		return NETF_PASS;
	}
	if (!p->first_frag || !p->l4_ok)
		return NETF_DROP;
	if (p->proto == 6 && !(p->tcp_flags & 0x04))
		return NETF_REJECT;
	if (p->proto == 17)
		return NETF_REJECT;
	if (p->proto == 1 && frame[p->l4] == 8)
		return NETF_REJECT; /* echo request; never an error about an error */
	return NETF_DROP;
}

/* ---- replies ---- */

static uint32_t netf_sum(const uint8_t *p, uint32_t len, uint32_t sum)
{
	for (uint32_t i = 0; i + 1 < len; i += 2)
		sum += (uint32_t)p[i] << 8 | p[i + 1];
	if (len & 1)
		sum += (uint32_t)p[len - 1] << 8;
	return sum;
}

static uint16_t netf_fold(uint32_t sum)
{
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)~sum;
}

/* Ethernet (MACs swapped) and a 20-byte IPv4 header from p->dst to p->src; payload length l4len. Returns 34. */
static uint32_t netf_put_l3(const uint8_t *frame, const struct netf_pkt *p, uint8_t proto, uint32_t l4len,
			    uint8_t *out)
{
	uint8_t *ip = out + NETF_ETH_HLEN;

	memcpy(out, frame + 6, 6);
	memcpy(out + 6, frame, 6);
	netf_put16(out + 12, NETF_ETH_IP4);
	memset(ip, 0, 20);
	ip[0] = 0x45;
	netf_put16(ip + 2, (uint16_t)(20 + l4len));
	netf_put16(ip + 6, 0x4000); /* DF */
	ip[8] = 64;
	ip[9] = proto;
	memcpy(ip + 12, &p->dst, 4);
	memcpy(ip + 16, &p->src, 4);
	netf_put16(ip + 10, netf_fold(netf_sum(ip, 20, 0)));
	return NETF_ETH_HLEN + 20;
}

/* The TCP/UDP pseudo-header sum for a reply of l4len bytes. */
static uint32_t netf_pseudo(const struct netf_pkt *p, uint8_t proto, uint32_t l4len)
{
	uint8_t ph[12];

	memcpy(ph, &p->dst, 4);
	memcpy(ph + 4, &p->src, 4);
	ph[8] = 0;
	ph[9] = proto;
	netf_put16(ph + 10, (uint16_t)l4len);
	return netf_sum(ph, 12, 0);
}

uint32_t netf_build_reject(const uint8_t *frame, uint32_t len, const struct netf_pkt *p, uint8_t *out, uint32_t cap)
{
	uint32_t off;

	if (p->ethertype != NETF_ETH_IP4 || !p->l4_ok || p->l4 > len || cap < NETF_MAX_REPLY)
		return 0;
	if (p->proto == 6) {
		uint8_t *t = out + NETF_ETH_HLEN + 20;
		uint32_t seglen = p->l4_len - p->tcp_hlen;

		if (p->tcp_flags & 0x04)
			return 0;
		off = netf_put_l3(frame, p, 6, 20, out);
		memset(t, 0, 20);
		netf_put16(t, p->dport);
		netf_put16(t + 2, p->sport);
		if (p->tcp_flags & 0x10) { /* ACK: RST with seq = their ack */
			netf_put32(t + 4, p->ack);
			t[13] = 0x04;
		} else {
			seglen += (p->tcp_flags & 0x02 ? 1u : 0u) + (p->tcp_flags & 0x01 ? 1u : 0u);
			netf_put32(t + 8, p->seq + seglen);
			t[13] = 0x14; /* RST, ACK */
		}
		t[12] = 5 << 4;
		netf_put16(t + 16, netf_fold(netf_sum(t, 20, netf_pseudo(p, 6, 20))));
		return off + 20;
	}
	if (p->proto == 17 || p->proto == 1) {
		uint8_t *ic = out + NETF_ETH_HLEN + 20;
		uint32_t quote = p->l3_len + 8; /* the offending IP header and 8 bytes of its payload */

		if (quote > len - p->l3 || NETF_ETH_HLEN + 20 + 8 + quote > cap)
			return 0;
		off = netf_put_l3(frame, p, 1, 8 + quote, out);
		memset(ic, 0, 8);
		ic[0] = 3;  /* destination unreachable */
		ic[1] = 13; /* communication administratively prohibited */
		memcpy(ic + 8, frame + p->l3, quote);
		netf_put16(ic + 2, netf_fold(netf_sum(ic, 8 + quote, 0)));
		return off + 8 + quote;
	}
	return 0;
}

uint32_t netf_build_udp_reply(const uint8_t *frame, const struct netf_pkt *p, const uint8_t *payload, uint32_t plen,
			      uint8_t *out, uint32_t cap)
{
	uint8_t *u = out + NETF_ETH_HLEN + 20;
	uint32_t off;
	uint16_t c;

	if (plen > cap || cap - plen < NETF_ETH_HLEN + 20 + 8 || plen > 0xffff - 28)
		return 0;
	off = netf_put_l3(frame, p, 17, 8 + plen, out);
	netf_put16(u, p->dport);
	netf_put16(u + 2, p->sport);
	netf_put16(u + 4, (uint16_t)(8 + plen));
	netf_put16(u + 6, 0);
	memcpy(u + 8, payload, plen);
	c = netf_fold(netf_sum(u, 8 + plen, netf_pseudo(p, 17, 8 + plen)));
	netf_put16(u + 6, c ? c : 0xffff);
	return off + 8 + plen;
}
