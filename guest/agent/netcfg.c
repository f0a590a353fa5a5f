/* eth0 by ioctl (no ip(8), no DHCP): address, netmask, MTU, up, default route; resolver and hosts files. */
#define _GNU_SOURCE
#include "netcfg.h"

#include <arpa/inet.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#define NETCFG_IF "eth0"

int netcfg_parse(const uint8_t *p, uint32_t len, struct netcfg *out)
{
	uint32_t hl;
	uint16_t mtu;

	if (len < sizeof(out->n))
		return -EINVAL;
	memcpy(&out->n, p, sizeof(out->n));
	hl = le32toh(out->n.hosts_len);
	mtu = le16toh(out->n.mtu);
	if (hl > SMOLVM_SETUP_MAX_HOSTS || len - sizeof(out->n) != hl || out->n.prefix < 1 || out->n.prefix > 30 ||
	    out->n.reserved || mtu < 68)
		return -EINVAL;
	memcpy(out->hosts, p + sizeof(out->n), hl);
	out->hosts[hl] = 0;
	if (strlen(out->hosts) != hl)
		return -EINVAL; /* a NUL inside */
	return 0;
}

static void netcfg_sin(struct sockaddr *sa, const uint8_t a[4])
{
	struct sockaddr_in *in = (struct sockaddr_in *)sa;

	memset(in, 0, sizeof(*in));
	in->sin_family = AF_INET;
	memcpy(&in->sin_addr, a, 4);
}

#define NETCFG_FAIL(what)                                          \
	do {                                                       \
		ret = -errno;                                      \
		snprintf(msg, cap, "%s: %s", what, strerror(errno)); \
		goto out;                                          \
	} while (0)

int netcfg_link(const struct netcfg *c, char *msg, size_t cap)
{
	struct ifreq ifr;
	struct rtentry rt;
	uint32_t mask = htonl(~0u << (32 - c->n.prefix));
	uint8_t zero[4] = { 0 };
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0), ret = 0;

	if (fd < 0)
		NETCFG_FAIL("socket");
	memset(&ifr, 0, sizeof(ifr));
	strcpy(ifr.ifr_name, NETCFG_IF);
	if (ioctl(fd, SIOCGIFFLAGS, &ifr) < 0)
		NETCFG_FAIL("no " NETCFG_IF " (the VM has no network device)");
	netcfg_sin(&ifr.ifr_addr, c->n.addr);
	if (ioctl(fd, SIOCSIFADDR, &ifr) < 0)
		NETCFG_FAIL("SIOCSIFADDR " NETCFG_IF);
	netcfg_sin(&ifr.ifr_netmask, (const uint8_t *)&mask);
	if (ioctl(fd, SIOCSIFNETMASK, &ifr) < 0)
		NETCFG_FAIL("SIOCSIFNETMASK " NETCFG_IF);
	ifr.ifr_mtu = le16toh(c->n.mtu);
	if (ioctl(fd, SIOCSIFMTU, &ifr) < 0)
		NETCFG_FAIL("SIOCSIFMTU " NETCFG_IF);
	if (ioctl(fd, SIOCGIFFLAGS, &ifr) < 0)
		NETCFG_FAIL("SIOCGIFFLAGS " NETCFG_IF);
	ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
	if (ioctl(fd, SIOCSIFFLAGS, &ifr) < 0)
		NETCFG_FAIL("SIOCSIFFLAGS " NETCFG_IF);
	memset(&rt, 0, sizeof(rt));
	netcfg_sin(&rt.rt_dst, zero);
	netcfg_sin(&rt.rt_genmask, zero);
	netcfg_sin(&rt.rt_gateway, c->n.gateway);
	rt.rt_flags = RTF_UP | RTF_GATEWAY;
	rt.rt_dev = (char *)NETCFG_IF;
	if (ioctl(fd, SIOCADDRT, &rt) < 0 && errno != EEXIST)
		NETCFG_FAIL("default route");
out:
	if (fd >= 0)
		close(fd);
	return ret;
}

/* Replace path with text (temporary file + rename, so a reader never sees half of it). */
static int netcfg_write(const char *path, const char *text, char *msg, size_t cap)
{
	char tmp[64];
	size_t len = strlen(text), off = 0;
	int fd, ret = 0;

	snprintf(tmp, sizeof(tmp), "%s.smolvm-tmp", path);
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		NETCFG_FAIL(path);
	while (off < len) {
		ssize_t n = write(fd, text + off, len - off);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			NETCFG_FAIL(path);
		off += (size_t)n;
	}
	if (fchmod(fd, 0644) < 0 || close(fd) < 0) {
		fd = -1;
		NETCFG_FAIL(path);
	}
	fd = -1;
	if (rename(tmp, path) < 0)
		NETCFG_FAIL(path);
out:
	if (fd >= 0)
		close(fd);
	if (ret)
		unlink(tmp);
	return ret;
}

int netcfg_files(const struct netcfg *c, const char *hostname, char *msg, size_t cap)
{
	static char hosts[SMOLVM_SETUP_MAX_HOSTS + 512];
	char dns[INET_ADDRSTRLEN], gw[INET_ADDRSTRLEN], resolv[64];
	int n, ret;

	inet_ntop(AF_INET, c->n.dns, dns, sizeof(dns));
	inet_ntop(AF_INET, c->n.gateway, gw, sizeof(gw));
	snprintf(resolv, sizeof(resolv), "nameserver %s\n", dns);
	mkdir("/etc", 0755);
	ret = netcfg_write("/etc/resolv.conf", resolv, msg, cap);
	if (ret)
		return ret;
	n = snprintf(hosts, sizeof(hosts), "127.0.0.1\tlocalhost\n127.0.1.1\t%s\n%s\thost.smolvm.internal\n%s%s",
		     hostname, gw, c->hosts, c->hosts[0] && c->hosts[strlen(c->hosts) - 1] != '\n' ? "\n" : "");
	if (n < 0 || (size_t)n >= sizeof(hosts)) {
		snprintf(msg, cap, "/etc/hosts: too long");
		return -E2BIG;
	}
	return netcfg_write("/etc/hosts", hosts, msg, cap);
}
