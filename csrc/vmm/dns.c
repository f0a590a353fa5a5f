/* DNS: bounds-checked parsing of the guest's queries and the answers the VMM writes back. */
#include "dns.h"

#include <errno.h>
#include <string.h>

static bool dns_label_char(uint8_t c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_';
}

static uint8_t dns_lower(uint8_t c)
{
	return c >= 'A' && c <= 'Z' ? (uint8_t)(c + 32) : c;
}

static uint16_t dns_get16(const uint8_t *p)
{
	return (uint16_t)(p[0] << 8 | p[1]);
}

static void dns_put16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)(v >> 8);
	p[1] = (uint8_t)v;
}

int dns_parse_query(const uint8_t *p, uint32_t len, struct dns_query *q)
{
	uint32_t off = DNS_HDR, text = 0;

	memset(q, 0, sizeof(*q));
	if (len < DNS_HDR)
		return -EINVAL;
	if ((p[2] & 0x80) || (p[2] & 0x78) || dns_get16(p + 4) != 1 || dns_get16(p + 6) || dns_get16(p + 8))
		return -EINVAL; /* a response, not a standard query, or not one question */
	q->id = dns_get16(p);
	q->rd = p[2] & 1;
	q->name_ok = true;
	for (;;) {
		uint8_t l;

		if (off >= len)
			return -EINVAL;
		l = p[off];
		if (l == 0)
			break;
		if (l > 63)
			return -EINVAL; /* a compression pointer or a reserved label type: queries need neither */
		if (l > len - off - 1 || off + 1 + l - DNS_HDR + 1 > DNS_QNAME_MAX)
			return -EINVAL;
		if (text) {
			if (text >= DNS_NAME_MAX)
				return -EINVAL;
			q->name[text++] = '.';
		}
		for (uint8_t i = 0; i < l; i++) {
			uint8_t c = p[off + 1 + i];

			if (!dns_label_char(c))
				q->name_ok = false;
			if (text >= DNS_NAME_MAX)
				return -EINVAL;
			q->name[text++] = (char)(dns_label_char(c) ? dns_lower(c) : '?');
		}
		off += 1u + l;
	}
	off++; /* the root label */
	q->qname_len = off - DNS_HDR;
	if (q->qname_len > DNS_QNAME_MAX || len - off < 4)
		return -EINVAL;
	memcpy(q->qname, p + DNS_HDR, q->qname_len);
	q->name[text] = 0;
	q->qtype = dns_get16(p + off);
	q->qclass = dns_get16(p + off + 2);
	return 0;
}

uint32_t dns_build_answer(const struct dns_query *q, int rcode, const uint32_t *addrs, unsigned n, uint32_t ttl,
			  uint8_t *out, uint32_t cap)
{
	uint32_t off, need;

	if (rcode != DNS_NOERROR || n > DNS_MAX_ANSWERS)
		n = rcode == DNS_NOERROR ? DNS_MAX_ANSWERS : 0;
	need = DNS_HDR + q->qname_len + 4 + n * 16u;
	if (q->qname_len > DNS_QNAME_MAX || need > cap)
		return 0;
	dns_put16(out, q->id);
	out[2] = (uint8_t)(0x80 | 0x04 | (q->rd ? 1 : 0)); /* QR, AA, RD echoed */
	out[3] = (uint8_t)(0x80 | (rcode & 0xf));          /* RA, rcode */
	dns_put16(out + 4, 1);
	dns_put16(out + 6, (uint16_t)n);
	dns_put16(out + 8, 0);
	dns_put16(out + 10, 0);
	memcpy(out + DNS_HDR, q->qname, q->qname_len);
	off = DNS_HDR + q->qname_len;
	dns_put16(out + off, q->qtype);
	dns_put16(out + off + 2, q->qclass);
	off += 4;
	for (unsigned i = 0; i < n; i++) {
		dns_put16(out + off, 0xc000 | DNS_HDR); /* the question's name */
		dns_put16(out + off + 2, DNS_TYPE_A);
		dns_put16(out + off + 4, DNS_CLASS_IN);
		dns_put16(out + off + 6, (uint16_t)(ttl >> 16));
		dns_put16(out + off + 8, (uint16_t)ttl);
		dns_put16(out + off + 10, 4);
		memcpy(out + off + 12, &addrs[i], 4);
		off += 16;
	}
	return off;
}

static bool dns_ieq(const char *a, const char *b)
{
	for (; *a && *b; a++, b++)
		if (dns_lower((uint8_t)*a) != dns_lower((uint8_t)*b))
			return false;
	return *a == *b;
}

bool dns_name_match(const char *pattern, const char *name)
{
	size_t pl, nl;

	if (pattern[0] == '*' && pattern[1] == '.') {
		pl = strlen(pattern + 1); /* ".example.org" */
		nl = strlen(name);
		return nl > pl && dns_ieq(pattern + 1, name + nl - pl) && name[nl - pl - 1] != '.';
	}
	return dns_ieq(pattern, name);
}

bool dns_pattern_valid(const char *s)
{
	size_t len, label = 0;

	if (s[0] == '*' && s[1] == '.')
		s += 2;
	len = strlen(s);
	if (len == 0 || len > DNS_NAME_MAX)
		return false;
	for (size_t i = 0; i <= len; i++) {
		if (s[i] == '.' || s[i] == 0) {
			if (label == 0 || label > 63 || s[i - 1] == '-' || s[i - label] == '-')
				return false;
			label = 0;
		} else if (!dns_label_char((uint8_t)s[i])) {
			return false;
		} else {
			label++;
		}
	}
	return true;
}
