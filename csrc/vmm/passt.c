/* passt as a child of the VMM: socketpair, posix_spawn with the socket as fd 3, reap on stop. */
#define _GNU_SOURCE
#include "passt.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PASST_CHILD_FD 3

extern char **environ;

int passt_start(char *const *argv, int argc, int *fd, pid_t *pid)
{
	posix_spawn_file_actions_t fa;
	char *args[PASST_MAX_ARGS + 3];
	char fdnum[] = "3";
	int sp[2] = { -1, -1 }, ret;

	*fd = -1;
	*pid = -1;
	if (argc < 1 || argc > PASST_MAX_ARGS)
		return -E2BIG;
	for (int i = 0; i < argc; i++)
		args[i] = argv[i];
	args[argc] = "--fd";
	args[argc + 1] = fdnum;
	args[argc + 2] = NULL;
	if (access(argv[0], X_OK) < 0)
		return -errno;
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp) < 0)
		return -errno;
	ret = posix_spawn_file_actions_init(&fa);
	if (ret) {
		ret = -ret;
		goto out;
	}
	/* dup2 onto PASST_CHILD_FD clears close-on-exec there (also when sp[1] is already 3) */
	ret = posix_spawn_file_actions_adddup2(&fa, sp[1], PASST_CHILD_FD);
	if (!ret)
		ret = posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
	if (!ret)
		ret = posix_spawn(pid, argv[0], &fa, NULL, args, environ);
	posix_spawn_file_actions_destroy(&fa);
	if (ret) {
		*pid = -1;
		ret = -ret;
		goto out;
	}
	if (fcntl(sp[0], F_SETFL, fcntl(sp[0], F_GETFL) | O_NONBLOCK) < 0) {
		ret = -errno;
		passt_stop(*pid);
		*pid = -1;
		goto out;
	}
	*fd = sp[0];
	sp[0] = -1;
out:
	if (sp[0] >= 0)
		close(sp[0]);
	close(sp[1]);
	return ret;
}

void passt_stop(pid_t pid)
{
	struct timespec ms10 = { 0, 10 * 1000 * 1000 };

	if (pid <= 0)
		return;
	kill(pid, SIGTERM);
	for (int i = 0; i < 100; i++) {
		pid_t r = waitpid(pid, NULL, WNOHANG);

		if (r == pid || (r < 0 && errno != EINTR))
			return;
		nanosleep(&ms10, NULL);
	}
	if (kill(pid, SIGKILL) == 0)
		waitpid(pid, NULL, 0);
	/* else EPERM: a jailed VMM (no CAP_KILL) cannot signal passt, which switched to nobody; it
	 * ends on its socket's EOF, and whoever inherits it reaps it. Never wait for it forever. */
}
