/* Snapshot save/restore of KVM VM and vCPU state in Firecracker's ioctl order, and the file format. */
#define _GNU_SOURCE
#include "snapshot.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "vcpu.h"
#include "vm.h"

#define SNAP_MAX_STATE (64u << 20)
#define SNAP_MAX_MSRS 256
#define SNAP_PAGE 4096ull

struct snap_header {
	char magic[8];
	uint32_t version;
	uint32_t header_size;
	uint64_t payload_len;
	uint64_t checksum; /* FNV-1a 64 of the payload */
	uint64_t mem_size;
	uint32_t nr_vcpus;
	uint32_t reserved[5];
};

struct snap_section_hdr {
	uint32_t type, index, len, pad;
};

static int snap_err(char *err, size_t errlen, int ret, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
	return ret;
}

static uint64_t snap_fnv(const uint8_t *p, size_t len)
{
	uint64_t h = 0xcbf29ce484222325ull;

	for (size_t i = 0; i < len; i++) {
		h ^= p[i];
		h *= 0x100000001b3ull;
	}
	return h;
}

void snap_put(struct snap_writer *w, uint32_t type, uint32_t index, const void *data, uint32_t len)
{
	struct snap_section_hdr h = { type, index, len, 0 };
	size_t need = sizeof(h) + (((size_t)len + 7) & ~(size_t)7);

	if (w->err)
		return;
	if (w->len + need > w->cap) {
		size_t cap = w->cap ? w->cap : 65536;
		uint8_t *nb;

		while (cap < w->len + need)
			cap *= 2;
		if (cap > SNAP_MAX_STATE) {
			w->err = -E2BIG;
			return;
		}
		nb = realloc(w->buf, cap);
		if (!nb) {
			w->err = -ENOMEM;
			return;
		}
		w->buf = nb;
		w->cap = cap;
	}
	memcpy(w->buf + w->len, &h, sizeof(h));
	memcpy(w->buf + w->len + sizeof(h), data, len);
	memset(w->buf + w->len + sizeof(h) + len, 0, need - sizeof(h) - len);
	w->len += need;
}

const void *snap_get(const struct snap_reader *r, uint32_t type, uint32_t index, uint32_t *len)
{
	size_t off = sizeof(struct snap_header);

	while (off + sizeof(struct snap_section_hdr) <= r->len) {
		struct snap_section_hdr h;
		size_t body;

		memcpy(&h, r->buf + off, sizeof(h));
		body = ((size_t)h.len + 7) & ~(size_t)7;
		if (body > r->len - off - sizeof(h))
			return NULL;
		if (h.type == type && h.index == index) {
			*len = h.len;
			return r->buf + off + sizeof(h);
		}
		off += sizeof(h) + body;
	}
	return NULL;
}

/* Fetch a section that must have exactly `len` bytes. */
static const void *snap_need(const struct snap_reader *r, uint32_t type, uint32_t index, uint32_t len)
{
	uint32_t got = 0;
	const void *p = snap_get(r, type, index, &got);

	return p && got == len ? p : NULL;
}

static int snap_get_msrs(struct vcpu *v, struct snap_writer *w)
{
	struct kvm_msr_list *list = NULL;
	struct kvm_msrs *msrs = NULL;
	uint32_t n = 0;
	int ret = 0, got;

	list = calloc(1, sizeof(*list) + SNAP_MAX_MSRS * sizeof(uint32_t));
	msrs = calloc(1, sizeof(*msrs) + SNAP_MAX_MSRS * sizeof(struct kvm_msr_entry));
	if (!list || !msrs) {
		ret = -ENOMEM;
		goto out;
	}
	list->nmsrs = SNAP_MAX_MSRS;
	if (ioctl(v->vm->kvm_fd, KVM_GET_MSR_INDEX_LIST, list) < 0) {
		ret = -errno;
		goto out;
	}
	for (uint32_t i = 0; i < list->nmsrs; i++)
		msrs->entries[n++].index = list->indices[i];
	/* KVM_GET_MSRS stops at the first MSR it can't read: drop that one and go on. */
	for (;;) {
		msrs->nmsrs = n;
		got = ioctl(v->fd, KVM_GET_MSRS, msrs);
		if (got < 0) {
			ret = -errno;
			goto out;
		}
		if ((uint32_t)got >= n)
			break;
		memmove(&msrs->entries[got], &msrs->entries[got + 1],
			(n - (uint32_t)got - 1) * sizeof(struct kvm_msr_entry));
		n--;
	}
	snap_put(w, SNAP_VCPU_MSRS, (uint32_t)v->id, msrs,
		 (uint32_t)(sizeof(*msrs) + n * sizeof(struct kvm_msr_entry)));
out:
	free(list);
	free(msrs);
	return ret;
}

