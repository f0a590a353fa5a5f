/* smolvm._smolvm: the only file that speaks CPython; spawns VMM processes, runs commands (exec_client), drives terminals (pty_client), sets the guest up (setup_client) and moves files (file_client). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "exec_client.h"
#include "file_client.h"
#include "pty_client.h"
#include "setup_client.h"
#include "proto.h"

extern char **environ;

#define MODULE_CTL_LINE_MAX 4096 /* longest ctl line returned; longer ones come back in pieces */
#define MODULE_SLICE_MS 100      /* how long the GIL stays released before signals are checked */

/* Per-module state: no static PyObject globals. */
typedef struct {
	PyObject *protocol_error; /* smolvm.errors.ProtocolError, also smolvm._smolvm.ProtocolError */
	PyObject *exec_stream_type; /* smolvm._smolvm.ExecStream */
	PyObject *pty_session_type; /* smolvm._smolvm.PtySession */
} module_state;

static module_state *module_get_state(PyObject *module)
{
	return (module_state *)PyModule_GetState(module);
}

static int64_t module_now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/*
 * Converter for PyArg_Parse "O&": str (UTF-8, surrogateescape) or bytes to a
 * new bytes reference without embedded NULs. Cleanup-capable (Py_CLEANUP_SUPPORTED).
 */
static int module_conv_cstr(PyObject *obj, void *addr)
{
	PyObject **result = addr;
	PyObject *bytes = NULL;

	if (obj == NULL) { /* cleanup call */
		Py_CLEAR(*result);
		return 1;
	}
	if (PyUnicode_Check(obj)) {
		bytes = PyUnicode_AsEncodedString(obj, "utf-8", "surrogateescape");
		if (bytes == NULL)
			return 0;
	} else if (PyBytes_Check(obj)) {
		bytes = Py_NewRef(obj);
	} else {
		PyErr_Format(PyExc_TypeError, "expected str or bytes, not %.100s", Py_TYPE(obj)->tp_name);
		return 0;
	}
	if ((size_t)PyBytes_GET_SIZE(bytes) != strlen(PyBytes_AS_STRING(bytes))) {
		Py_DECREF(bytes);
		PyErr_SetString(PyExc_ValueError, "embedded null character");
		return 0;
	}
	*result = bytes;
	return Py_CLEANUP_SUPPORTED;
}

/* A list/tuple of str|bytes as an owned tuple of bytes plus a NULL-terminated char* array. */
struct module_strv {
	PyObject *items; /* tuple of bytes, owned */
	char **v;        /* PyMem_Malloc'd, n + 1 entries, points into items */
	Py_ssize_t n;
};

static void module_strv_free(struct module_strv *sv)
{
	PyMem_Free(sv->v);
	sv->v = NULL;
	Py_CLEAR(sv->items);
	sv->n = 0;
}

static int module_strv_from(PyObject *seq, const char *what, struct module_strv *sv)
{
	PyObject *fast = NULL;
	Py_ssize_t i;

	sv->items = NULL;
	sv->v = NULL;
	sv->n = 0;
	if (!PyList_Check(seq) && !PyTuple_Check(seq)) {
		PyErr_Format(PyExc_TypeError, "%s must be a list of str, not %.100s", what,
			     Py_TYPE(seq)->tp_name);
		return -1;
	}
	fast = PySequence_Fast(seq, what);
	if (fast == NULL)
		return -1;
	sv->n = PySequence_Fast_GET_SIZE(fast);
	sv->items = PyTuple_New(sv->n);
	sv->v = PyMem_Calloc((size_t)sv->n + 1, sizeof(char *));
	if (sv->items == NULL || sv->v == NULL) {
		PyErr_NoMemory();
		goto fail;
	}
	for (i = 0; i < sv->n; i++) {
		PyObject *bytes = NULL;
		if (!module_conv_cstr(PySequence_Fast_GET_ITEM(fast, i), &bytes))
			goto fail;
		PyTuple_SET_ITEM(sv->items, i, bytes); /* steals */
		sv->v[i] = PyBytes_AS_STRING(bytes);
	}
	Py_DECREF(fast);
	return 0;
fail:
	Py_XDECREF(fast);
	module_strv_free(sv);
	return -1;
}

/* ---- spawn_vmm -------------------------------------------------------- */

PyDoc_STRVAR(spawn_vmm_doc,
"spawn_vmm(argv, stderr_path=None) -> (pid, ctl_fd)\n\n"
"Start argv[0] with argv in a new process group, with one end of a fresh\n"
"AF_UNIX stream socketpair on its fd 3 and every other fd above 2 closed.\n"
"stdin and stdout are /dev/null; stderr is /dev/null or appended to\n"
"stderr_path. Signal mask and dispositions are reset to the defaults.\n"
"Returns the child's pid and the parent's end of the socket (close-on-exec).\n"
"The caller reaps the child with os.waitpid().");

static PyObject *module_spawn_vmm(PyObject *module, PyObject *args, PyObject *kwargs)
{
	static char *kwlist[] = {"argv", "stderr_path", NULL};
	PyObject *argv_obj = NULL, *stderr_obj = Py_None, *stderr_path = NULL;
	PyObject *result = NULL;
	struct module_strv argv = {0};
	posix_spawn_file_actions_t fa;
	posix_spawnattr_t attr;
	int fa_ok = 0, attr_ok = 0;
	int sv[2] = {-1, -1};
	int child_fd = -1;
	pid_t pid = -1;
	sigset_t mask, defaults;
	int err;

	(void)module;
	if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|O:spawn_vmm", kwlist, &argv_obj, &stderr_obj))
		return NULL;
	if (stderr_obj != Py_None && !PyUnicode_FSConverter(stderr_obj, &stderr_path))
		return NULL;
	if (module_strv_from(argv_obj, "argv", &argv) < 0)
		goto out;
	if (argv.n < 1) {
		PyErr_SetString(PyExc_ValueError, "argv must not be empty");
		goto out;
	}

	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) {
		PyErr_SetFromErrno(PyExc_OSError);
		goto out;
	}
	/* Move the child's end above 3 so that neither the /dev/null opens nor dup2(…, 3) clobber it. */
	child_fd = fcntl(sv[1], F_DUPFD_CLOEXEC, 4);
	if (child_fd < 0) {
		PyErr_SetFromErrno(PyExc_OSError);
		goto out;
	}

	err = posix_spawn_file_actions_init(&fa);
	if (err == 0) {
		fa_ok = 1;
		err = posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
	}
	if (err == 0)
		err = posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
	if (err == 0) {
		if (stderr_path != NULL)
			err = posix_spawn_file_actions_addopen(&fa, 2, PyBytes_AS_STRING(stderr_path),
							       O_WRONLY | O_CREAT | O_APPEND, 0600);
		else
			err = posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
	}
	if (err == 0)
		err = posix_spawn_file_actions_adddup2(&fa, child_fd, 3); /* dup2 clears CLOEXEC on 3 */
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 34))
	if (err == 0)
		err = posix_spawn_file_actions_addclosefrom_np(&fa, 4);
