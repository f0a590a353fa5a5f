#!/usr/bin/env python3
"""Write the seed corpus tests/fuzz/corpus/<target>/ from the traffic the unit tests exchange.

Each seed is one well-formed exchange in the harness's input format (see the comment at the top of
each tests/fuzz/fuzz_<target>.c): Linux-style virtio set-up and requests for the devices, and the
frames of csrc/proto.h as the host and the agent send them. Run it again after a format change.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent
# the protocol version of the tree: seeds follow csrc/proto.h (rerun this script after a bump)
MAGIC = int(re.search(r"#define SMOLVM_PROTO_MAGIC (0x[0-9a-fA-F]+)u", (HERE.parents[1] / "csrc" / "proto.h").read_text())[1], 16)
EXEC, STDOUT, STDERR, EXIT, ERROR, SETUP, PUT, READY, DATA, GET, STDIN, PTY, RESIZE = range(1, 14)


def frame(kind: int, payload: bytes = b"") -> bytes:
    return struct.pack("<IHHI", MAGIC, kind, 0, len(payload)) + payload


def exit_frame(code: int = 0, sig: int = 0, flags: int = 0) -> bytes:
    return frame(EXIT, struct.pack("<iiI", code, sig, flags))


def error_frame(err: int, msg: bytes) -> bytes:
    return frame(ERROR, struct.pack("<i", err) + msg)


def exec_payload(cmd: bytes, cwd: bytes, env: list[bytes], timeout_ms: int = 0) -> bytes:
    return struct.pack("<II", timeout_ms, len(env)) + cmd + b"\0" + cwd + b"\0" + b"".join(e + b"\0" for e in env)


def queue_seeds() -> dict[str, bytes]:
    def ram(size: int, start: int, chains: list[list[tuple[int, int, int]]]) -> bytes:
        mem = bytearray(0x1800)
        d = 0
        heads = []
        for chain in chains:
            heads.append(d)
            for k, (addr, length, flags) in enumerate(chain):
                nxt = d + 1 if k + 1 < len(chain) else 0
                struct.pack_into("<QIHH", mem, 16 * d, addr, length, flags | (1 if k + 1 < len(chain) else 0), nxt)
                d += 1
        for i, h in enumerate(heads):
            struct.pack_into("<H", mem, 0x400 + 4 + 2 * ((start + i) % size), h)
        struct.pack_into("<HH", mem, 0x400, 0, (start + len(heads)) & 0xFFFF)
        head = struct.pack("<HHHHH", size, 0, 0x400, 0x800, start) + bytes(range(0, 160, 10))
        head += struct.pack("<QQQ", 0xFFFFF000 | 1, 0x2000, 6 << 30)  # vm_gpa: just below the MMIO gap
        return head + bytes(mem)

    blk = [(0x1000, 16, 0), (0x1100, 512, 2), (0x1400, 1, 2)]
    vsock_tx = [(0x1000, 44, 0), (0x1100, 100, 0)]
    return {
        "blk_read": ram(8, 0, [blk]),
        "wrap": ram(8, 0xFFFE, [blk, vsock_tx, [(0x1200, 4096, 2)]]),
        "many": ram(64, 100, [[(0x1000 + 32 * i, 32, 2)] for i in range(20)]),
    }


def mmio_records(recs: list[tuple[int, int, int, int]]) -> bytes:
    return b"".join(struct.pack("<BBHI", op, ln, off, val) for op, ln, off, val in recs)


def mmio_seeds() -> dict[str, bytes]:
    w = lambda off, v: (0, 4, off, v)  # noqa: E731
    r = lambda off: (1, 4, off, 0)  # noqa: E731
    ram = lambda addr, v: (2, 0, addr // 4, v)  # noqa: E731
    probe = [r(0x000), r(0x004), r(0x008), r(0x00C), w(0x070, 0), w(0x070, 3), w(0x014, 0), r(0x010), w(0x014, 1), r(0x010)]
    feats = [w(0x024, 0), w(0x020, 1 << 3), w(0x024, 1), w(0x020, 1 | 1 << 8), w(0x070, 11), r(0x070)]
    queue = [w(0x030, 0), r(0x044), r(0x034), w(0x038, 8), w(0x080, 0x1000), w(0x084, 0), w(0x090, 0x2000),
             w(0x094, 0), w(0x0A0, 0x3000), w(0x0A4, 0), w(0x044, 1), r(0x044)]  # fmt: skip
    chain = [ram(0x1000, 0x8000), ram(0x1004, 0), ram(0x1008, 64), ram(0x100C, 2), ram(0x2000, 1 << 16),
             ram(0x2004, 0)]  # fmt: skip
    live = [w(0x070, 15), w(0x050, 0), r(0x060), w(0x064, 1), (0, 4, 0x100, 7), (1, 8, 0x100, 0), (1, 1, 0x117, 0)]
    return {
        "linux_init": mmio_records(probe + feats + queue + chain + live),
        "bad_ring": mmio_records(probe + feats + [w(0x030, 1), w(0x038, 3), w(0x044, 1), w(0x070, 15)]),
        "reset_live": mmio_records(probe + feats + queue + live + [w(0x070, 0), r(0x044)] + probe),
    }


def blk_req(kind: int, sector: int, segs: list[tuple[int, int, int]], kick: int = 1) -> bytes:
    out = struct.pack("<BBIB", len(segs), kind, sector, kick)
    return out + b"".join(struct.pack("<BBH", where, df, ln) for where, df, ln in segs)


def blk_seeds() -> dict[str, bytes]:
    hdr, st = (0, 0, 16), (1, 2, 1)
    read = blk_req(0, 8, [hdr, (2, 2, 4096), st])
    write = blk_req(1, 8, [hdr, (3, 0, 512), (4, 0, 512), st])
    flush = blk_req(4, 0, [hdr, st])
    get_id = blk_req(8, 0, [hdr, (5, 2, 20), st])
    return {
        "read": b"\0" + read,
        "write_read_flush": b"\0" + write + read + flush + get_id,
        "readonly_write": b"\1" + write + read,
        "end_of_disk": b"\0" + blk_req(0, 2047, [hdr, (2, 2, 512), st]) + blk_req(0, 2047, [hdr, (2, 2, 1024), st]),
    }


def vsock_tx(op: int, fix: int = 1, split: int = 0, payload: bytes = b"", flags: int = 0, buf_alloc: int = 1 << 18,
             fwd_cnt: int = 0, ports: tuple[int, int] | None = None) -> bytes:  # fmt: skip
    out = struct.pack("<BBBBHBBII", 1, 0, fix, split, len(payload), op, flags, buf_alloc, fwd_cnt)
    if not fix & 1:
        assert ports is not None
        out += struct.pack("<II", *ports)
    return out + payload[:64]


def vsock_seeds() -> dict[str, bytes]:
    connect = bytes([0, 0, 2])
    settle = bytes([7, 8])
    consume = bytes([3, 0])
    REQUEST, RESPONSE, RST, SHUTDOWN, RW, CREDIT_UPDATE, CREDIT_REQUEST = range(1, 8)
    up = connect + settle + consume + vsock_tx(RESPONSE) + settle + consume
    host_write = bytes([4, 0]) + struct.pack("<H", 3000) + settle + consume
    guest_write = vsock_tx(RW, payload=b"hello from the guest " * 3, fwd_cnt=3000) + settle + bytes([5, 0])
    return {
        "established": up + host_write + guest_write,
        "credit": up + vsock_tx(CREDIT_UPDATE, buf_alloc=100) + host_write + vsock_tx(CREDIT_REQUEST) + settle
        + consume + bytes([2, 3, 0, 0, 0]) + settle + consume,
        "shutdown": up + guest_write + vsock_tx(SHUTDOWN, flags=1) + settle + vsock_tx(SHUTDOWN, flags=3) + settle
        + consume + vsock_tx(RST) + settle,
        "host_close": up + host_write + bytes([6, 8]) + settle + consume + vsock_tx(RST) + settle,
        "ready_port": vsock_tx(REQUEST, fix=0, ports=(1234, 53)) + settle + consume,
        "refused": connect + settle + consume + vsock_tx(RST) + settle + consume,
        "reset": up + bytes([8, 0]) + settle + consume + bytes([10, 8]) + settle + connect + settle + consume,
        "rx_shapes": bytes([2, 4, 3, 7, 0]) + bytes([2, 2, 2, 5, 0]) + up + host_write,
    }


def agent_seeds() -> dict[str, bytes]:
    hs = b"CONNECT 52\n"
    ex = frame(EXEC, exec_payload(b"echo hi", b"/tmp", [b"A=1", b"PATH=/usr/bin"], 1000))
    su = frame(SETUP, struct.pack("<QIIII", 1, 16, 6, 0, 0) + bytes(range(16)) + b"smolvm")
    put = frame(PUT, struct.pack("<QII", 10, 0o644, 0) + b"/tmp/x\0") + frame(DATA, b"01234") + frame(DATA, b"56789")
    get = frame(GET, b"/tmp/somefile\0")
    pty = frame(PTY, struct.pack("<IIHHI", 0, 1, 24, 80, 0) + b"bash\0/tmp\0A=1\0")
    pty += frame(STDIN, b"ls\n") + frame(RESIZE, struct.pack("<HHI", 40, 100, 0)) + frame(STDIN, b"")
    return {
        "exec_unix": b"\1" + hs + ex,
        "exec_vsock": b"\0" + ex,
        "setup": b"\0" + su,
        "put": b"\0" + put,
        "put_empty": b"\0" + frame(PUT, struct.pack("<QII", 0, 0o600, 0) + b"/tmp/empty\0"),
        "get": b"\0" + get,
        "get_dir": b"\1" + hs + frame(GET, b"/tmp/\0"),
        "pty": b"\0" + pty,
    }


def exec_client_seeds() -> dict[str, bytes]:
    ok = b"OK 1024\n"
    return {
        "echo": b"\0" + ok + frame(STDOUT, b"hi\n") + exit_frame(),
        "env_stderr": b"\2" + ok + frame(STDOUT, b"a") + frame(STDERR, b"oops\n") + frame(STDOUT, b"b") + exit_frame(3),
        "timeout": b"\0" + ok + exit_frame(124, 9, 1),
        "error": b"\0" + ok + error_frame(2, b"cwd /nope: No such file or directory"),
        "setup": b"\1" + ok + exit_frame(),
    }


def file_client_seeds() -> dict[str, bytes]:
    ok = b"OK 1025\n"
    return {
        "put": b"\0\4" + ok + frame(READY) + exit_frame(),
        "put_error": b"\0\4" + ok + error_frame(21, b"PUT /tmp/x: Is a directory"),
        "get": b"\1\0" + ok + frame(READY, struct.pack("<QII", 10, 0o100644, 0)) + frame(DATA, b"01234")
        + frame(DATA, b"56789") + exit_frame(),
        "get_empty": b"\1\0" + ok + frame(READY, struct.pack("<QII", 0, 0o100600, 0)) + exit_frame(),
        "get_error": b"\1\0" + ok + error_frame(2, b"GET /tmp/x: No such file or directory"),
    }


def serial_seeds() -> dict[str, bytes]:
    # Linux's 8250 probe and console set-up: LCR/DLAB divisor, FIFO, MCR loopback test, IER, then text
    probe = [(3, 0x80), (0, 0x01), (1, 0x00), (3, 0x03), (2, 0x07), (4, 0x10), (0x86, 0), (4, 0x0B), (1, 0x02),
             (0x82, 0), (0x85, 0)]  # fmt: skip
    text = [(0, c) for c in b"Linux version 6.1\n"] + [(0x85, 0), (0x82, 0)]
    return {"linux_console": bytes(b for rec in probe + text for b in rec), "long_line": bytes([0, 65] * 300)}


def _ipv4(proto: int, dst: bytes, l4: bytes) -> bytes:
    eth = bytes.fromhex("9a559a559a55" "525400123456" "0800")
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0x4000, 64, proto, 0, bytes([10, 0, 2, 15]), dst)
    return eth + ip + l4


def net_filter_seeds() -> dict[str, bytes]:
    # option byte (bit 0: allow 10.0.2.0/24, bit 1: allow *.test, bit 2: 10.0.2.2 learned, bits 4-7: answers), frame
    gw, dns = bytes([10, 0, 2, 2]), bytes([10, 0, 2, 3])
    syn = struct.pack(">HHIIBBHHH", 49153, 8080, 1000, 0, 5 << 4, 0x02, 64240, 0, 0)
    ack = struct.pack(">HHIIBBHHH", 49153, 8080, 1000, 77, 5 << 4, 0x10, 64240, 0, 0) + b"data"
    q = struct.pack(">HHHHHH", 0xABCD, 0x0100, 1, 0, 0, 1) + b"\x01a\x04test\x00" + struct.pack(">HH", 1, 1)
    q += b"\x00" + struct.pack(">HHIH", 41, 1232, 0, 0)  # EDNS OPT
    udp = struct.pack(">HHHH", 40000, 53, 8 + len(q), 0) + q
    ping = struct.pack(">BBHHH", 8, 0, 0, 1, 1) + b"abcdefgh"
    arp = bytes.fromhex("ffffffffffff" "525400123456" "0806") + bytes(28)
    return {
        "syn_blocked": b"\x00" + _ipv4(6, gw, syn),
        "ack_learned": b"\x04" + _ipv4(6, gw, ack),
        "dns_allowed": b"\x22" + _ipv4(17, dns, udp),
        "dns_refused": b"\x00" + _ipv4(17, dns, udp),
        "udp_blocked": b"\x00" + _ipv4(17, bytes([127, 0, 0, 9]), struct.pack(">HHHH", 4096, 123, 12, 0) + b"ping"),
        "icmp_echo": b"\x00" + _ipv4(1, gw, ping),
        "arp": b"\x01" + arp,
        "ipv6": b"\x01" + bytes.fromhex("9a559a559a55" "525400123456" "86dd") + bytes(40),
    }


SEEDS = {
    "queue": queue_seeds,
    "mmio": mmio_seeds,
    "blk": blk_seeds,
    "vsock": vsock_seeds,
    "agent": agent_seeds,
    "exec_client": exec_client_seeds,
    "file_client": file_client_seeds,
    "serial": serial_seeds,
    "net_filter": net_filter_seeds,
}


def main() -> None:
    for target, make in SEEDS.items():
        folder = HERE / "corpus" / target
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in make().items():
            (folder / name).write_bytes(data)


if __name__ == "__main__":
    main()