/* One vCPU's state, in the order Firecracker saves it. */
static int snap_save_vcpu(struct vcpu *v, struct snap_writer *w, char *err, size_t errlen)
{
	uint32_t id = (uint32_t)v->id;
	struct kvm_mp_state mp;
	struct kvm_regs regs;
	struct kvm_sregs sregs;
	struct kvm_debugregs dbg;
	struct kvm_lapic_state lapic;
	struct kvm_vcpu_events ev;
	int xsave_size, ret;

#define SNAP_GET(req, obj, type)                                                               \
	do {                                                                                   \
		memset(&(obj), 0, sizeof(obj));                                                \
		if (ioctl(v->fd, req, &(obj)) < 0)                                             \
			return snap_err(err, errlen, -errno, "vCPU %u: " #req ": %s", id,      \
					strerror(errno));                                      \
		snap_put(w, type, id, &(obj), sizeof(obj));                                    \
	} while (0)

	SNAP_GET(KVM_GET_MP_STATE, mp, SNAP_VCPU_MP_STATE);
	SNAP_GET(KVM_GET_REGS, regs, SNAP_VCPU_REGS);
	SNAP_GET(KVM_GET_SREGS, sregs, SNAP_VCPU_SREGS);
	xsave_size = ioctl(v->vm->kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_XSAVE2);
	if (ioctl(v->vm->kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_XSAVE) > 0) {
		size_t sz = xsave_size > (int)sizeof(struct kvm_xsave) ? (size_t)xsave_size
								      : sizeof(struct kvm_xsave);
		struct kvm_xsave *xs = calloc(1, sz);

		if (!xs)
			return -ENOMEM;
		if (ioctl(v->fd, xsave_size > 0 ? KVM_GET_XSAVE2 : KVM_GET_XSAVE, xs) < 0) {
			ret = -errno;
			free(xs);
			return snap_err(err, errlen, ret, "vCPU %u: KVM_GET_XSAVE: %s", id,
					strerror(-ret));
		}
		snap_put(w, SNAP_VCPU_XSAVE, id, xs, (uint32_t)sz);
		free(xs);
	} else {
		struct kvm_fpu fpu;

		SNAP_GET(KVM_GET_FPU, fpu, SNAP_VCPU_FPU);
	}
	if (ioctl(v->vm->kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_XCRS) > 0) {
		struct kvm_xcrs xcrs;

		SNAP_GET(KVM_GET_XCRS, xcrs, SNAP_VCPU_XCRS);
	}
	SNAP_GET(KVM_GET_DEBUGREGS, dbg, SNAP_VCPU_DEBUGREGS);
	SNAP_GET(KVM_GET_LAPIC, lapic, SNAP_VCPU_LAPIC);
	ret = snap_get_msrs(v, w);
	if (ret)
		return snap_err(err, errlen, ret, "vCPU %u: MSRs: %s", id, strerror(-ret));
	SNAP_GET(KVM_GET_VCPU_EVENTS, ev, SNAP_VCPU_EVENTS);
	if (v->cpuid)
		snap_put(w, SNAP_VCPU_CPUID, id, v->cpuid, (uint32_t)v->cpuid_size);
#undef SNAP_GET
	return w->err;
}

static int snap_save_vm(struct vm *vm, struct snap_writer *w, char *err, size_t errlen)
{
	struct snap_vm_info info = { vm->mem_size, (uint32_t)vm->nr_vcpus, 0 };
	struct kvm_pit_state2 pit;
	struct kvm_clock_data clock;

	snap_put(w, SNAP_VM_INFO, 0, &info, sizeof(info));
	memset(&pit, 0, sizeof(pit));
	if (ioctl(vm->vm_fd, KVM_GET_PIT2, &pit) < 0)
		return snap_err(err, errlen, -errno, "KVM_GET_PIT2: %s", strerror(errno));
	snap_put(w, SNAP_VM_PIT, 0, &pit, sizeof(pit));
	memset(&clock, 0, sizeof(clock));
	if (ioctl(vm->vm_fd, KVM_GET_CLOCK, &clock) < 0)
		return snap_err(err, errlen, -errno, "KVM_GET_CLOCK: %s", strerror(errno));
	clock.flags = 0; /* restore as a plain clock value */
	snap_put(w, SNAP_VM_CLOCK, 0, &clock, sizeof(clock));
	for (uint32_t chip = 0; chip < 3; chip++) {
		struct kvm_irqchip ic;

		memset(&ic, 0, sizeof(ic));
		ic.chip_id = chip;
		if (ioctl(vm->vm_fd, KVM_GET_IRQCHIP, &ic) < 0)
			return snap_err(err, errlen, -errno, "KVM_GET_IRQCHIP %u: %s", chip,
					strerror(errno));
		snap_put(w, SNAP_VM_IRQCHIP, chip, &ic, sizeof(ic));
	}
	return w->err;
}