#endif
	if (err == 0) {
		err = posix_spawnattr_init(&attr);
		if (err == 0)
			attr_ok = 1;
	}
	sigemptyset(&mask);
	sigfillset(&defaults);
	sigdelset(&defaults, SIGKILL);
	sigdelset(&defaults, SIGSTOP);
	if (err == 0)
		err = posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK |
							     POSIX_SPAWN_SETSIGDEF);
	if (err == 0)
		err = posix_spawnattr_setpgroup(&attr, 0);
	if (err == 0)
		err = posix_spawnattr_setsigmask(&attr, &mask);
	if (err == 0)
		err = posix_spawnattr_setsigdefault(&attr, &defaults);
	if (err != 0) {
		errno = err;
		PyErr_SetFromErrno(PyExc_OSError);
		goto out;
	}

	Py_BEGIN_ALLOW_THREADS
	err = posix_spawn(&pid, argv.v[0], &fa, &attr, argv.v, environ);
	Py_END_ALLOW_THREADS
	if (err != 0) {
		errno = err;
		PyErr_SetFromErrnoWithFilename(PyExc_OSError, argv.v[0]);
		goto out;
	}

	result = Py_BuildValue("(ii)", (int)pid, sv[0]);
	if (result == NULL) {
		/* Cannot hand the child over: make sure it does not outlive us. */
		kill(pid, SIGKILL);
		goto out;
	}
	sv[0] = -1; /* now the caller's */
out:
	if (attr_ok)
		posix_spawnattr_destroy(&attr);
	if (fa_ok)
		posix_spawn_file_actions_destroy(&fa);
	if (child_fd >= 0)
		close(child_fd);
	if (sv[1] >= 0)
		close(sv[1]);
	if (sv[0] >= 0)
		close(sv[0]);
	module_strv_free(&argv);
	Py_XDECREF(stderr_path);
	return result;
}

/* ---- wait_line -------------------------------------------------------- */

enum { LINE_AGAIN = 0, LINE_DONE = 1, LINE_EOF = 2, LINE_ERR = 3 };

/*
 * Without the GIL: wait up to slice_ms for data on fd, then read bytes one at
 * a time (so nothing past the newline is consumed) while they are available.
 * Appends to buf/len. Returns LINE_DONE when a newline was read or buf is full,
 * LINE_EOF on end of file, LINE_AGAIN when the slice ran out, LINE_ERR with
 * *err set.
 */
static int module_read_line_slice(int fd, char *buf, size_t cap, size_t *len, int slice_ms, int *err)
{
	struct pollfd pfd = {.fd = fd, .events = POLLIN};
	int timeout = slice_ms;

	for (;;) {
		int r = poll(&pfd, 1, timeout);
		if (r < 0) {
			*err = errno;
			return LINE_ERR;
		}
		if (r == 0)
			return LINE_AGAIN;
		if (pfd.revents & POLLNVAL) {
			*err = EBADF;
			return LINE_ERR;
		}
		char c;
		ssize_t n = read(fd, &c, 1);
		if (n < 0) {
			if (errno == EAGAIN || errno == EWOULDBLOCK) {
				timeout = 0;
				continue;
			}
			*err = errno;
			return LINE_ERR;
		}
		if (n == 0)
			return LINE_EOF;
		buf[(*len)++] = c;
		if (c == '\n' || *len == cap)
			return LINE_DONE;
		timeout = 0; /* keep draining what is already there; poll(0) ends the slice */
	}
}

PyDoc_STRVAR(wait_line_doc,
"wait_line(fd, timeout) -> bytes | None\n\n"
"Read one line (up to and including b'\\n') from fd, waiting at most timeout\n"
"seconds (negative: forever). Returns None on timeout, b'' at end of file, and\n"
"what was read before end of file without a newline. The GIL is released\n"
"while waiting; signals are checked every 100 ms so Ctrl-C works.");

static PyObject *module_wait_line(PyObject *module, PyObject *args)
{
	int fd;
	double timeout;
	char buf[MODULE_CTL_LINE_MAX];
	size_t len = 0;
	int64_t deadline;

	(void)module;
	if (!PyArg_ParseTuple(args, "id:wait_line", &fd, &timeout))
		return NULL;
	if (fd < 0) {
		PyErr_SetString(PyExc_ValueError, "fd must be >= 0");
		return NULL;
	}
	if (timeout != timeout) {
		PyErr_SetString(PyExc_ValueError, "timeout must not be NaN");
		return NULL;
	}
	deadline = timeout < 0 ? -1 : module_now_ms() + (int64_t)(timeout * 1000.0 + 0.5);

	for (;;) {
		int slice = MODULE_SLICE_MS, st, err = 0;
		if (deadline >= 0) {
			int64_t left = deadline - module_now_ms();
			if (left < 0)
				left = 0;
			if (left < slice)
				slice = (int)left;
		}
		Py_BEGIN_ALLOW_THREADS
		st = module_read_line_slice(fd, buf, sizeof(buf), &len, slice, &err);
		Py_END_ALLOW_THREADS
		switch (st) {
		case LINE_DONE:
		case LINE_EOF:
			return PyBytes_FromStringAndSize(buf, (Py_ssize_t)len);
		case LINE_ERR:
			if (err != EINTR) {
				errno = err;
				return PyErr_SetFromErrno(PyExc_OSError);
			}
			break;
		default:
			break;
		}
		if (PyErr_CheckSignals() < 0)
			return NULL;
		if (deadline >= 0 && module_now_ms() >= deadline) {
			if (len == 0)
				Py_RETURN_NONE;
			/* A line cut by the deadline: hand back what came so far. */
			return PyBytes_FromStringAndSize(buf, (Py_ssize_t)len);
		}
	}
}

/* ---- errors: one map from a failed request to the Python exception ------ */

/* The interrupted() hook of every request: take the GIL briefly and run pending signal handlers. */
static int module_interrupted(void *opaque)
{
	PyGILState_STATE gil;
	int r;

	(void)opaque;
	gil = PyGILState_Ensure();
	r = PyErr_CheckSignals();
	PyGILState_Release(gil);
	return r < 0;
}

/* smolvm.errors.ProtocolError(msg, err=err, code=code). */
static void module_raise_protocol(PyObject *module, const char *msg, int err, int code)
{
	module_state *st = module_get_state(module);
	PyObject *args = NULL, *kwargs = NULL, *exc = NULL;

	args = Py_BuildValue("(s)", msg[0] ? msg : "protocol error from the guest agent");
	kwargs = Py_BuildValue("{sisi}", "err", err, "code", code);
	if (args && kwargs)
		exc = PyObject_Call(st->protocol_error, args, kwargs);
	if (exc)
		PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
	Py_XDECREF(exc);
	Py_XDECREF(kwargs);
	Py_XDECREF(args);
}

/* OSError(e, msg[, filename]): the subclass follows e (FileNotFoundError, TimeoutError, ...). */
static void module_raise_os(int e, const char *msg, PyObject *filename)
{
	PyObject *exc = filename ? PyObject_CallFunction(PyExc_OSError, "isO", e, msg, filename)
				 : PyObject_CallFunction(PyExc_OSError, "is", e, msg[0] ? msg : strerror(e));

	if (exc != NULL) {
		PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
		Py_DECREF(exc);
	}
}

/*
 * The one error map of the agent protocol. rc: the request's -errno; msg:
 * its message; guest: the ERROR frame, if one came. An ERROR frame naming an
 * errno about a file (file requests pass guest_path) is that OSError; any
 * other ERROR frame and every bad frame (-EPROTO) is ProtocolError with err
 * and code; the rest is OSError (with local_path when it is about the
 * local file).
 */
