#!/usr/bin/env python3
"""Writes the seed corpora in fuzz/seeds/<target>/ (committed; rerun after a
format change). Needs qemu-img and qemu-io, and for the machine-state seeds a
built snapvmm (SNAPVMM_BIN, default target/release/snapvmm) and /dev/kvm.

Usage: python3 fuzz/make-seeds.py
"""
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = os.path.join(ROOT, "fuzz", "seeds")


def put(target, name, data):
    d = os.path.join(SEEDS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# --- QMP: first byte is the read size, the rest a session ---------------------
def qmp_seeds():
    cmds = [
        {"execute": "qmp_capabilities"},
        {"execute": "query-status", "id": 1},
        {"execute": "stop"},
        {"execute": "cont", "id": "x"},
        {"execute": "query-migrate"},
        {"execute": "migrate-set-capabilities",
         "arguments": {"capabilities": [{"capability": "background-snapshot", "state": True}]}},
        {"execute": "migrate-set-parameters", "arguments": {"x-snapshot-method": "fork"}},
        {"execute": "migrate", "arguments": {"uri": "file:/tmp/x.snap"}},
        {"execute": "snapshot-save",
         "arguments": {"job-id": "j", "tag": "t", "vmstate": "disk0", "devices": ["disk0"]}},
        {"execute": "query-jobs"},
        {"execute": "human-monitor-command", "arguments": {"command-line": "info snapshots"}},
        {"execute": "human-monitor-command", "arguments": {"command-line": "savevm s1"}},
        {"execute": "query-commands"},
        {"execute": "query-cpus-fast"},
        {"execute": "system_powerdown"},
    ]
    full = b"".join(json.dumps(c).encode() + b"\n" for c in cmds)
    put("qmp_session", "session", b"\x05" + full)
    put("qmp_session", "one-byte-reads", b"\x00" + full[:400])
    put("qmp_session", "oob-and-errors",
        b"\x10" + b'{"execute":"qmp_capabilities"}{"exec-oob":"migrate-pause"}'
        b'{"execute":"query-status","id":{"a":[1,2,{"b":null}]}}'
        b'{"execute":"x","execute":"y"}[1,2]"str"\xff\xfe{"arguments":{}}\n')
    put("qmp_session", "nesting", b"\x03" + b"[" * 40 + b"]" * 40 + b'{"execute":"qmp_capabilities"}')


# --- snapshot image (livesnap format v1, FORMAT.md) ---------------------------
def image(ranges, dev):
    """ranges: [(gpa, bytes)], each a multiple of 4 KiB and < 2 MiB."""
    pos = 4096
    layout = []
    for gpa, data in ranges:
        off = (pos + 4095) & ~4095
        layout.append((gpa, len(data), off, data))
        pos = off + len(data)
    dev_off = (pos + 4095) & ~4095
    file_len = dev_off + len(dev)
    h = bytearray(4096)
    h[0:8] = b"SNAPVMM\x00"
    struct.pack_into("<IIII", h, 8, 1, 4096, 4096, len(layout))
    struct.pack_into("<QQQ", h, 24, file_len, dev_off, len(dev))
    struct.pack_into("<II", h, 48, zlib.crc32(dev), 0)
    struct.pack_into("<Q", h, 56, sum(n for _, n, _, _ in layout))
    for i, (gpa, n, off, _) in enumerate(layout):
        struct.pack_into("<QQQ", h, 64 + 24 * i, gpa, n, off)
    struct.pack_into("<I", h, 4092, zlib.crc32(bytes(h[:4092])))
    out = bytearray(file_len)
    out[:4096] = h
    for _, n, off, data in layout:
        out[off:off + n] = data
    out[dev_off:] = dev
    return bytes(out)


def image_seeds():
    page = bytes(range(256)) * 16
    put("snapshot_image", "two-ranges", image([(0, page), (0x100000, bytes(4096) + page)], b'{"v":1}'))
    put("snapshot_image", "zero-range", image([(0x1000, bytes(8192))], b""))


# --- machine state: a real VM's, saved through QMP -----------------------------
class Qmp:
    def __init__(self, path):
        for _ in range(200):
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                time.sleep(0.05)
        self.f = self.s.makefile("rwb")
        self.f.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "return" in r or "error" in r:
                return r


def device_state(img_path):
    with open(img_path, "rb") as f:
        h = f.read(4096)
        dev_off, dev_len = struct.unpack_from("<QQ", h, 32)
        f.seek(dev_off)
        return f.read(dev_len)


def machine_state_seeds():
    binary = os.environ.get("SNAPVMM_BIN", os.path.join(ROOT, "target", "release", "snapvmm"))
    tmp = tempfile.mkdtemp()
    try:
        disk = os.path.join(tmp, "d.raw")
        with open(disk, "wb") as f:
            f.truncate(1 << 20)
        for name, extra in [("1cpu", []), ("2cpu-disk", ["--cpus", "2", "--disk", disk])]:
            sock = os.path.join(tmp, name + ".sock")
            vm = subprocess.Popen([binary, "run", "--mem", "32M", "--qmp", "unix:" + sock,
                                   "--serial", "none", "--cmdline", "workload=memwrite region=1M"] + extra)
            try:
                q = Qmp(sock)
                time.sleep(0.5)
                out = os.path.join(tmp, name + ".snap")
                q.cmd("migrate-set-capabilities",
                      capabilities=[{"capability": "background-snapshot", "state": True}])
                q.cmd("migrate", uri="file:" + out)
                for _ in range(200):
                    st = q.cmd("query-migrate")["return"].get("status")
                    if st in ("completed", "failed"):
                        break
                    time.sleep(0.05)
                assert st == "completed", st
                put("machine_state", name, device_state(out))
            finally:
                vm.kill()
                vm.wait()
    finally:
        shutil.rmtree(tmp)


# --- virtio-blk: flags, log2 size, desc/avail/used, rounds, guest memory -------
def virtio_seeds():
    def desc(addr, n, flags, nxt):
        return struct.pack("<QIHH", addr, n, flags, nxt)

    def seed(flags, kind, table_indirect=False):
        mem = bytearray(0xa000 + 1024)
        hdr = struct.pack("<IIQ", kind, 0, 2)
        mem[0x8000:0x8010] = hdr
        chain = desc(0x8000, 16, 1, 1) + desc(0xa000, 1024, 1 | (2 if kind == 0 else 0), 2) + desc(0x9000, 1, 2, 0)
        if table_indirect:
            mem[0x5000:0x5030] = chain
            mem[0x1000:0x1010] = desc(0x5000, 48, 4, 0)
        else:
            mem[0x1000:0x1030] = chain
        struct.pack_into("<HHH", mem, 0x2000, 0, 1, 0)  # avail: flags, idx, ring[0]
        struct.pack_into("<H", mem, 0x2000 + 4 + 2 * 8, 0)  # used_event
        mem[0xa000:0xa400] = bytes(range(256)) * 4
        return bytes([flags, 3]) + struct.pack("<HHH", 0x1000, 0x2000, 0x3000) + b"\x00" + bytes(mem)

    put("virtio_blk", "read", seed(0, 0))
    put("virtio_blk", "write", seed(0, 1))
    put("virtio_blk", "indirect-event-idx-read", seed(3, 0, True))
    put("virtio_blk", "flush-readonly", seed(4, 4))


# --- virtio-net: flags, log2 size, 3 x desc/avail/used, rounds, frame length, memory
def virtio_net_seeds():
    def desc(addr, n, flags, nxt):
        return struct.pack("<QIHH", addr, n, flags, nxt)

    def seed(flags):
        mem = bytearray(0xc000)
        # rx: two 2 KiB buffers; tx: header + 60-byte frame; ctrl: announce ack.
        mem[0x1000:0x1020] = desc(0x8000, 2048, 2, 0) + desc(0x8800, 2048, 2, 0)
        struct.pack_into("<HHHH", mem, 0x2000, 0, 2, 0, 1)
        mem[0x4000:0x4020] = desc(0xa000, 12, 1, 1) + desc(0xa00c, 60, 0, 0)
        struct.pack_into("<HHH", mem, 0x5000, 0, 1, 0)
        mem[0xa00c:0xa048] = bytes(range(60))
        mem[0x7000:0x7020] = desc(0xb000, 2, 1, 1) + desc(0xb100, 1, 2, 0)
        struct.pack_into("<HHH", mem, 0x7800, 0, 1, 0)
        mem[0xb000:0xb002] = bytes([3, 0])
        geometry = struct.pack("<9H", 0x1000, 0x2000, 0x3000, 0x4000, 0x5000, 0x6000, 0x7000, 0x7800, 0x7c00)
        return bytes([flags, 3]) + geometry + b"\x00" + struct.pack("<H", 100) + bytes(mem)

    put("virtio_net", "plain", seed(0))
    put("virtio_net", "merged-csum-ctrl-announce", seed(0x4F))
    put("virtio_net", "indirect-event-idx", seed(0x34))


# --- virtio-vsock: flags, log2 size, 3 x desc/avail/used, rounds, memory ------
def virtio_vsock_seeds():
    def desc(addr, n, flags, nxt):
        return struct.pack("<QIHH", addr, n, flags, nxt)

    def hdr(src_port, dst_port, op, length=0):
        # src_cid 3 (the device's guest), dst_cid 2 (the host), stream.
        return struct.pack("<QQIIIHHIII", 3, 2, src_port, dst_port, length, 1, op, 0, 65536, 0)

    def seed(flags, packets):
        mem = bytearray(0xc000)
        mem[0x1000:0x1020] = desc(0x8000, 4140, 2, 0) + desc(0x9100, 4140, 2, 0)
        struct.pack_into("<HHHH", mem, 0x2000, 0, 2, 0, 1)
        tx = b""
        at = 0xa000
        for i, (h, payload) in enumerate(packets):
            mem[at:at + 44] = h
            mem[at + 44:at + 44 + len(payload)] = payload
            tx += desc(at, 44 + len(payload), 0, 0)
            at += 0x100
        mem[0x4000:0x4000 + len(tx)] = tx
        struct.pack_into("<HH", mem, 0x5000, 0, len(packets))
        for i in range(len(packets)):
            struct.pack_into("<H", mem, 0x5004 + 2 * i, i)
        mem[0x7000:0x7010] = desc(0xb000, 8, 2, 0)
        struct.pack_into("<HHH", mem, 0x7800, 0, 1, 0)
        geometry = struct.pack("<9H", 0x1000, 0x2000, 0x3000, 0x4000, 0x5000, 0x6000, 0x7000, 0x7800, 0x7c00)
        return bytes([flags, 3]) + geometry + b"\x00" + bytes(mem)

    put("virtio_vsock", "request-to-host", seed(0, [(hdr(1234, 6000, 1), b"")]))
    put("virtio_vsock", "response-then-rw", seed(3, [(hdr(5, 1 << 30, 2), b""), (hdr(5, 1 << 30, 5, 5), b"hello")]))
    put("virtio_vsock", "shutdown-rst-reset", seed(4, [(hdr(5, 1 << 30, 4), b""), (hdr(5, 1 << 30, 3), b"")]))


# --- qcow2: images made by QEMU's tools ---------------------------------------
def qcow2_seeds():
    tmp = tempfile.mkdtemp()
    try:
        made = {}
        for name, opts, io in [
            ("v3-empty", "compat=1.1,cluster_size=512", []),
            ("v2-data", "compat=0.10,cluster_size=512", ["write -P 0x5a 0 4k", "write -P 7 60k 2k"]),
            ("v3-refbits-data", "compat=1.1,cluster_size=1024,refcount_bits=4", ["write -P 1 512 8k"]),
        ]:
            p = os.path.join(tmp, name)
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, p, "64K"], check=True)
            for c in io:
                subprocess.run(["qemu-io", "-f", "qcow2", "-c", c, p], check=True, capture_output=True)
            made[name] = p
        p = made["v2-data"] + "-snap"
        shutil.copy(made["v2-data"], p)
        subprocess.run(["qemu-img", "snapshot", "-c", "s1", p], check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 9 0 1k", p], check=True, capture_output=True)
        made["v2-snapshot"] = p
        for name, p in made.items():
            with open(p, "rb") as f:
                data = f.read()
            put("qcow2_open_read", name, data)
            # A script of 8 ops: write, write, snapshot, write, apply, delete, write, flush.
            ops = [(0, 0x1234), (1, 0x7_0100), (2, 5), (0, 0x2_0200), (4, 0), (3, 0), (1, 0x10), (5, 0)]
            script = b"".join(bytes([o]) + a.to_bytes(7, "little") for o, a in ops)
            put("qcow2_write", name, bytes([len(ops)]) + script + data)
    finally:
        shutil.rmtree(tmp)


# --- virtio-pci: 12-byte accesses (kind, offset, size-1, value) ----------------
def virtio_pci_seeds():
    def op(kind, off, size, value):
        return struct.pack("<BHBQ", kind, off, size - 1, value)

    cfg_w, bar_w, mem_w = 0, 2, 4
    setup = [op(cfg_w, 0x84, 4, 0x8000 << 16)]  # MSI-X on
    for v in range(3):
        e = 0x4000 + 16 * v
        setup += [op(bar_w, e, 4, 0xFEE00000), op(bar_w, e + 8, 4, 0x40 + v), op(bar_w, e + 12, 4, 0)]
    setup += [op(bar_w, 0x14, 1, 3), op(bar_w, 0x08, 4, 1), op(bar_w, 0x0C, 4, 1),
              op(bar_w, 0x08, 4, 0), op(bar_w, 0x0C, 4, 1 << 12), op(bar_w, 0x14, 1, 11)]
    for q in range(2):
        b = 0x1000 + 0x3000 * q
        setup += [op(bar_w, 0x16, 2, q), op(bar_w, 0x18, 2, 8), op(bar_w, 0x1A, 2, q + 1),
                  op(bar_w, 0x20, 8, b), op(bar_w, 0x28, 8, b + 0x1000), op(bar_w, 0x30, 8, b + 0x2000),
                  op(bar_w, 0x1C, 2, 1)]
    setup += [op(bar_w, 0x14, 1, 15)]
    # A read request on queue 0: header, data, status descriptors, avail idx 1.
    body = [op(mem_w, 0x1000 // 8, 8, 0x8000), op(mem_w, 0x1008 // 8, 8, 16 | (1 << 32) | (1 << 48)),
            op(mem_w, 0x2002 // 8, 8, 1 << 16), op(bar_w, 0x3000, 2, 0), op(5, 0, 1, 0),
            op(bar_w, 0x3004, 2, 1), op(3, 0x1000, 1, 0), op(bar_w, 0x14, 1, 0)]
    put("virtio_pci", "setup-two-queues", b"".join(setup + body))
    put("virtio_pci", "bar-sizing", b"".join([op(cfg_w, 0x10, 4, 0xFFFFFFFF), op(1, 0x10, 4, 0),
                                              op(cfg_w, 0x10, 4, 0xC0010000), op(cfg_w, 0x04, 2, 0)]))


if __name__ == "__main__":
    virtio_pci_seeds()
    qmp_seeds()
    image_seeds()
    virtio_seeds()
    virtio_net_seeds()
    virtio_vsock_seeds()
    qcow2_seeds()
    if "--no-vm" not in sys.argv:
        machine_state_seeds()
    for t in sorted(os.listdir(SEEDS)):
        files = os.listdir(os.path.join(SEEDS, t))
        print(f"{t}: {len(files)} seeds")