static int snap_write_all(int fd, const void *buf, size_t len, off_t off)
{
	const uint8_t *p = buf;

	while (len) {
		ssize_t n = pwrite(fd, p, len, off);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return n < 0 ? -errno : -EIO;
		p += n;
		len -= (size_t)n;
		off += n;
	}
	return 0;
}

static bool snap_zero_page(const uint8_t *p)
{
	const uint64_t *q = (const uint64_t *)(const void *)p;

	for (size_t i = 0; i < SNAP_PAGE / 8; i++)
		if (q[i])
			return false;
	return true;
}

/* Guest RAM into a sparse file: all-zero pages stay holes. */
static int snap_write_memory(struct vm *vm, const char *path, char *err, size_t errlen)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	int ret = 0;

	if (fd < 0)
		return snap_err(err, errlen, -errno, "create %s: %s", path, strerror(errno));
	for (uint64_t off = 0; off < vm->mem_size; off += SNAP_PAGE) {
		uint64_t run = off;

		if (snap_zero_page(vm->mem + off))
			continue;
		while (run + SNAP_PAGE < vm->mem_size && run - off < (8ull << 20) &&
		       !snap_zero_page(vm->mem + run + SNAP_PAGE))
			run += SNAP_PAGE;
		ret = snap_write_all(fd, vm->mem + off, run + SNAP_PAGE - off, (off_t)off);
		if (ret)
			goto out;
		off = run;
	}
	if (ftruncate(fd, (off_t)vm->mem_size) < 0 || fsync(fd) < 0)
		ret = -errno;
out:
	if (ret)
		snap_err(err, errlen, ret, "write %s: %s", path, strerror(-ret));
	close(fd);
	return ret;
}

static int snap_save(struct vm *vm, const char *dir, struct snap_writer *devices, bool memory,
		     char *err, size_t errlen)
{
	struct snap_writer w = { 0 };
	struct snap_header h;
	char path[4096], tmp[4200];
	int fd = -1, ret;

	if (mkdir(dir, 0700) < 0 && errno != EEXIST)
		return snap_err(err, errlen, -errno, "mkdir %s: %s", dir, strerror(errno));
	memset(&h, 0, sizeof(h));
	snap_put(&w, 0, 0, "", 0); /* reserve room for the header below */
	w.len = sizeof(h);
	ret = snap_save_vm(vm, &w, err, errlen);
	for (int i = 0; !ret && i < vm->nr_vcpus; i++)
		ret = snap_save_vcpu(vm->vcpus[i], &w, err, errlen);
	if (ret)
		goto out;
	if (devices && devices->len) {
		if (devices->err) {
			ret = snap_err(err, errlen, devices->err, "device state: %s",
				       strerror(-devices->err));
			goto out;
		}
		for (size_t off = 0; off < devices->len;) {
			struct snap_section_hdr sh;

			memcpy(&sh, devices->buf + off, sizeof(sh));
			snap_put(&w, sh.type, sh.index, devices->buf + off + sizeof(sh), sh.len);
			off += sizeof(sh) + (((size_t)sh.len + 7) & ~(size_t)7);
		}
	}
	if (w.err) {
		ret = snap_err(err, errlen, w.err, "state: %s", strerror(-w.err));
		goto out;
	}
	snprintf(path, sizeof(path), "%s/%s", dir, SNAP_MEMORY_FILE);
	ret = memory ? snap_write_memory(vm, path, err, errlen) : 0;
	if (ret)
		goto out;

	memcpy(h.magic, SNAP_MAGIC, 8);
	h.version = SNAP_VERSION;
	h.header_size = sizeof(h);
	h.payload_len = w.len - sizeof(h);
	h.checksum = snap_fnv(w.buf + sizeof(h), w.len - sizeof(h));
	h.mem_size = vm->mem_size;
	h.nr_vcpus = (uint32_t)vm->nr_vcpus;
	memcpy(w.buf, &h, sizeof(h));
	snprintf(path, sizeof(path), "%s/%s", dir, SNAP_STATE_FILE);
	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0) {
		ret = snap_err(err, errlen, -errno, "create %s: %s", tmp, strerror(errno));
		goto out;
	}
	ret = snap_write_all(fd, w.buf, w.len, 0);
	if (!ret && fsync(fd) < 0)
		ret = -errno;
	if (!ret && rename(tmp, path) < 0)
		ret = -errno;
	if (ret)
		snap_err(err, errlen, ret, "write %s: %s", path, strerror(-ret));