static void module_raise(PyObject *module, int rc, char *msg, size_t msg_size, const struct agent_error *guest,
			 PyObject *guest_path, PyObject *local_path)
{
	msg[msg_size - 1] = '\0';
	if (rc == -EINTR && PyErr_Occurred())
		return; /* KeyboardInterrupt (or another handler's exception) is already set */
	if (guest && guest->set && guest->err && guest_path)
		module_raise_os(guest->err, msg, guest_path);
	else if (guest && guest->set)
		module_raise_protocol(module, msg, guest->err, guest->code);
	else if (rc == -EPROTO)
		module_raise_protocol(module, msg, 0, SMOLVM_ERRC_REQUEST);
	else if (rc == -E2BIG)
		PyErr_SetString(PyExc_ValueError, "command, cwd and env together are too large for one request (1 MiB)");
	else
		module_raise_os(rc < 0 ? -rc : EIO, msg, local_path);
}

/* An exec's ERROR frame is always ProtocolError (vm.py turns ERRC_CWD into FileNotFoundError). */
static void module_exec_raise(PyObject *module, int rc, struct exec_output *out)
{
	struct agent_error guest = { rc == -EPROTO, out->guest_err, out->guest_code };

	module_raise(module, rc, out->error, sizeof(out->error), &guest, NULL, NULL);
}

/* ---- exec ------------------------------------------------------------- */

/* exec() and exec_start() arguments, converted; release with module_exec_args_free(). */
struct module_exec_args {
	PyObject *uds, *command, *cwd, *env_obj, *input;
	struct module_strv env;
	unsigned int port, timeout_ms;
	int host_timeout_ms, events;
	struct exec_request req;
};

static void module_exec_args_free(struct module_exec_args *a)
{
	module_strv_free(&a->env);
	Py_CLEAR(a->uds);
	Py_CLEAR(a->command);
	Py_CLEAR(a->cwd);
}

/* Parse (uds_path, port, command, cwd, env, timeout_ms, host_timeout_ms[, input, events]) into a->req. */
static int module_exec_args_parse(PyObject *args, PyObject *kwargs, const char *fmt, char **kwlist,
				  struct module_exec_args *a)
{
	memset(a, 0, sizeof(*a));
	a->input = Py_None;
	if (!PyArg_ParseTupleAndKeywords(args, kwargs, fmt, kwlist, PyUnicode_FSConverter, &a->uds, &a->port,
					 module_conv_cstr, &a->command, module_conv_cstr, &a->cwd, &a->env_obj,
					 &a->timeout_ms, &a->host_timeout_ms, &a->input, &a->events))
		return -1;
	if (a->input != Py_None && !PyBytes_Check(a->input)) {
		PyErr_Format(PyExc_TypeError, "input must be bytes or None, not %.100s", Py_TYPE(a->input)->tp_name);
		return -1;
	}
	if (module_strv_from(a->env_obj, "env", &a->env) < 0)
		return -1;
	if ((size_t)a->env.n > UINT32_MAX) {
		PyErr_SetString(PyExc_OverflowError, "too many environment entries");
		return -1;
	}
	a->req.command = PyBytes_AS_STRING(a->command);
	a->req.cwd = PyBytes_AS_STRING(a->cwd);
	a->req.env = (const char *const *)a->env.v;
	a->req.n_env = (uint32_t)a->env.n;
	a->req.timeout_ms = a->timeout_ms;
	return 0;
}

/* (exit_code, signal, stdout, stderr, timed_out); empty streams are NULL, which "y#" would make None. */
static PyObject *module_exec_result(const struct exec_output *out)
{
	return Py_BuildValue("(iiy#y#O)", out->exit_code, out->signal, out->out ? (const char *)out->out : "",
			     (Py_ssize_t)out->out_len, out->err ? (const char *)out->err : "", (Py_ssize_t)out->err_len,
			     out->timed_out ? Py_True : Py_False);
}

PyDoc_STRVAR(exec_doc,
"exec(uds_path, port, command, cwd, env, timeout_ms, host_timeout_ms)\n"
"    -> (exit_code, signal, stdout, stderr, timed_out)\n\n"
"Connect to the guest agent through the VMM's vsock Unix socket, run\n"
"`/bin/sh -c command` in cwd ('' = '/') with env (a list of 'KEY=VALUE'),\n"
"killed by the guest after timeout_ms (0 = never); give up after\n"
"host_timeout_ms on the host side. Raises OSError with the errno\n"
"(ConnectionRefusedError, FileNotFoundError, ConnectionResetError,\n"
"TimeoutError) or ProtocolError (smolvm.errors) carrying the agent's\n"
"message, its errno in .err and what it is about in .code (ERRC_*).");

static PyObject *module_exec(PyObject *module, PyObject *args)
{
	static char *kwlist[] = {"uds_path", "port", "command", "cwd", "env", "timeout_ms", "host_timeout_ms", NULL};
	struct module_exec_args a;
	struct exec_output out;
	PyObject *result = NULL;
	int rc;

	memset(&out, 0, sizeof(out));
	if (module_exec_args_parse(args, NULL, "O&IO&O&OIi:exec", kwlist, &a) < 0)
		goto cleanup;
	/* Everything the call reads is C memory owned by objects we hold: safe without the GIL. */
	Py_BEGIN_ALLOW_THREADS
	rc = exec_run(PyBytes_AS_STRING(a.uds), a.port, &a.req, a.host_timeout_ms, module_interrupted, NULL, &out);
	Py_END_ALLOW_THREADS
	if (rc == 0)
		result = module_exec_result(&out);
	else
		module_exec_raise(module, rc, &out);
	exec_output_free(&out);
cleanup:
	module_exec_args_free(&a);
	return result;
}

/* ---- ExecStream: one exec driven step by step from Python ---------------- */

typedef struct {
	PyObject_HEAD
	PyObject *module;          /* owning module (for ProtocolError) */
	struct exec_stream *xs;    /* NULL once closed */
	struct exec_output out;
	PyObject *input;           /* bytes kept alive while the stream sends them, or NULL */
	int state;                 /* 0 running, 1 done (EXIT came), -1 failed or closed */
	int busy;                  /* a pump() has the GIL released: no second caller */
} module_stream;

static void module_stream_release(module_stream *ms)
{
	exec_stream_free(ms->xs); /* closes the connection: the agent kills a command still running */
	ms->xs = NULL;
	Py_CLEAR(ms->input);
}

static void module_stream_dealloc(PyObject *self)
{
	module_stream *ms = (module_stream *)self;
	PyTypeObject *tp = Py_TYPE(self);

	PyObject_GC_UnTrack(self);
	module_stream_release(ms);
	exec_output_free(&ms->out);
	Py_CLEAR(ms->module);
	tp->tp_free(self);
	Py_DECREF(tp);
}

static int module_stream_traverse(PyObject *self, visitproc visit, void *arg)
{
	module_stream *ms = (module_stream *)self;

	Py_VISIT(Py_TYPE(self));
	Py_VISIT(ms->module);
	return 0;
}

