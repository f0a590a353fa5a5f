/* Leaving the spawner at once (smolvm-vmm and smolvm-vmm-relay --daemonize): header-only, shared by both. */
#ifndef SMOLVM_DAEMONIZE_H
#define SMOLVM_DAEMONIZE_H

#include <sys/types.h>
#include <unistd.h>

/*
 * Fork; the parent exits at once (status 0) so the spawner reaps it and init adopts the
 * child, which starts a new session. Returns 0 in the child, or -1 if fork failed
 * (nothing changed).
 */
static inline int daemonize(void)
{
	pid_t pid = fork();

	if (pid < 0)
		return -1;
	if (pid > 0)
		_exit(0);
	setsid();
	return 0;
}

#endif