out:
	if (fd >= 0)
		close(fd);
	free(w.buf);
	return ret;
}

int snapshot_save(struct vm *vm, const char *dir, struct snap_writer *devices, char *err,
		  size_t errlen)
{
	return snap_save(vm, dir, devices, true, err, errlen);
}

int snapshot_save_state(struct vm *vm, const char *dir, struct snap_writer *sections, char *err,
			size_t errlen)
{
	return snap_save(vm, dir, sections, false, err, errlen);
}

/* Python's repr of a bytes value, as the magic appears in messages: b'SMOLSNAP'. */
static void snap_repr(const uint8_t *p, size_t n, char *out, size_t size)
{
	char q = memchr(p, '\'', n) && !memchr(p, '"', n) ? '"' : '\''; /* Python's choice of quote */
	size_t o = 0;

	o += (size_t)snprintf(out, size, "b%c", q);
	for (size_t i = 0; i < n && o < size; i++) {
		uint8_t c = p[i];

		if (c == '\\' || c == q)
			o += (size_t)snprintf(out + o, size - o, "\\%c", c);
		else if (c == '\t' || c == '\n' || c == '\r')
			o += (size_t)snprintf(out + o, size - o, "\\%c", c == '\t' ? 't' : c == '\n' ? 'n' : 'r');
		else if (c >= 0x20 && c < 0x7f)
			o += (size_t)snprintf(out + o, size - o, "%c", c);
		else
			o += (size_t)snprintf(out + o, size - o, "\\x%02x", c);
	}
	if (o < size)
		snprintf(out + o, size - o, "%c", q);
}

/* A missing file is an incomplete snapshot (named as the file alone); other errors cannot be read. */
static int snap_stat(const char *dir, const char *name, struct stat *st, char *err, size_t errlen)
{
	char path[4096];

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	if (stat(path, st) == 0)
		return S_ISREG(st->st_mode) ? 0 : snap_err(err, errlen, -ENOENT, "%s is missing (incomplete snapshot)", name);
	if (errno == ENOENT || errno == ENOTDIR)
		return snap_err(err, errlen, -ENOENT, "%s is missing (incomplete snapshot)", name);
	return snap_err(err, errlen, -errno, "cannot read it: %s: %s", path, strerror(errno));
}