/* The chunks logged since the last call as a list of (kind, bytes); kind is STDOUT or STDERR. */
static PyObject *module_stream_take_events(module_stream *ms)
{
	size_t len, off = 0;
	const uint8_t *ev = exec_stream_events(ms->xs, &len);
	PyObject *list = PyList_New(0);

	if (list == NULL)
		return NULL;
	while (off + 5 <= len) {
		uint32_t n;
		PyObject *item;

		memcpy(&n, ev + off + 1, 4);
		item = Py_BuildValue("(iy#)", (int)ev[off], (const char *)ev + off + 5, (Py_ssize_t)n);
		if (item == NULL || PyList_Append(list, item) < 0) {
			Py_XDECREF(item);
			Py_DECREF(list);
			return NULL;
		}
		Py_DECREF(item);
		off += 5 + (size_t)n;
	}
	exec_stream_events_clear(ms->xs);
	return list;
}

PyDoc_STRVAR(stream_pump_doc,
"pump(timeout) -> list[(kind, bytes)]\n\n"
"Send what the socket takes, read what came, and if the command is not done\n"
"yet wait up to timeout seconds (0: not at all; at most 0.1 s is advised, so\n"
"that signals are seen) for more, with the GIL released. Returns the output\n"
"chunks that arrived, in order (empty unless started with events=True).\n"
"Raises like exec(); the stream is then closed.");

static PyObject *module_stream_pump(PyObject *self, PyObject *args)
{
	module_stream *ms = (module_stream *)self;
	double timeout;
	int rc, wait_ms;

	if (!PyArg_ParseTuple(args, "d:pump", &timeout))
		return NULL;
	if (ms->busy) {
		PyErr_SetString(PyExc_RuntimeError, "ExecStream.pump() is already running in another thread");
		return NULL;
	}
	if (ms->state != 0 || ms->xs == NULL)
		return PyList_New(0);
	wait_ms = !(timeout > 0) ? 0 : timeout > 3600 ? 3600000 : (int)(timeout * 1000.0 + 0.5);
	ms->busy = 1;
	Py_BEGIN_ALLOW_THREADS
	rc = exec_stream_step(ms->xs);
	if (rc == 0 && wait_ms > 0) {
		rc = exec_stream_wait(ms->xs, wait_ms);
		if (rc == 0)
			rc = exec_stream_step(ms->xs);
	} else if (rc == 0 && wait_ms == 0) {
		rc = exec_stream_wait(ms->xs, 0); /* only the host deadline */
	}
	Py_END_ALLOW_THREADS
	ms->busy = 0;
	if (rc < 0) {
		ms->state = -1;
		module_stream_release(ms);
		module_exec_raise(ms->module, rc, &ms->out);
		return NULL;
	}
	if (rc == 1)
		ms->state = 1;
	if (PyErr_CheckSignals() < 0)
		return NULL;
	return module_stream_take_events(ms);
}

PyDoc_STRVAR(stream_result_doc,
"result() -> (exit_code, signal, stdout, stderr, timed_out)\n\n"
"The whole output and exit status once pump() saw the command end.");

static PyObject *module_stream_result(PyObject *self, PyObject *unused)
{
	module_stream *ms = (module_stream *)self;

	(void)unused;
	if (ms->state != 1) {
		PyErr_SetString(PyExc_RuntimeError, "ExecStream.result(): the command has not ended (or the stream failed)");
		return NULL;
	}
	return module_exec_result(&ms->out);
}

static PyObject *module_stream_fileno(PyObject *self, PyObject *unused)
{
	module_stream *ms = (module_stream *)self;

	(void)unused;
	if (ms->xs == NULL) {
		PyErr_SetString(PyExc_ValueError, "ExecStream is closed");
		return NULL;
	}
	return PyLong_FromLong(exec_stream_fd(ms->xs));
}

static PyObject *module_stream_wants_write(PyObject *self, PyObject *unused)
{
	module_stream *ms = (module_stream *)self;

	(void)unused;
	return PyBool_FromLong(ms->xs != NULL && ms->state == 0 && exec_stream_wants_write(ms->xs));
}

static PyObject *module_stream_done(PyObject *self, void *closure)
{
	(void)closure;
	return PyBool_FromLong(((module_stream *)self)->state != 0);
}

static PyObject *module_stream_close(PyObject *self, PyObject *unused)
{
	module_stream *ms = (module_stream *)self;

	(void)unused;
	if (ms->busy) {
		PyErr_SetString(PyExc_RuntimeError, "ExecStream.close() while pump() runs in another thread");
		return NULL;
	}
	if (ms->state == 0)
		ms->state = -1;
	module_stream_release(ms);
	Py_RETURN_NONE;
}

static PyMethodDef module_stream_methods[] = {
	{"pump", module_stream_pump, METH_VARARGS, stream_pump_doc},
	{"result", module_stream_result, METH_NOARGS, stream_result_doc},
	{"fileno", module_stream_fileno, METH_NOARGS, "The socket, for an event loop's add_reader()/add_writer()."},
	{"wants_write", module_stream_wants_write, METH_NOARGS, "True while the request or input waits to be sent."},
	{"close", module_stream_close, METH_NOARGS, "Close the connection; a command still running is killed."},
	{NULL, NULL, 0, NULL},
};

