/* A fake evloop.h for device tests and fuzz harnesses: poll() over the watches, run inline or on a thread. */
#ifndef SMOLVM_FAKE_LOOP_H
#define SMOLVM_FAKE_LOOP_H

#include "evloop.h"

/*
 * fake_loop.c defines evloop_new/free/add/mod/del/run/stop (up to FAKE_LOOP_MAX
 * watches): link it instead of csrc/vmm/evloop.c. evloop_run() polls in rounds
 * of 10 ms until evloop_stop(). No locking: only evloop_stop() may be called
 * from another thread than the one running the loop.
 */
#define FAKE_LOOP_MAX 512

/* One poll() round of up to timeout_ms; callbacks of watches deleted meanwhile are skipped. Returns how many ran. */
int fake_loop_once(struct evloop *l, int timeout_ms);

/* Rounds that do not wait, until one runs no callback (at most `rounds`). */
void fake_loop_settle(struct evloop *l, int rounds);

/* Watches registered now (0 once every device let go of the loop). */
int fake_loop_watches(struct evloop *l);

#endif
