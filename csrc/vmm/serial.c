/* 16550A model: enough of the register file for Linux's 8250 driver, THRE interrupts, loopback MSR. */
#define _GNU_SOURCE
#include "serial.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#ifdef SMOLVM_TEST_HOOKS
#include <sys/syscall.h>
#endif

#include "snapshot.h"
#include "vm.h"

#define SERIAL_IRQ 4

enum {
	UART_RBR_THR = 0, UART_IER = 1, UART_IIR_FCR = 2, UART_LCR = 3,
	UART_MCR = 4, UART_LSR = 5, UART_MSR = 6, UART_SCR = 7,
};

#define IER_RDI 0x01
#define IER_THRI 0x02
#define IIR_NO_INT 0x01
#define IIR_THRI 0x02
#define IIR_RDI 0x04
#define IIR_FIFO_BITS 0xc0
#define LCR_DLAB 0x80
#define MCR_LOOP 0x10
#define LSR_DR 0x01
#define LSR_THRE 0x20
#define LSR_TEMT 0x40
#define FCR_FIFO_ENABLE 0x01

struct serial {
	struct vm *vm;
	int out_fd;
	pthread_mutex_t lock;
	uint8_t ier, lcr, mcr, scr, fcr, dll, dlm;
	bool thre_pending; /* THR-empty interrupt raised and not yet seen through IIR */
	int irq_level;
	uint8_t buf[256];  /* transmit bytes, flushed per line or when full */
	size_t len;
};

struct serial *serial_new(struct vm *vm, int out_fd)
{
	struct serial *s = calloc(1, sizeof(*s));

	if (!s)
		return NULL;
	s->vm = vm;
	s->out_fd = out_fd;
	s->dll = 0x0c;
	pthread_mutex_init(&s->lock, NULL);
	return s;
}

static void serial_flush(struct serial *s)
{
	size_t off = 0;

	while (s->out_fd >= 0 && off < s->len) {
		ssize_t n = write(s->out_fd, s->buf + off, s->len - off);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		off += (size_t)n;
	}
	s->len = 0;
}

void serial_free(struct serial *s)
{
	if (!s)
		return;
	serial_flush(s);
	pthread_mutex_destroy(&s->lock);
	free(s);
}

static uint8_t serial_iir(struct serial *s)
{
	uint8_t fifo = (s->fcr & FCR_FIFO_ENABLE) ? IIR_FIFO_BITS : 0;

	if ((s->ier & IER_THRI) && s->thre_pending)
		return fifo | IIR_THRI;
	return fifo | IIR_NO_INT;
}

static void serial_update_irq(struct serial *s)
{
	int level = !(serial_iir(s) & IIR_NO_INT);

	if (level != s->irq_level) {
		s->irq_level = level;
		vm_irq_line(s->vm, SERIAL_IRQ, level);
	}
}

static uint8_t serial_msr(struct serial *s)
{
	if (s->mcr & MCR_LOOP) {
		/* Loopback: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD. */
		return (uint8_t)(((s->mcr & 0x01) << 5) | ((s->mcr & 0x02) << 3) |
				 ((s->mcr & 0x04) << 4) | ((s->mcr & 0x08) << 4));
	}
	return 0xb0; /* DCD | DSR | CTS */
}

static void serial_read(struct serial *s, uint16_t off, uint8_t *data)
{
	switch (off) {
	case UART_RBR_THR:
		*data = (s->lcr & LCR_DLAB) ? s->dll : 0;
		break;
	case UART_IER:
		*data = (s->lcr & LCR_DLAB) ? s->dlm : s->ier;
		break;
	case UART_IIR_FCR:
		*data = serial_iir(s);
		if ((*data & 0x0f) == IIR_THRI)
			s->thre_pending = false;
		break;
	case UART_LCR:
		*data = s->lcr;
		break;
	case UART_MCR:
		*data = s->mcr;
		break;
	case UART_LSR:
		*data = LSR_THRE | LSR_TEMT;
		break;
	case UART_MSR:
		*data = serial_msr(s);
		break;
	default:
		*data = s->scr;
		break;
	}
}

static void serial_write(struct serial *s, uint16_t off, uint8_t v)
{
	switch (off) {
	case UART_RBR_THR:
		if (s->lcr & LCR_DLAB) {
			s->dll = v;
			break;
		}
		if (s->mcr & MCR_LOOP)
			break; /* loopback: nothing leaves the UART */
		s->buf[s->len++] = v;
#ifdef SMOLVM_TEST_HOOKS
		/* test builds only (tests/test_sysfilter.py): a device path making a forbidden call */
		if (v == '\n' && memmem(s->buf, s->len, "smolvm-test-forbidden-syscall", 29))
			syscall(SYS_getppid);
#endif
		if (v == '\n' || s->len == sizeof(s->buf))
			serial_flush(s);
		s->thre_pending = true; /* transmitted at once: THR empty again */
		break;
	case UART_IER:
		if (s->lcr & LCR_DLAB) {
			s->dlm = v;
			break;
		}
		if (!(s->ier & IER_THRI) && (v & IER_THRI))
			s->thre_pending = true;
		s->ier = v & 0x0f;
		break;
	case UART_IIR_FCR:
		s->fcr = v & 0xc9;
		break;
	case UART_LCR:
		s->lcr = v;
		break;
	case UART_MCR:
		s->mcr = v & 0x1f;
		break;
	case UART_SCR:
		s->scr = v;
		break;
	default:
		break;
	}
}

void serial_io(struct serial *s, uint16_t off, uint8_t *data, bool is_write)
{
	if (!s || off > 7)
		return;
	pthread_mutex_lock(&s->lock);
	if (is_write)
		serial_write(s, off, *data);
	else
		serial_read(s, off, data);
	serial_update_irq(s);
	pthread_mutex_unlock(&s->lock);
}

void serial_pio(void *s, uint16_t off, uint8_t *data, uint32_t size, bool is_write)
{
	if (size == 1)
		serial_io(s, off, data, is_write);
	else if (!is_write)
		memset(data, 0xff, size);
}

struct serial_snap {
	uint8_t ier, lcr, mcr, scr, fcr, dll, dlm, thre_pending;
	int32_t irq_level;
};

void serial_save(struct serial *s, struct snap_writer *w)
{
	struct serial_snap st;

	pthread_mutex_lock(&s->lock);
	serial_flush(s);
	st = (struct serial_snap){ s->ier, s->lcr, s->mcr, s->scr, s->fcr, s->dll, s->dlm,
				   s->thre_pending, s->irq_level };
	pthread_mutex_unlock(&s->lock);
	snap_put(w, SNAP_DEV_SERIAL, 0, &st, sizeof(st));
}

int serial_restore(struct serial *s, const struct snap_reader *r)
{
	const struct serial_snap *st;
	uint32_t len = 0;

	st = snap_get(r, SNAP_DEV_SERIAL, 0, &len);
	if (!st || len != sizeof(*st))
		return -EINVAL;
	pthread_mutex_lock(&s->lock);
	s->ier = st->ier;
	s->lcr = st->lcr;
	s->mcr = st->mcr;
	s->scr = st->scr;
	s->fcr = st->fcr;
	s->dll = st->dll;
	s->dlm = st->dlm;
	s->thre_pending = st->thre_pending;
	s->irq_level = st->irq_level; /* the irqchip state carries the line itself */
	pthread_mutex_unlock(&s->lock);
	return 0;
}