static PyGetSetDef module_stream_getset[] = {
	{"done", module_stream_done, NULL, "True once the command ended, failed or the stream was closed.", NULL},
	{NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot module_stream_slots[] = {
	{Py_tp_dealloc, module_stream_dealloc},
	{Py_tp_traverse, module_stream_traverse},
	{Py_tp_methods, module_stream_methods},
	{Py_tp_getset, module_stream_getset},
	{Py_tp_doc, "One command in the guest, driven by pump(); made by exec_start()."},
	{0, NULL},
};

static PyType_Spec module_stream_spec = {
	.name = "smolvm._smolvm.ExecStream",
	.basicsize = sizeof(module_stream),
	.flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_DISALLOW_INSTANTIATION,
	.slots = module_stream_slots,
};

PyDoc_STRVAR(exec_start_doc,
"exec_start(uds_path, port, command, cwd, env, timeout_ms, host_timeout_ms,\n"
"           input=None, events=False) -> ExecStream\n\n"
"Start what exec() does, without waiting: connect and queue the request.\n"
"input (bytes) becomes the command's stdin (else /dev/null); events=True makes\n"
"pump() return the output chunks as they arrive. Drive it with pump() until\n"
".done, then result(). Raises OSError when nothing listens at uds_path.");

static PyObject *module_exec_start(PyObject *module, PyObject *args, PyObject *kwargs)
{
	static char *kwlist[] = {"uds_path", "port", "command", "cwd", "env", "timeout_ms", "host_timeout_ms",
				 "input", "events", NULL};
	module_state *st = module_get_state(module);
	struct module_exec_args a;
	module_stream *ms = NULL;
	int rc;

	if (module_exec_args_parse(args, kwargs, "O&IO&O&OIi|Op:exec_start", kwlist, &a) < 0)
		goto cleanup;
	ms = PyObject_GC_New(module_stream, (PyTypeObject *)st->exec_stream_type);
	if (ms == NULL)
		goto cleanup;
	ms->module = Py_NewRef(module);
	ms->xs = NULL;
	memset(&ms->out, 0, sizeof(ms->out));
	ms->input = a.input == Py_None ? NULL : Py_NewRef(a.input);
	ms->state = 0;
	ms->busy = 0;
	PyObject_GC_Track((PyObject *)ms);
	a.req.has_input = ms->input != NULL;
	a.req.input = ms->input ? (const uint8_t *)PyBytes_AS_STRING(ms->input) : NULL;
	a.req.input_len = ms->input ? (size_t)PyBytes_GET_SIZE(ms->input) : 0;
	/* open copies command, cwd and env into its request frame; input stays in ms->input */
	Py_BEGIN_ALLOW_THREADS
	rc = exec_stream_open(&ms->xs, PyBytes_AS_STRING(a.uds), a.port, &a.req, a.host_timeout_ms,
			      a.events ? EXEC_STREAM_EVENTS : 0, &ms->out);
	Py_END_ALLOW_THREADS
	if (rc < 0) {
		module_exec_raise(module, rc, &ms->out);
		Py_CLEAR(ms);
	}
cleanup:
	module_exec_args_free(&a);
	return (PyObject *)ms;
}

/* ---- PtySession: one terminal session driven from Python ------------------ */

typedef struct {
	PyObject_HEAD
	PyObject *module;        /* owning module (for ProtocolError) */
	struct pty_session *ps;  /* NULL once closed */
	struct pty_status st;
	int state;               /* 0 running, 1 done (EXIT came), -1 failed or closed */
	int busy;                /* a pump() has the GIL released: no second caller */
} module_pty;

static void module_pty_release(module_pty *mp)
{
	pty_session_free(mp->ps); /* closes the connection: the agent kills the session */
	mp->ps = NULL;
}

static void module_pty_dealloc(PyObject *self)
{
	module_pty *mp = (module_pty *)self;
	PyTypeObject *tp = Py_TYPE(self);

	PyObject_GC_UnTrack(self);
	module_pty_release(mp);
	Py_CLEAR(mp->module);
	tp->tp_free(self);
	Py_DECREF(tp);
}

static int module_pty_traverse(PyObject *self, visitproc visit, void *arg)
{
	Py_VISIT(Py_TYPE(self));
	Py_VISIT(((module_pty *)self)->module);
	return 0;
}

/* The session is usable for I/O (not closed, not busy in another thread); else an exception set. */
static int module_pty_usable(module_pty *mp, const char *what)
{
	if (mp->busy) {
		PyErr_Format(PyExc_RuntimeError, "PtySession.%s() while pump() runs in another thread", what);
		return -1;
	}
	if (mp->ps == NULL) {
		PyErr_Format(PyExc_ValueError, "PtySession.%s(): the session is closed", what);
		return -1;
	}
	return 0;
}

/* A failed step or wait: the connection is closed and the error raised. */
static void module_pty_raise(module_pty *mp, int rc)
{
	struct agent_error guest = { rc == -EPROTO, mp->st.guest_err, mp->st.guest_code };

	mp->state = -1;
	module_pty_release(mp);
	module_raise(mp->module, rc, mp->st.error, sizeof(mp->st.error), &guest, NULL, NULL);
}

PyDoc_STRVAR(pty_pump_doc,
"pump(timeout) -> bool\n\n"
"Send what the socket takes (input, resizes), read what came, and if nothing\n"
"changed wait up to timeout seconds (0: not at all; at most 0.1 s is advised,\n"
"so that signals are seen) with the GIL released, then read again. Returns\n"
"True once the session ended (EXIT came). Raises like exec(); the session is\n"
"then closed.");

static PyObject *module_pty_pump(PyObject *self, PyObject *args)
{
	module_pty *mp = (module_pty *)self;
	double timeout;
	int rc, wait_ms;

	if (!PyArg_ParseTuple(args, "d:pump", &timeout))
		return NULL;
	if (mp->state != 0)
		return PyBool_FromLong(mp->state == 1);
	if (module_pty_usable(mp, "pump") < 0)
		return NULL;
	wait_ms = !(timeout > 0) ? 0 : timeout > 3600 ? 3600000 : (int)(timeout * 1000.0 + 0.5);
	mp->busy = 1;
	Py_BEGIN_ALLOW_THREADS
	size_t before;
	pty_session_output(mp->ps, &before);
	rc = pty_session_step(mp->ps);
	if (rc == 0) {
		size_t after;

		pty_session_output(mp->ps, &after);
		rc = pty_session_wait(mp->ps, after == before ? wait_ms : 0);
		if (rc == 0)
			rc = pty_session_step(mp->ps);
	}
	Py_END_ALLOW_THREADS
	mp->busy = 0;
	if (rc < 0) {
		module_pty_raise(mp, rc);
		return NULL;
	}
	if (rc == 1)
		mp->state = 1;
	if (PyErr_CheckSignals() < 0)
		return NULL;
	return PyBool_FromLong(mp->state == 1);
}

static PyObject *module_pty_read(PyObject *self, PyObject *args)
{
	module_pty *mp = (module_pty *)self;
	Py_ssize_t n;
	const uint8_t *p;
	size_t len;
	PyObject *b;

	if (!PyArg_ParseTuple(args, "n:read", &n))
		return NULL;
	if (n < 0) {
		PyErr_SetString(PyExc_ValueError, "read(n): n must be >= 0");
		return NULL;
	}
	if (mp->ps == NULL)
		return PyBytes_FromStringAndSize("", 0);
	p = pty_session_output(mp->ps, &len);
	if ((size_t)n < len)
		len = (size_t)n;
	b = PyBytes_FromStringAndSize(len ? (const char *)p : "", (Py_ssize_t)len);
	if (b != NULL)
		pty_session_consume(mp->ps, len);
	return b;
}

static PyObject *module_pty_write(PyObject *self, PyObject *args)
{
	module_pty *mp = (module_pty *)self;
	Py_buffer buf;
	int rc;

	if (!PyArg_ParseTuple(args, "y*:write", &buf))
		return NULL;
	if (module_pty_usable(mp, "write") < 0 || mp->state != 0) {
		if (!PyErr_Occurred())
			PyErr_SetString(PyExc_ValueError, "PtySession.write(): the session has ended");
		PyBuffer_Release(&buf);
		return NULL;
	}
	rc = pty_session_write(mp->ps, buf.buf, (size_t)buf.len);
	PyBuffer_Release(&buf);
	if (rc < 0)
		return PyErr_NoMemory();
	Py_RETURN_NONE;
}

static PyObject *module_pty_resize(PyObject *self, PyObject *args)
{
	module_pty *mp = (module_pty *)self;
	unsigned int rows, cols;

	if (!PyArg_ParseTuple(args, "II:resize", &rows, &cols))
		return NULL;
	if (module_pty_usable(mp, "resize") < 0)
		return NULL;
	if (rows > UINT16_MAX || cols > UINT16_MAX || pty_session_resize(mp->ps, (uint16_t)rows, (uint16_t)cols) < 0) {
		PyErr_Format(PyExc_ValueError, "terminal size %ux%u: rows and cols must be in 1..%u", rows, cols,
			     SMOLVM_PTY_MAX_DIM);
		return NULL;
	}
	Py_RETURN_NONE;
}

static PyObject *module_pty_fileno(PyObject *self, PyObject *unused)
{
	module_pty *mp = (module_pty *)self;

	(void)unused;
	if (mp->ps == NULL) {
		PyErr_SetString(PyExc_ValueError, "PtySession is closed");
		return NULL;
	}
	return PyLong_FromLong(pty_session_fd(mp->ps));
}

static PyObject *module_pty_wants_write(PyObject *self, PyObject *unused)
{
	module_pty *mp = (module_pty *)self;

	(void)unused;
	return PyBool_FromLong(mp->ps != NULL && mp->state == 0 && pty_session_wants_write(mp->ps));
}

static PyObject *module_pty_close(PyObject *self, PyObject *unused)
{
	module_pty *mp = (module_pty *)self;

	(void)unused;
	if (mp->busy) {
		PyErr_SetString(PyExc_RuntimeError, "PtySession.close() while pump() runs in another thread");
		return NULL;
	}
	if (mp->state == 0)
		mp->state = -1;
	module_pty_release(mp);
	Py_RETURN_NONE;
}

static PyObject *module_pty_get_done(PyObject *self, void *closure)
{
	(void)closure;
	return PyBool_FromLong(((module_pty *)self)->state != 0);
}

static PyObject *module_pty_get_pid(PyObject *self, void *closure)
{
	module_pty *mp = (module_pty *)self;

	(void)closure;
	if (!mp->st.pid)
		Py_RETURN_NONE;
	return PyLong_FromLong(mp->st.pid);
}

static PyObject *module_pty_get_pending(PyObject *self, void *closure)
{
	module_pty *mp = (module_pty *)self;

	(void)closure;
	return PyLong_FromSize_t(mp->ps ? pty_session_pending(mp->ps) : 0);
}

static PyObject *module_pty_get_available(PyObject *self, void *closure)
{
	module_pty *mp = (module_pty *)self;
	size_t len = 0;

	(void)closure;
	if (mp->ps)
		pty_session_output(mp->ps, &len);
	return PyLong_FromSize_t(len);
}

/* (exit_code, signal, timed_out) once EXIT came, else None. */
static PyObject *module_pty_get_status(PyObject *self, void *closure)
{
	module_pty *mp = (module_pty *)self;

	(void)closure;
	if (mp->state != 1)
		Py_RETURN_NONE;
	return Py_BuildValue("(iiO)", mp->st.exit_code, mp->st.signal, mp->st.timed_out ? Py_True : Py_False);
}

static PyMethodDef module_pty_methods[] = {
	{"pump", module_pty_pump, METH_VARARGS, pty_pump_doc},
	{"read", module_pty_read, METH_VARARGS, "read(n) -> bytes: up to n bytes of the terminal output that came (no I/O)."},
	{"write", module_pty_write, METH_VARARGS, "write(bytes): queue input for the terminal; pump() sends it."},
	{"resize", module_pty_resize, METH_VARARGS, "resize(rows, cols): queue a new terminal size; pump() sends it."},
	{"fileno", module_pty_fileno, METH_NOARGS, "The socket, for an event loop's add_reader()/add_writer()."},
	{"wants_write", module_pty_wants_write, METH_NOARGS, "True while queued frames wait for the socket."},
	{"close", module_pty_close, METH_NOARGS, "Close the connection; the agent kills every process of the session."},
	{NULL, NULL, 0, NULL},
};

static PyGetSetDef module_pty_getset[] = {
	{"done", module_pty_get_done, NULL, "True once the session ended, failed or was closed.", NULL},
	{"pid", module_pty_get_pid, NULL, "The session leader's pid in the guest (None until the agent said).", NULL},
	{"pending", module_pty_get_pending, NULL, "Input bytes (and frames) not yet taken by the socket.", NULL},
	{"available", module_pty_get_available, NULL, "Output bytes waiting for read().", NULL},
	{"status", module_pty_get_status, NULL, "(exit_code, signal, timed_out) once the session ended, else None.", NULL},
	{NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot module_pty_slots[] = {
	{Py_tp_dealloc, module_pty_dealloc},
	{Py_tp_traverse, module_pty_traverse},
	{Py_tp_methods, module_pty_methods},
	{Py_tp_getset, module_pty_getset},
	{Py_tp_doc, "One command on a guest pseudo-terminal, driven by pump(); made by pty_start()."},
	{0, NULL},
};

static PyType_Spec module_pty_spec = {
	.name = "smolvm._smolvm.PtySession",
	.basicsize = sizeof(module_pty),
	.flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_DISALLOW_INSTANTIATION,
	.slots = module_pty_slots,
};

PyDoc_STRVAR(pty_start_doc,
"pty_start(uds_path, port, command, cwd, env, timeout_ms, host_timeout_ms, rows, cols) -> PtySession\n\n"
"Connect and queue a PTY request: `/bin/sh -c command` on a new guest\n"
"terminal of rows x cols (1..PTY_MAX_DIM). Drive it with pump(); .pid is set\n"
"once the agent started it. Raises OSError when nothing listens at uds_path,\n"
"ValueError for a bad size.");

static PyObject *module_pty_start(PyObject *module, PyObject *args, PyObject *kwargs)
{
	static char *kwlist[] = {"uds_path", "port", "command", "cwd", "env", "timeout_ms", "host_timeout_ms",
				 "rows", "cols", NULL};
	module_state *st = module_get_state(module);
	PyObject *uds = NULL, *command = NULL, *cwd = NULL, *env_obj = NULL;
	struct module_strv env = {0};
	unsigned int port, timeout_ms, rows, cols;
	int host_timeout_ms, rc;
	struct pty_request req;
	module_pty *mp = NULL;

	if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O&IO&O&OIiII:pty_start", kwlist, PyUnicode_FSConverter, &uds,
					 &port, module_conv_cstr, &command, module_conv_cstr, &cwd, &env_obj,
					 &timeout_ms, &host_timeout_ms, &rows, &cols))
		goto cleanup;
	if (rows < 1 || cols < 1 || rows > SMOLVM_PTY_MAX_DIM || cols > SMOLVM_PTY_MAX_DIM) {
		PyErr_Format(PyExc_ValueError, "terminal size %ux%u: rows and cols must be in 1..%u", rows, cols,
			     SMOLVM_PTY_MAX_DIM);
		goto cleanup;
	}
	if (module_strv_from(env_obj, "env", &env) < 0)
		goto cleanup;
	if ((size_t)env.n > UINT32_MAX) {
		PyErr_SetString(PyExc_OverflowError, "too many environment entries");
		goto cleanup;
	}
	req = (struct pty_request){ PyBytes_AS_STRING(command), PyBytes_AS_STRING(cwd), (const char *const *)env.v,
				    (uint32_t)env.n, timeout_ms, (uint16_t)rows, (uint16_t)cols };
	mp = PyObject_GC_New(module_pty, (PyTypeObject *)st->pty_session_type);
	if (mp == NULL)
		goto cleanup;
	mp->module = Py_NewRef(module);
	mp->ps = NULL;
	memset(&mp->st, 0, sizeof(mp->st));
	mp->state = 0;
	mp->busy = 0;
	PyObject_GC_Track((PyObject *)mp);
	Py_BEGIN_ALLOW_THREADS
	rc = pty_session_open(&mp->ps, PyBytes_AS_STRING(uds), port, &req, host_timeout_ms, &mp->st);
	Py_END_ALLOW_THREADS
	if (rc < 0) {
		module_raise(module, rc, mp->st.error, sizeof(mp->st.error), NULL, NULL, NULL);
		Py_CLEAR(mp);
	}
cleanup:
	module_strv_free(&env);
	Py_XDECREF(uds);
	Py_XDECREF(command);
	Py_XDECREF(cwd);
	return (PyObject *)mp;
}

/* ---- setup ------------------------------------------------------------ */

PyDoc_STRVAR(setup_doc,
"setup(uds_path, port, wall_ns, entropy, hostname, host_timeout_ms, flags=0, extra=b'') -> None\n\n"
"Send the agent its per-sandbox identity: host wall clock (ns since the epoch,\n"
"0 = leave), entropy bytes credited to the guest RNG, hostname; flags is a\n"
"mask of SETUP_* (SETUP_ROOT: switch the guest to the overlay root of image\n"
"and scratch disk); extra is the flags' data after the hostname (SETUP_NET's).\n"
"The GIL is released while waiting. Raises like exec().");

static PyObject *module_setup(PyObject *module, PyObject *args)
{
	PyObject *uds = NULL, *result = NULL;
	unsigned int port;
	unsigned long long wall_ns;
	unsigned int flags = 0;
	Py_buffer entropy = { 0 }, extra = { 0 };
	const char *hostname;
	int host_timeout_ms, rc;
	struct setup_request su;
	struct agent_error guest;
	char error[256];

	if (!PyArg_ParseTuple(args, "O&IKy*si|Iy*:setup", PyUnicode_FSConverter, &uds, &port, &wall_ns,
			      &entropy, &hostname, &host_timeout_ms, &flags, &extra))
		return NULL;
	if (entropy.len > SMOLVM_SETUP_MAX_ENTROPY || strlen(hostname) > SMOLVM_SETUP_MAX_HOSTNAME) {
		PyErr_SetString(PyExc_ValueError, "setup: entropy or hostname too long");
		goto cleanup;
	}
	if (extra.buf && (size_t)extra.len > SMOLVM_MAX_PAYLOAD / 2) {
		PyErr_SetString(PyExc_ValueError, "setup: extra data too long");
		goto cleanup;
	}
	su.wall_ns = wall_ns;
	su.entropy = entropy.buf;
	su.entropy_len = (uint32_t)entropy.len;
	su.hostname = hostname;
	su.flags = flags;
	su.extra = extra.buf;
	su.extra_len = extra.buf ? (uint32_t)extra.len : 0;
	Py_BEGIN_ALLOW_THREADS
	rc = setup_run(PyBytes_AS_STRING(uds), port, &su, host_timeout_ms, module_interrupted, NULL, error,
		       sizeof(error), &guest);
	Py_END_ALLOW_THREADS
	if (rc == 0)
		result = Py_NewRef(Py_None);
	else
		module_raise(module, rc, error, sizeof(error), &guest, NULL, NULL);
cleanup:
	PyBuffer_Release(&entropy);
	if (extra.buf)
		PyBuffer_Release(&extra);
	Py_XDECREF(uds);
	return result;
}

/* ---- put_file / get_file --------------------------------------------- */

/* The arguments both transfers take besides the paths; and the local file, opened without the GIL. */
struct module_file_args {
	PyObject *uds, *local_obj, *guest_obj, *local, *guest;
	int fd;
	struct file_result res;
};

static int module_file_open(struct module_file_args *a, int flags)
{
	int err;

	if (!PyUnicode_FSConverter(a->local_obj, &a->local) || !module_conv_cstr(a->guest_obj, &a->guest))
		return -1;
	Py_BEGIN_ALLOW_THREADS
	a->fd = open(PyBytes_AS_STRING(a->local), flags | O_CLOEXEC | O_NOCTTY, 0600);
	err = a->fd < 0 ? errno : 0;
	Py_END_ALLOW_THREADS
	if (a->fd < 0) {
		errno = err;
		PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, a->local_obj);
		return -1;
	}
	return 0;
}

/* After a failed transfer: the exception, naming the guest path for the guest's errors and the local one for the local file's. */
static void module_file_raise(PyObject *module, int rc, struct module_file_args *a)
{
	struct agent_error guest = { a->res.origin == FILE_ORIGIN_GUEST, a->res.guest_err, a->res.guest_code };

	module_raise(module, rc, a->res.error, sizeof(a->res.error), &guest, a->guest_obj,
		     a->res.origin == FILE_ORIGIN_LOCAL ? a->local_obj : NULL);
}

static void module_file_args_free(struct module_file_args *a)
{
	Py_XDECREF(a->uds);
	Py_XDECREF(a->local);
	Py_XDECREF(a->guest);
}

PyDoc_STRVAR(put_file_doc,
"put_file(uds_path, port, local_path, guest_path, mode, timeout_ms) -> int\n\n"
"Copy the regular file local_path to the absolute guest_path with the\n"
"permission bits mode (& 0o7777), through the guest agent; returns the bytes\n"
"sent. The agent writes a temporary file beside guest_path and renames it\n"
"over it, so a failed upload leaves nothing. The GIL is released while the\n"
"file moves; gives up after timeout_ms (negative: never). Raises OSError for\n"
"the local file (filename = local_path), OSError from the guest's errno\n"
"(FileNotFoundError for a missing folder, IsADirectoryError, ...; filename =\n"
"guest_path), ProtocolError, or OSError for the connection as exec() does.");

PyDoc_STRVAR(get_file_doc,
"get_file(uds_path, port, guest_path, local_path, timeout_ms) -> (size, mode)\n\n"
"Copy the regular guest file guest_path (absolute) to local_path (created or\n"
"truncated, mode 0o600: pass a temporary path and rename it); returns its\n"
"size and st_mode in the guest. On failure local_path is removed. The GIL is\n"
"released while the file moves; gives up after timeout_ms (negative: never).\n"
"Raises like put_file(): FileNotFoundError / IsADirectoryError with\n"
"filename = guest_path for the guest's errors, OSError with filename =\n"
"local_path for the local file's.");

/* put_file() and get_file(): parse, open the local file, move it with the GIL released, map the result. */
static PyObject *module_transfer(PyObject *module, PyObject *args, bool get)
{
	struct module_file_args a = { .fd = -1 };
	PyObject *result = NULL;
	unsigned int port, mode = 0;
	int timeout_ms, rc;

	if (get ? !PyArg_ParseTuple(args, "O&IOOi:get_file", PyUnicode_FSConverter, &a.uds, &port, &a.guest_obj,
				    &a.local_obj, &timeout_ms)
		: !PyArg_ParseTuple(args, "O&IOOIi:put_file", PyUnicode_FSConverter, &a.uds, &port, &a.local_obj,
				    &a.guest_obj, &mode, &timeout_ms))
		return NULL;
	if (module_file_open(&a, get ? O_WRONLY | O_CREAT | O_TRUNC : O_RDONLY) < 0)
		goto cleanup;
	Py_BEGIN_ALLOW_THREADS
	if (get)
		rc = file_get(PyBytes_AS_STRING(a.uds), port, PyBytes_AS_STRING(a.guest), a.fd, timeout_ms,
			      module_interrupted, NULL, &a.res);
	else
		rc = file_put(PyBytes_AS_STRING(a.uds), port, a.fd, PyBytes_AS_STRING(a.guest), mode, timeout_ms,
			      module_interrupted, NULL, &a.res);
	if (close(a.fd) < 0 && rc == 0 && get) {
		rc = -errno;
		a.res.origin = FILE_ORIGIN_LOCAL;
		snprintf(a.res.error, sizeof(a.res.error), "close: %s", strerror(errno));
	}
	if (rc != 0 && get)
		unlink(PyBytes_AS_STRING(a.local));
	Py_END_ALLOW_THREADS
	if (rc != 0)
		module_file_raise(module, rc, &a);
	else if (get)
		result = Py_BuildValue("(KI)", (unsigned long long)a.res.size, (unsigned int)a.res.mode);
	else
		result = PyLong_FromUnsignedLongLong(a.res.size);
cleanup:
	module_file_args_free(&a);
	return result;
}

static PyObject *module_put_file(PyObject *module, PyObject *args)
{
	return module_transfer(module, args, false);
}

static PyObject *module_get_file(PyObject *module, PyObject *args)
{
	return module_transfer(module, args, true);
}

/* ---- kvm_info --------------------------------------------------------- */

PyDoc_STRVAR(kvm_info_doc,
"kvm_info() -> dict\n\n"
"Open /dev/kvm and report its API version and a few capabilities\n"
"(KVM_CHECK_EXTENSION values). Raises OSError if /dev/kvm cannot be opened.");

static PyObject *module_kvm_info(PyObject *module, PyObject *unused)
{
	static const struct {
		const char *name;
		int cap;
	} caps[] = {
		{"irqchip", KVM_CAP_IRQCHIP},
		{"pit2", KVM_CAP_PIT2},
		{"ioeventfd", KVM_CAP_IOEVENTFD},
		{"irqfd", KVM_CAP_IRQFD},
		{"nr_vcpus", KVM_CAP_NR_VCPUS},
		{"max_vcpus", KVM_CAP_MAX_VCPUS},
		{"immediate_exit", KVM_CAP_IMMEDIATE_EXIT},
	};
	PyObject *dict = NULL, *val = NULL;
	int fd = -1, version;
	size_t i;

	(void)module;
	(void)unused;
	fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (fd < 0) {
		PyErr_SetFromErrnoWithFilename(PyExc_OSError, "/dev/kvm");
		goto fail;
	}
	version = ioctl(fd, KVM_GET_API_VERSION, 0);
	if (version < 0) {
		PyErr_SetFromErrnoWithFilename(PyExc_OSError, "/dev/kvm");
		goto fail;
	}
	dict = PyDict_New();
	if (dict == NULL)
		goto fail;
	val = PyLong_FromLong(version);
	if (val == NULL || PyDict_SetItemString(dict, "api_version", val) < 0)
		goto fail;
	Py_CLEAR(val);
	for (i = 0; i < sizeof(caps) / sizeof(caps[0]); i++) {
		int r = ioctl(fd, KVM_CHECK_EXTENSION, caps[i].cap);
		val = PyLong_FromLong(r < 0 ? 0 : r);
		if (val == NULL || PyDict_SetItemString(dict, caps[i].name, val) < 0)
			goto fail;
		Py_CLEAR(val);
	}
	close(fd);
	return dict;
fail:
	Py_XDECREF(val);
	Py_XDECREF(dict);
	if (fd >= 0)
		close(fd);
	return NULL;
}

/* ---- module ----------------------------------------------------------- */

static PyMethodDef module_methods[] = {
	{"spawn_vmm", (PyCFunction)(void (*)(void))module_spawn_vmm, METH_VARARGS | METH_KEYWORDS,
	 spawn_vmm_doc},
	{"wait_line", module_wait_line, METH_VARARGS, wait_line_doc},
	{"exec", module_exec, METH_VARARGS, exec_doc},
	{"exec_start", (PyCFunction)(void (*)(void))module_exec_start, METH_VARARGS | METH_KEYWORDS, exec_start_doc},
	{"pty_start", (PyCFunction)(void (*)(void))module_pty_start, METH_VARARGS | METH_KEYWORDS, pty_start_doc},
	{"setup", module_setup, METH_VARARGS, setup_doc},
	{"put_file", module_put_file, METH_VARARGS, put_file_doc},
	{"get_file", module_get_file, METH_VARARGS, get_file_doc},
	{"kvm_info", module_kvm_info, METH_NOARGS, kvm_info_doc},
	{NULL, NULL, 0, NULL},
};

static int module_exec_slot(PyObject *module)
{
	module_state *st = module_get_state(module);
	PyObject *errors = PyImport_ImportModule("smolvm.errors");

	if (errors == NULL)
		return -1;
	st->protocol_error = PyObject_GetAttrString(errors, "ProtocolError");
	Py_DECREF(errors);
	if (st->protocol_error == NULL)
		return -1;
	/* the same class under its old name, for nat.ProtocolError */
	if (PyModule_AddObjectRef(module, "ProtocolError", st->protocol_error) < 0)
		return -1;
	st->exec_stream_type = PyType_FromModuleAndSpec(module, &module_stream_spec, NULL);
	if (st->exec_stream_type == NULL)
		return -1;
	if (PyModule_AddObjectRef(module, "ExecStream", st->exec_stream_type) < 0)
		return -1;
	st->pty_session_type = PyType_FromModuleAndSpec(module, &module_pty_spec, NULL);
	if (st->pty_session_type == NULL)
		return -1;
	if (PyModule_AddObjectRef(module, "PtySession", st->pty_session_type) < 0 ||
	    PyModule_AddIntConstant(module, "PTY_MAX_DIM", SMOLVM_PTY_MAX_DIM) < 0)
		return -1;
	if (PyModule_AddIntConstant(module, "STDOUT", SMOLVM_STDOUT) < 0 ||
	    PyModule_AddIntConstant(module, "STDERR", SMOLVM_STDERR) < 0 ||
	    PyModule_AddIntConstant(module, "ERRC_REQUEST", SMOLVM_ERRC_REQUEST) < 0 ||
	    PyModule_AddIntConstant(module, "ERRC_CWD", SMOLVM_ERRC_CWD) < 0)
		return -1;
	if (PyModule_AddIntConstant(module, "AGENT_PORT", SMOLVM_AGENT_PORT) < 0)
		return -1;
	if (PyModule_AddIntConstant(module, "PROTO_MAGIC", SMOLVM_PROTO_MAGIC) < 0)
		return -1;
	if (PyModule_AddIntConstant(module, "MAX_PAYLOAD", SMOLVM_MAX_PAYLOAD) < 0)
		return -1;
	if (PyModule_AddIntConstant(module, "SETUP_ROOT", SMOLVM_SETUP_ROOT) < 0)
		return -1;
	return 0;
}

static int module_traverse(PyObject *module, visitproc visit, void *arg)
{
	module_state *st = module_get_state(module);
	Py_VISIT(st->protocol_error);
	Py_VISIT(st->exec_stream_type);
	Py_VISIT(st->pty_session_type);
	return 0;
}

static int module_clear(PyObject *module)
{
	module_state *st = module_get_state(module);
	Py_CLEAR(st->protocol_error);
	Py_CLEAR(st->exec_stream_type);
	Py_CLEAR(st->pty_session_type);
	return 0;
}

static void module_free(void *module)
{
	(void)module_clear((PyObject *)module);
}

static PyModuleDef_Slot module_slots[] = {
	{Py_mod_exec, (void *)module_exec_slot},
	{0, NULL},
};

static struct PyModuleDef module_def = {
	PyModuleDef_HEAD_INIT,
	.m_name = "smolvm._smolvm",
	.m_doc = "smolvm's native core: VMM process spawning, ctl lines, guest exec and file transfer, KVM probing.",
	.m_size = sizeof(module_state),
	.m_methods = module_methods,
	.m_slots = module_slots,
	.m_traverse = module_traverse,
	.m_clear = module_clear,
	.m_free = module_free,
};

PyMODINIT_FUNC PyInit__smolvm(void)
{
	return PyModuleDef_Init(&module_def);
}
