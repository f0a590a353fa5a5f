/* The VMM's single io_uring (liburing) event loop: fd readiness callbacks run on the loop thread. */
#ifndef SMOLVM_EVLOOP_H
#define SMOLVM_EVLOOP_H

#include <stdint.h>

struct evloop;

/* Called on the loop thread with the poll bits that fired (POLLIN, POLLOUT, POLLHUP, POLLERR). */
typedef void (*evloop_cb)(void *opaque, int fd, uint32_t revents);

/* Create a loop. Returns 0 or -errno. */
int evloop_new(struct evloop **out);
void evloop_free(struct evloop *l);

/*
 * Watch fd for `events` (POLLIN and/or POLLOUT). The watch stays armed until
 * evloop_del(): after each callback it is re-armed with the current mask.
 * Loop thread only (or before evloop_run). Returns 0 or -errno.
 */
int evloop_add(struct evloop *l, int fd, uint32_t events, evloop_cb cb, void *opaque);
/* Change the mask of a watched fd (0 = pause). Loop thread only. */
int evloop_mod(struct evloop *l, int fd, uint32_t events);
/* Stop watching fd; its callback is not called again. The caller closes fd. */
int evloop_del(struct evloop *l, int fd);

/* Run callbacks until evloop_stop(). Returns 0 or -errno. */
int evloop_run(struct evloop *l);
/* Make evloop_run() return; safe from any thread and from signal handlers. */
void evloop_stop(struct evloop *l);

#endif