int snapshot_open(const char *dir, struct snap_reader *r, struct snap_vm_info *info, char *err,
		  size_t errlen)
{
	char path[4096], magic[48];
	struct snap_header h;
	struct stat st, mst;
	const struct snap_vm_info *vi;
	uint32_t len;
	int fd = -1, ret = 0;
	size_t got = 0, payload;

	r->buf = NULL;
	r->len = 0;
	ret = snap_stat(dir, SNAP_STATE_FILE, &st, err, errlen);
	if (!ret)
		ret = snap_stat(dir, SNAP_MEMORY_FILE, &mst, err, errlen);
	if (ret)
		return ret;
	snprintf(path, sizeof(path), "%s/%s", dir, SNAP_STATE_FILE);
	if (st.st_size < (off_t)sizeof(h))
		return snap_err(err, errlen, -EINVAL, "%s is truncated (%lld bytes, shorter than its %zu-byte header)",
				path, (long long)st.st_size, sizeof(h));
	if (st.st_size > SNAP_MAX_STATE)
		return snap_err(err, errlen, -EINVAL,
				"%s is %lld bytes, more than any smolvm snapshot state: not a smolvm snapshot", path,
				(long long)st.st_size);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return snap_err(err, errlen, -errno, "cannot read it: %s: %s", path, strerror(errno));
	r->buf = malloc((size_t)st.st_size);
	if (!r->buf) {
		ret = -ENOMEM;
		goto out;
	}
	while (got < (size_t)st.st_size) {
		ssize_t n = read(fd, r->buf + got, (size_t)st.st_size - got);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			ret = snap_err(err, errlen, -EIO, "cannot read it: %s: %s", path,
				       n < 0 ? strerror(errno) : "file shrank while read");
			goto out;
		}
		got += (size_t)n;
	}
	r->len = got;
	payload = got - sizeof(h);
	memcpy(&h, r->buf, sizeof(h));
	if (memcmp(h.magic, SNAP_MAGIC, 8)) {
		snap_repr((const uint8_t *)h.magic, sizeof(h.magic), magic, sizeof(magic));
		ret = snap_err(err, errlen, -EINVAL, "%s is not a smolvm snapshot state (bad magic %s)", path, magic);
		goto out;
	}
	if (h.version != SNAP_VERSION || h.header_size != sizeof(h)) {
		ret = snap_err(err, errlen, -EINVAL, "%s has snapshot format version %u; this smolvm reads %u", path,
			       h.version, SNAP_VERSION);
		goto out;
	}
	if (payload < h.payload_len) {
		ret = snap_err(err, errlen, -EINVAL, "%s is truncated (%zu of %llu payload bytes)", path, payload,
			       (unsigned long long)h.payload_len);
		goto out;
	}
	if (payload > h.payload_len) {
		ret = snap_err(err, errlen, -EINVAL, "%s has %llu stray bytes after its payload (corrupt)", path,
			       (unsigned long long)(payload - h.payload_len));
		goto out;
	}
	if (snap_fnv(r->buf + sizeof(h), payload) != h.checksum) {
		ret = snap_err(err, errlen, -EINVAL, "%s fails its checksum (corrupt)", path);
		goto out;
	}
	if (!h.nr_vcpus) {
		ret = snap_err(err, errlen, -EINVAL, "%s describes a VM without vCPUs (corrupt)", path);
		goto out;
	}
	vi = snap_get(r, SNAP_VM_INFO, 0, &len);
	if (!vi || len != sizeof(*vi) || vi->mem_size != h.mem_size || vi->nr_vcpus != h.nr_vcpus ||
	    vi->nr_vcpus > VM_MAX_VCPUS) {
		ret = snap_err(err, errlen, -EINVAL, "%s has an invalid VM description (corrupt)", path);
		goto out;
	}
	*info = *vi;
	if ((uint64_t)mst.st_size != info->mem_size) {
		snprintf(path, sizeof(path), "%s/%s", dir, SNAP_MEMORY_FILE);
		ret = snap_err(err, errlen, -EINVAL, "%s is %s: %lld bytes, the guest has %llu", path,
			       (uint64_t)mst.st_size < info->mem_size ? "truncated" : "too long",
			       (long long)mst.st_size, (unsigned long long)info->mem_size);
		goto out;
	}
out:
	if (fd >= 0)
		close(fd);
	if (ret)
		snapshot_reader_free(r);
	return ret;
}

void snapshot_reader_free(struct snap_reader *r)
{
	free(r->buf);
	r->buf = NULL;
	r->len = 0;
}

int snapshot_memory_fd(const char *dir, char *err, size_t errlen)
{
	char path[4096];
	int fd;

	snprintf(path, sizeof(path), "%s/%s", dir, SNAP_MEMORY_FILE);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return snap_err(err, errlen, -errno, "snapshot memory %s: %s", path, strerror(errno));
	return fd;
}

static int snap_set(int fd, unsigned long req, const void *data, const char *what, int id,
		    char *err, size_t errlen)
{
	if (ioctl(fd, req, data) < 0)
		return snap_err(err, errlen, -errno, "restore vCPU %d: %s: %s", id, what,
				strerror(errno));
	return 0;
}

