/*
 * libFuzzer harness: the egress filter's parsers and reply builders (csrc/vmm/net_filter.c,
 * csrc/vmm/dns.c) as net.c drives them on a guest TX frame. Input: one byte of
 * policy choices, then the Ethernet frame the guest sends. Every verdict is
 * followed through: the refusal or, for a DNS query, the parse, the answer
 * and the UDP reply around it; replies must stay within their buffers and be
 * frames netf_parse accepts.
 */
#include "fuzz_common.h"

#include <arpa/inet.h>

#include "dns.h"
#include "net_filter.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static uint8_t frame[NETF_MAX_REPLY * 48];
	uint8_t out[NETF_MAX_REPLY], msg[DNS_MAX_REPLY];
	uint32_t len, n, addrs[DNS_MAX_ANSWERS];
	struct netf_pkt p, q;
	struct netf *f;
	uint8_t opt;

	if (size < 1 || size - 1 > sizeof(frame))
		return 0;
	opt = data[0];
	len = (uint32_t)(size - 1);
	memcpy(frame, data + 1, len);
	FUZZ_CHECK(netf_new(&f) == 0);
	if (opt & 1)
		FUZZ_CHECK(netf_add_cidr(f, "10.0.2.0/24") == 0);
	if (opt & 2)
		FUZZ_CHECK(netf_add_domain(f, "*.test") == 0 && netf_add_host(f, "a.test=10.0.2.2") == 0);
	if (opt & 4)
		netf_learn(f, htonl(0x0a000202), 0);
	for (unsigned i = 0; i < DNS_MAX_ANSWERS; i++)
		addrs[i] = htonl(0x7f000001 + i);
	if (netf_parse(frame, len, &p) == 0) {
		if (p.ethertype == NETF_ETH_IP4)
			FUZZ_CHECK(p.l3 + p.l3_len <= len && p.l4 + p.l4_len <= len);
		switch (netf_check(f, frame, len, &p, htonl(0x0a000203), 1)) {
		case NETF_REJECT:
			n = netf_build_reject(frame, len, &p, out, sizeof(out));
			FUZZ_CHECK(n <= sizeof(out));
			if (n)
				FUZZ_CHECK(netf_parse(out, n, &q) == 0 && q.l4_ok && q.dst == p.src);
			break;
		case NETF_DNS: {
			struct dns_query dq;

			FUZZ_CHECK(p.l4_ok && p.l4_len >= 8);
			if (dns_parse_query(frame + p.l4 + 8, p.l4_len - 8, &dq) == 0) {
				bool ok = dq.name_ok && netf_name_allowed(f, dq.name);
				uint32_t ml = dns_build_answer(&dq, ok ? DNS_NOERROR : DNS_NXDOMAIN, addrs, opt >> 4, 300, msg,
							       sizeof(msg));

				FUZZ_CHECK(ml > 0 && ml <= sizeof(msg));
				FUZZ_CHECK(strlen(dq.name) <= DNS_NAME_MAX);
				n = netf_build_udp_reply(frame, &p, msg, ml, out, sizeof(out));
				FUZZ_CHECK(n == ml + 42);
				FUZZ_CHECK(netf_parse(out, n, &q) == 0 && q.l4_ok && q.sport == 53);
			}
			break;
		}
		case NETF_PASS:
		case NETF_DROP: break;
		}
	}
	netf_free(f);
	return 0;
}
