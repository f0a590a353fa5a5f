/* getaddrinfo on a thread of its own, so a slow host resolver never stalls the VM's event loop. */
#define _GNU_SOURCE
#include "resolver.h"

#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

enum { RESOLVER_FREE, RESOLVER_WAITING, RESOLVER_BUSY, RESOLVER_DONE };

struct resolver_slot {
	int state;
	char name[DNS_NAME_MAX + 1];
	struct resolver_result res;
};

struct resolver {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	int refs; /* the owner and the thread */
	bool stop;
	resolver_confine_fn *confine; /* run by the thread before anything else */
	void *confine_arg;
	int started; /* 0 until the thread ran confine, then 1 (ready) or -errno (it ended) */
	int efd;
	struct resolver_slot slots[RESOLVER_QUEUE];
};

static void resolver_unref(struct resolver *r)
{
	int left;

	pthread_mutex_lock(&r->lock);
	left = --r->refs;
	pthread_mutex_unlock(&r->lock);
	if (left)
		return;
	if (r->efd >= 0)
		close(r->efd);
	pthread_cond_destroy(&r->cond);
	pthread_mutex_destroy(&r->lock);
	free(r);
}

static void resolver_lookup(const char *name, struct resolver_result *res)
{
	struct addrinfo hints = { .ai_family = AF_INET, .ai_socktype = SOCK_STREAM }, *ai = NULL;
	int e = getaddrinfo(name, NULL, &hints, &ai);

	res->n = 0;
	if (e == EAI_NONAME || e == EAI_NODATA || e == EAI_ADDRFAMILY) {
		res->rcode = e == EAI_NONAME ? DNS_NXDOMAIN : DNS_NOERROR;
		return;
	}
	if (e) {
		res->rcode = DNS_SERVFAIL;
		return;
	}
	res->rcode = DNS_NOERROR;
	for (struct addrinfo *a = ai; a && res->n < DNS_MAX_ANSWERS; a = a->ai_next) {
		uint32_t ip;
		bool dup = false;

		if (a->ai_family != AF_INET || a->ai_addrlen < sizeof(struct sockaddr_in))
			continue;
		ip = ((const struct sockaddr_in *)a->ai_addr)->sin_addr.s_addr;
		for (unsigned i = 0; i < res->n; i++)
			dup |= res->addrs[i] == ip;
		if (!dup)
			res->addrs[res->n++] = ip;
	}
	freeaddrinfo(ai);
}

static void *resolver_main(void *arg)
{
	struct resolver *r = arg;
	int ret;

	pthread_setname_np(pthread_self(), "smolvm-dns"); /* prctl: before the filter */
	ret = r->confine ? r->confine(r->confine_arg) : 0;

	pthread_mutex_lock(&r->lock);
	r->started = ret ? ret : 1;
	pthread_cond_broadcast(&r->cond);
	while (!ret && !r->stop) {
		struct resolver_slot *s = NULL;
		char name[DNS_NAME_MAX + 1];
		struct resolver_result res;
		uint64_t one = 1;

		for (unsigned i = 0; i < RESOLVER_QUEUE && !s; i++)
			if (r->slots[i].state == RESOLVER_WAITING)
				s = &r->slots[i];
		if (!s) {
			pthread_cond_wait(&r->cond, &r->lock);
			continue;
		}
		s->state = RESOLVER_BUSY;
		memcpy(name, s->name, sizeof(name));
		res = s->res;
		pthread_mutex_unlock(&r->lock);
		resolver_lookup(name, &res);
		pthread_mutex_lock(&r->lock);
		s->res = res;
		s->state = RESOLVER_DONE;
		if (!r->stop && write(r->efd, &one, sizeof(one)) < 0) {
			/* saturated: the owner will read anyway */
		}
	}
	pthread_mutex_unlock(&r->lock);
	resolver_unref(r);
	return NULL;
}

int resolver_new(struct resolver **out, resolver_confine_fn *confine, void *arg)
{
	struct resolver *r;
	pthread_attr_t attr;
	pthread_t t;
	sigset_t all, old;
	int err;

	*out = NULL;
	r = calloc(1, sizeof(*r));
	if (!r)
		return -ENOMEM;
	r->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (r->efd < 0) {
		err = -errno;
		free(r);
		return err;
	}
	pthread_mutex_init(&r->lock, NULL);
	pthread_cond_init(&r->cond, NULL);
	r->refs = 2;
	r->confine = confine;
	r->confine_arg = arg;
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, &old); /* signals stay with the VMM's own threads */
	err = -pthread_create(&t, &attr, resolver_main, r);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	pthread_attr_destroy(&attr);
	if (err) {
		r->refs = 1;
		resolver_unref(r);
		return err;
	}
	pthread_mutex_lock(&r->lock);
	while (!r->started)
		pthread_cond_wait(&r->cond, &r->lock);
	err = r->started < 0 ? r->started : 0;
	pthread_mutex_unlock(&r->lock);
	if (err) {
		resolver_unref(r); /* the thread ended and dropped its reference */
		return err;
	}
	*out = r;
	return 0;
}

int resolver_fd(const struct resolver *r)
{
	return r->efd;
}

int resolver_submit(struct resolver *r, const char *name, uint64_t cookie)
{
	size_t len = strlen(name);
	int ret = -EAGAIN;

	if (len == 0 || len > DNS_NAME_MAX)
		return -EINVAL;
	pthread_mutex_lock(&r->lock);
	for (unsigned i = 0; i < RESOLVER_QUEUE; i++) {
		struct resolver_slot *s = &r->slots[i];

		if (s->state != RESOLVER_FREE)
			continue;
		memcpy(s->name, name, len + 1);
		memset(&s->res, 0, sizeof(s->res));
		s->res.cookie = cookie;
		s->state = RESOLVER_WAITING;
		pthread_cond_signal(&r->cond);
		ret = 0;
		break;
	}
	pthread_mutex_unlock(&r->lock);
	return ret;
}

int resolver_take(struct resolver *r, struct resolver_result *res)
{
	uint64_t cnt;
	int got = 0;

	if (read(r->efd, &cnt, sizeof(cnt)) < 0) {
		/* nothing signalled: results may still wait from an earlier wake-up */
	}
	pthread_mutex_lock(&r->lock);
	for (unsigned i = 0; i < RESOLVER_QUEUE; i++)
		if (r->slots[i].state == RESOLVER_DONE) {
			*res = r->slots[i].res;
			r->slots[i].state = RESOLVER_FREE;
			got = 1;
			break;
		}
	pthread_mutex_unlock(&r->lock);
	return got;
}

void resolver_free(struct resolver *r)
{
	if (!r)
		return;
	pthread_mutex_lock(&r->lock);
	r->stop = true;
	pthread_cond_signal(&r->cond);
	pthread_mutex_unlock(&r->lock);
	resolver_unref(r);
}
