/* Host side of file transfers: PUT a local file into the guest, GET a guest file, each on an agent connection of its own (agent_conn.h). */
#ifndef SMOLVM_FILE_CLIENT_H
#define SMOLVM_FILE_CLIENT_H

#include <stdint.h>

/* Payload bytes per DATA frame sent by file_put(). */
#define FILE_CLIENT_CHUNK (512u << 10)

/* Which side a failure is about. */
enum file_origin {
	FILE_ORIGIN_NONE,      /* success */
	FILE_ORIGIN_LOCAL,     /* the local file: reading, writing, not a regular file, changed size */
	FILE_ORIGIN_GUEST,     /* the agent answered ERROR: guest_err and error[] say what */
	FILE_ORIGIN_TRANSPORT, /* the connection: refused, reset, timed out, interrupted, bad frames */
};

struct file_result {
	uint64_t size;   /* bytes sent (put) or received (get) */
	uint32_t mode;   /* get: the guest file's st_mode */
	enum file_origin origin;
	int guest_err;   /* FILE_ORIGIN_GUEST: the agent's errno, 0 when it named none */
	int guest_code;  /* FILE_ORIGIN_GUEST: what it is about (enum smolvm_error_code) */
	char error[256]; /* NUL-terminated message when the return is nonzero */
};

/*
 * Upload: send PUT for guest_path (absolute) with the permission bits mode,
 * wait for READY, stream the regular file open at local_fd (read from its
 * current offset to the size fstat() gives now) in DATA frames, then wait
 * for EXIT. The agent writes a temporary file beside guest_path and renames
 * it into place, so a failed or cut upload leaves no file behind.
 * Connection, deadline and interrupted() as exec_run() (exec_client.h).
 * Returns 0, or -errno with res->origin and res->error set:
 *   FILE_ORIGIN_GUEST: -guest_err (-ENOENT: no such folder, -EISDIR, -ENOSPC, ...),
 *                      or -EPROTO when the agent named no errno
 *   FILE_ORIGIN_LOCAL: -EISDIR / -EINVAL (not a regular file), -EIO (it shrank), read errors
 *   FILE_ORIGIN_TRANSPORT: as exec_run()
 * local_fd stays open (the caller's).
 */
int file_put(const char *uds_path, uint32_t port, int local_fd, const char *guest_path, uint32_t mode,
	     int host_timeout_ms, int (*interrupted)(void *), void *opaque, struct file_result *res);

/*
 * Download: send GET for guest_path (absolute), expect READY with the size
 * and st_mode, write exactly that many bytes of DATA to local_fd (at its
 * current offset), then expect EXIT. Returns and errors as file_put();
 * FILE_ORIGIN_LOCAL means a write to local_fd failed (e.g. -ENOSPC). On
 * failure local_fd holds whatever arrived; the caller discards it.
 */
int file_get(const char *uds_path, uint32_t port, const char *guest_path, int local_fd, int host_timeout_ms,
	     int (*interrupted)(void *), void *opaque, struct file_result *res);

#endif