static int snap_restore_vcpu(struct vcpu *v, const struct snap_reader *r, char *err, size_t errlen)
{
	uint32_t id = (uint32_t)v->id, len = 0;
	const void *p;
	int ret;

#define SNAP_SET(type, req, sz)                                                                \
	do {                                                                                   \
		p = snap_need(r, type, id, sz);                                                \
		if (!p)                                                                        \
			return snap_err(err, errlen, -EINVAL, "snapshot lacks " #type " of vCPU %u", \
					id);                                                   \
		ret = snap_set(v->fd, req, p, #req, v->id, err, errlen);                       \
		if (ret)                                                                       \
			return ret;                                                            \
	} while (0)

	p = snap_get(r, SNAP_VCPU_CPUID, id, &len);
	if (p && len >= sizeof(struct kvm_cpuid2)) {
		const struct kvm_cpuid2 *c = p;

		if ((uint64_t)c->nent * sizeof(struct kvm_cpuid_entry2) > len - sizeof(*c))
			return snap_err(err, errlen, -EINVAL, "snapshot CPUID of vCPU %u is bad", id);
		ret = snap_set(v->fd, KVM_SET_CPUID2, p, "KVM_SET_CPUID2", v->id, err, errlen);
		if (ret)
			return ret;
	}
	SNAP_SET(SNAP_VCPU_MP_STATE, KVM_SET_MP_STATE, sizeof(struct kvm_mp_state));
	SNAP_SET(SNAP_VCPU_REGS, KVM_SET_REGS, sizeof(struct kvm_regs));
	SNAP_SET(SNAP_VCPU_SREGS, KVM_SET_SREGS, sizeof(struct kvm_sregs));
	p = snap_get(r, SNAP_VCPU_XSAVE, id, &len);
	if (p) {
		if (len < sizeof(struct kvm_xsave))
			return snap_err(err, errlen, -EINVAL, "snapshot XSAVE of vCPU %u is short", id);
		ret = snap_set(v->fd, KVM_SET_XSAVE, p, "KVM_SET_XSAVE", v->id, err, errlen);
		if (ret)
			return ret;
	} else {
		SNAP_SET(SNAP_VCPU_FPU, KVM_SET_FPU, sizeof(struct kvm_fpu));
	}
	if (snap_get(r, SNAP_VCPU_XCRS, id, &len))
		SNAP_SET(SNAP_VCPU_XCRS, KVM_SET_XCRS, sizeof(struct kvm_xcrs));
	SNAP_SET(SNAP_VCPU_DEBUGREGS, KVM_SET_DEBUGREGS, sizeof(struct kvm_debugregs));
	SNAP_SET(SNAP_VCPU_LAPIC, KVM_SET_LAPIC, sizeof(struct kvm_lapic_state));
	p = snap_get(r, SNAP_VCPU_MSRS, id, &len);
	if (!p || len < sizeof(struct kvm_msrs) ||
	    (uint64_t)((const struct kvm_msrs *)p)->nmsrs * sizeof(struct kvm_msr_entry) >
		    len - sizeof(struct kvm_msrs))
		return snap_err(err, errlen, -EINVAL, "snapshot MSRs of vCPU %u are bad", id);
	{
		const struct kvm_msrs *m = p;
		int n = ioctl(v->fd, KVM_SET_MSRS, m);

		if (n < 0 || (uint32_t)n != m->nmsrs)
			return snap_err(err, errlen, -EINVAL, "restore vCPU %u: KVM_SET_MSRS set %d of %u",
					id, n, m->nmsrs);
	}
	SNAP_SET(SNAP_VCPU_EVENTS, KVM_SET_VCPU_EVENTS, sizeof(struct kvm_vcpu_events));
#undef SNAP_SET
	/* Tell the guest's kvmclock it was paused, so its watchdogs don't fire. */
	ioctl(v->fd, KVM_KVMCLOCK_CTRL, 0);
	return 0;
}

int snapshot_restore_kvm(struct vm *vm, const struct snap_reader *r, char *err, size_t errlen)
{
	const void *p;
	int ret;

	p = snap_need(r, SNAP_VM_PIT, 0, sizeof(struct kvm_pit_state2));
	if (!p || ioctl(vm->vm_fd, KVM_SET_PIT2, p) < 0)
		return snap_err(err, errlen, p ? -errno : -EINVAL, "restore PIT failed");
	p = snap_need(r, SNAP_VM_CLOCK, 0, sizeof(struct kvm_clock_data));
	if (!p || ioctl(vm->vm_fd, KVM_SET_CLOCK, p) < 0)
		return snap_err(err, errlen, p ? -errno : -EINVAL, "restore kvmclock failed");
	for (uint32_t chip = 0; chip < 3; chip++) {
		p = snap_need(r, SNAP_VM_IRQCHIP, chip, sizeof(struct kvm_irqchip));
		if (!p || ioctl(vm->vm_fd, KVM_SET_IRQCHIP, p) < 0)
			return snap_err(err, errlen, p ? -errno : -EINVAL, "restore irqchip %u failed",
					chip);
	}
	for (int i = 0; i < vm->nr_vcpus; i++) {
		ret = snap_restore_vcpu(vm->vcpus[i], r, err, errlen);
		if (ret)
			return ret;
	}
	return 0;
}
