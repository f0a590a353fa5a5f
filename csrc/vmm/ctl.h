/* The VMM's control channel: line commands from the owner's socket and from a listening Unix socket. */
#ifndef SMOLVM_CTL_H
#define SMOLVM_CTL_H

#define CTL_MAX_CONNS 16 /* control connections at once (the owner's included) */

struct evloop;
struct ctl;
struct ctl_conn;

/*
 * A command line (without '\n') arrived on conn; answer with ctl_reply().
 * Runs on the loop thread.
 */
typedef void (*ctl_command_fn)(void *opaque, struct ctl_conn *conn, char *line);

/*
 * Serve owner_fd (the spawning process's end of a socketpair, may be -1) and,
 * if listen_path is set, a Unix socket there (created; a stale file is
 * replaced; unlinked by ctl_free). When the owner's end closes and the VM is
 * not detached, on_owner_gone(opaque) runs: the owner died or let go.
 * Returns 0 or -errno.
 */
int ctl_new(struct evloop *loop, int owner_fd, const char *listen_path, ctl_command_fn on_command,
	    void (*on_owner_gone)(void *opaque), void *opaque, struct ctl **out);
void ctl_free(struct ctl *c);

/* Answer one line on conn (a trailing '\n' is added). Best effort. */
void ctl_reply(struct ctl_conn *conn, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Tell the owner something (READY, EXIT ...) if it is still there. */
void ctl_notify(struct ctl *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* From now on the VM outlives its owner: owner EOF is no longer fatal. */
void ctl_detach(struct ctl *c);

#endif
