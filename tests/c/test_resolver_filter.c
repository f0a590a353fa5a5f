/* The resolver thread under its real seccomp filter (SYSFILTER_ROLE_RESOLVER): names from argv, "NAME=A.B.C.D" each. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>

#include "resolver.h"
#include "sysfilter.h"

static int confine(void *arg)
{
	struct sysfilter_params p = { SYSFILTER_KILL, -1, -1 }; /* a forbidden call kills this test */
	char err[200];
	int ret;

	(void)arg;
	ret = sysfilter_install(SYSFILTER_ROLE_RESOLVER, &p, err, sizeof(err));
	if (ret)
		fprintf(stderr, "%s\n", err);
	return ret;
}

int main(int argc, char **argv)
{
	struct resolver *r;
	int failed = 0;

	if (resolver_new(&r, confine, NULL) != 0)
		return 1;
	for (int i = 1; i < argc; i++) {
		char name[256], *want;
		struct resolver_result res;
		struct pollfd pfd = { resolver_fd(r), POLLIN, 0 };
		struct in_addr got = { 0 };
		int done = 0;

		snprintf(name, sizeof(name), "%s", argv[i]);
		want = strchr(name, '=');
		if (!want)
			return 2;
		*want++ = 0;
		if (resolver_submit(r, name, (uint64_t)i) != 0)
			return 1;
		while (!done) {
			if (poll(&pfd, 1, 30000) != 1)
				return 1;
			done = resolver_take(r, &res);
		}
		if (res.n)
			got.s_addr = res.addrs[0];
		printf("%s: rcode %d, %u addresses, first %s\n", name, res.rcode, res.n, inet_ntoa(got));
		failed |= res.cookie != (uint64_t)i || res.rcode != 0 || !res.n || strcmp(inet_ntoa(got), want);
	}
	resolver_free(r);
	if (failed)
		return 1;
	printf("all resolver_filter tests passed\n");
	return 0;
}
