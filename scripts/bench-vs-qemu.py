#!/usr/bin/env python3
"""Live snapshots side by side: snapvmm (fork, uffd) against QEMU's background-snapshot.

Usage: scripts/bench-vs-qemu.py [--sizes 1G,4G,8G] [--snapshots 3] [--hot 100]
                                [--settle 4] [--after 4] [--restores 3] [--fresh|--keep]
                                [--dir target/bench] [--bin target/release/snapvmm]
                                [--qemu qemu-system-x86_64] [--json out.json] [--chart out.svg]

Both VMMs boot the identical reference guest (`snapvmm export-guest`; 1 vCPU,
memwrite over 7/8 of RAM, `hot=` when --hot is below 100) and are driven over QMP.
QEMU runs with `-accel kvm -M pc -cpu host,-arch-capabilities` and the guest's
`tsc_khz=` taken from snapvmm's ready line (`vmware-cpuid-freq=on,+invtsc` would
block QEMU's migration). Per RAM size, --snapshots rounds of: a plain write of
the region's bytes (1 MiB writes + fdatasync), then a snapshot with snapvmm `fork`,
with snapvmm `uffd` (`migrate-set-parameters x-snapshot-method`, capability
`background-snapshot`), and with QEMU (capability `background-snapshot`,
`max-bandwidth` raised, `migrate file:PATH`) — interleaved, so drift on this noisy
host hits all three alike. Only one guest runs at a time: with --keep both VMs stay
booted and the idle one is `stop`ped; with --fresh (the default when 3x the RAM
size is not available) every snapshot gets a newly booted VM. Before each snapshot
the guest has finished its first pass and run --settle more seconds.

Per snapshot: the pause (snapvmm: x-downtime-us; QEMU: query-migrate's `downtime`,
whole ms), the longest gap the guest felt (its maxgap_us reports), the guest's page
writes/s before → inside (median of per-second reports wholly inside the capture;
– for a capture under a second, the chart then uses the reports covering it) →
after, the total time (query-migrate total-time plus an fsync of the image, which
QEMU does not do itself; snapvmm's `completed` follows its own fsync) against a
plain write of the image's bytes at this round's disk speed, the extra host memory
(peak PSS minus PSS before, sampled every 50 ms: snapvmm and its children; QEMU),
and the image size. Then, with the guests shut down, --restores rounds of restoring
the last images: snapvmm `--incoming file:PATH` (lazy, copy and uffd), process start →
query-status running; QEMU `-incoming defer` + `migrate-incoming`, process start →
running; and warm: snapvmm `--incoming defer --restore-mode uffd --mem SIZE` (the VM
built ahead) and QEMU `-incoming defer`, `migrate-incoming` → running. The first
restore of each kind keeps the guest running for two reports and fails on any
CORRUPT line.

Output: markdown tables on stdout, all data with --json, and with --chart an SVG
(written by hand, no plotting library) with grouped bars of the pause (log scale)
and the guest's page writes/s inside the capture per RAM size and VMM/method.
"""
import argparse
import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

_spec = importlib.util.spec_from_file_location("bs", os.path.join(os.path.dirname(__file__), "bench-snapshot.py"))
bs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bs)

KINDS = [("snapvmm", "fork"), ("snapvmm", "uffd"), ("qemu", "background-snapshot")]
FINAL = ("completed", "failed", "cancelled")


def label(vmm, method):
    return f"snapvmm {method}" if vmm == "snapvmm" else "QEMU"


class Guest:
    """A VMM process running the reference guest, with time-stamped report lines."""

    def __init__(self, vmm, cmd, sock):
        self.vmm = vmm
        if os.path.exists(sock):
            os.unlink(sock)
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        self.reports = []  # (host time, pages, maxgap_us, passes)
        self.gaps = []  # per report, its longest gap: (start, end) in host time
        self.stalls = []  # per report: (host time, its stalls=... counts by length)
        self.corrupt = []
        self.ready = None
        self.stderr = b""
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()
        self.q = bs.Qmp(sock)

    def _read(self):
        for line in self.p.stdout:
            t = time.monotonic()
            line = line.decode(errors="replace").strip()
            if line.startswith("refguest: cpu="):
                kv = dict(x.split("=", 1) for x in line.split()[1:] if "=" in x)
                try:
                    self.reports.append((t, int(kv["pages"]), int(kv["maxgap_us"]), int(kv["passes"])))
                    if "stalls" in kv:
                        self.stalls.append((t, [int(x) for x in kv["stalls"].split(".")]))
                    # Where the longest gap lay on this host's clock (end, start).
                    if "gap_ago_us" in kv:
                        end = t - int(kv["gap_ago_us"]) / 1e6
                        self.gaps.append((end - int(kv["maxgap_us"]) / 1e6, end))
                except (KeyError, ValueError):
                    pass  # a line cut short when the VM quit
            elif line.startswith("refguest: ready"):
                self.ready = line
            elif "CORRUPT" in line:
                self.corrupt.append(line)

    def _read_err(self):
        # Line by line, so what a running VMM said is there before it ends.
        for line in self.p.stderr:
            self.stderr += line

    def wait_for(self, pred, what, timeout=300):
        end = time.time() + timeout
        while not pred():
            if time.time() > end or self.p.poll() is not None:
                sys.exit(f"{self.vmm}: {what} did not happen (exit {self.p.poll()}); "
                         f"stderr: {self.stderr.decode(errors='replace')[-2000:]}")
            time.sleep(0.05)

    def settle(self, since, n):
        """Waits for a report after `since` showing pass 1 done (the whole region
        written), then for n more; returns the time of that first report."""
        self.wait_for(lambda: any(r[0] > since and r[3] >= 1 for r in self.reports), "pass 1")
        t1 = next(r[0] for r in self.reports if r[0] > since and r[3] >= 1)
        self.wait_for(lambda: sum(r[0] > t1 for r in self.reports) >= n, f"{n} reports")
        return t1

    def status(self):
        return self.q.cmd("query-status")["status"]

    def quit(self):
        try:
            self.q.cmd("quit")
        except Exception:
            pass
        try:
            self.p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


class Setup:
    def __init__(self, a, elf):
        self.a = a
        self.elf = elf
        self.tsc_khz = None

    def cmdline(self, size, qemu):
        region = bs.parse_size(size) * 7 // 8 >> 20
        c = f"workload=memwrite region={region}M"
        if self.a.hot != 100:
            c += f" hot={self.a.hot}"
        if qemu:
            c += f" tsc_khz={self.tsc_khz}"
        return c

    def qemu_cmd(self, size, sock, incoming=False):
        cmd = [self.a.qemu, "-accel", "kvm", "-M", "pc", "-cpu", "host,-arch-capabilities",
               "-m", size, "-smp", "1", "-kernel", self.elf, "-append", self.cmdline(size, True),
               "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-serial", "stdio",
               "-display", "none", "-nodefaults", "-no-user-config", "-qmp", f"unix:{sock},server=on,wait=off"]
        return cmd + (["-incoming", "defer"] if incoming else [])

    def boot(self, vmm, size, tag):
        sock = os.path.join(self.a.dir, f"vsq-{vmm}-{tag}.sock")
        if vmm == "snapvmm":
            g = Guest(vmm, [self.a.bin, "run", "--qmp", f"unix:{sock}", "--mem", size, "--cpus", "1",
                            "--serial", "stdio", "--cmdline", self.cmdline(size, False)], sock)
            g.wait_for(lambda: g.ready is not None, "the ready line")
            if self.tsc_khz is None:
                self.tsc_khz = int(next(w for w in g.ready.split() if w.startswith("tsc_khz="))[8:])
            g.q.cmd("migrate-set-capabilities", capabilities=[{"capability": "background-snapshot", "state": True}])
        else:
            g = Guest(vmm, self.qemu_cmd(size, sock), sock)
            g.q.cmd("migrate-set-capabilities", capabilities=[{"capability": "background-snapshot", "state": True}])
            g.q.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
        return g


# The reference guest's stall buckets (stalls=...): gaps of at least these
# microseconds, up to the next bound.
STALL_US = [50, 100, 200, 500, 1000, 2000, 5000, 10000]


def stall_p99_ms(counts, top_ms):
    """The p99 of the stalls counted (the upper bound of the bucket that
    holds it; the longest gap seen, `top_ms`, for the open last bucket, or
    where it is shorter); None without stalls."""
    total = sum(counts)
    if not total:
        return None
    seen = 0
    for k, c in enumerate(counts):
        seen += c
        if seen >= 0.99 * total:
            bound = STALL_US[k + 1] / 1000 if k + 1 < len(STALL_US) else top_ms
            return min(bound, top_ms)
    return top_ms


def snapshot(g, method, image, settled_at, after, wp_pool_mib=None, wp_pool_max_mib=None):
    """One live snapshot of a settled guest; returns its figures."""
    if g.vmm == "snapvmm":
        g.q.cmd("migrate-set-parameters", **{"x-snapshot-method": method})
        if method == "uffd" and wp_pool_mib:
            size = wp_pool_mib << 20
            g.q.cmd("migrate-set-parameters", **{"x-wp-pool-size": size, "x-wp-pool-max-size": size})
        if method == "uffd" and wp_pool_max_mib is not None:
            g.q.cmd("migrate-set-parameters", **{"x-wp-pool-max-size": wp_pool_max_mib << 20})
    if os.path.exists(image):
        os.unlink(image)
    base = bs.pss_kib(g.p.pid)
    peak = base
    before_t = time.monotonic()
    g.q.cmd("migrate", uri=f"file:{image}")
    t_start = time.monotonic()
    while True:
        peak = max(peak, bs.pss_kib(g.p.pid))
        m = g.q.cmd("query-migrate")
        if m.get("status") in FINAL:
            break
        time.sleep(0.05)
    t_done = time.monotonic()
    if m["status"] != "completed":
        sys.exit(f"{g.vmm} {method}: snapshot {m['status']}: {m.get('error-desc', m)}")
    fd = os.open(image, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    fsync_ms = (time.monotonic() - t_done) * 1000
    if g.status() != "running":
        sys.exit(f"{g.vmm} {method}: the guest is not running after the snapshot")
    time.sleep(after)
    rep = g.reports
    during = [r for r in rep if t_start < r[0] <= t_done + 1.0]
    steady = [r for r in rep if settled_at < r[0] <= before_t]
    if g.vmm == "snapvmm":
        pause_ms = m["x-downtime-us"] / 1000
    else:
        pause_ms = float(m["downtime"])
    st = os.stat(image)
    waits = m.get("x-write-protect", {}).get("fault-waits", {}).get("all", {})
    stalls = [0] * len(STALL_US)
    for t, c in g.stalls:
        if t_start < t <= t_done + 1.0:
            stalls = [a + b for a, b in zip(stalls, c)]
    maxgap_ms = max((r[2] for r in during), default=0) / 1000
    # Where the longest gap lay: its start after `migrate` was sent, ms (the
    # capture ends at total_ms).
    inside = [gp for gp in g.gaps if t_start - 0.5 < gp[1] <= t_done + 1.0]
    longest = max(inside, key=lambda gp: gp[1] - gp[0], default=None)
    gap_at_ms = (longest[0] - before_t) * 1000 if longest else None
    return {
        "fault_p99_ms": waits["p99-us"] / 1000 if waits else None,
        "fault_max_ms": waits["max-us"] / 1000 if waits else None,
        "faults": waits.get("count"),
        "pause_ms": pause_ms,
        "guest_maxgap_ms": maxgap_ms,
        "guest_stalls": stalls,
        "guest_maxgap_at_ms": gap_at_ms,
        "guest_stall_p99_ms": stall_p99_ms(stalls, maxgap_ms),
        "maxgap_before_ms": statistics.median([r[2] for r in steady] or [0]) / 1000,
        "total_ms": m["total-time"] + fsync_ms,
        "vmm_total_ms": m["total-time"],
        "fsync_ms": fsync_ms,
        "extra_mib": max(0, peak - base) / 1024,
        "image_bytes": st.st_size,
        "image_mib": st.st_blocks * 512 / 2**20,
        "rate_before": bs.rate(rep, settled_at, before_t),
        "rate_during": bs.rate(rep, t_start, t_done + 1.0),
        "rate_inside": bs.rate_inside(rep, t_start, t_done),
        "rate_after": bs.rate(rep, t_done + 1.0, t_done + 1.0 + after),
        "query_migrate": {k: v for k, v in m.items() if k.startswith("x-") or k in ("downtime", "setup-time")},
    }


def plain_write_s(path, size):
    return size / (bs.plain_write(path, size) * 1e6)


def restore(s, kind, size, image, n, verify):
    sock = os.path.join(s.a.dir, f"vsq-restore-{n}.sock")
    t0 = time.perf_counter()
    t_in = None
    if kind == "qemu":
        g = Guest("qemu", s.qemu_cmd(size, sock, incoming=True), sock)
        t_in = time.perf_counter()
        g.q.cmd("migrate-incoming", uri=f"file:{image}")
    elif kind == "warm":
        # The VM is built ahead (--incoming defer, RAM size known): the clock
        # that matters starts at migrate-incoming.
        g = Guest("snapvmm", [s.a.bin, "run", "--incoming", "defer", "--restore-mode", "uffd",
                              "--mem", size, "--qmp", f"unix:{sock}", "--serial", "stdio"], sock)
        time.sleep(0.2)
        t_in = time.perf_counter()
        g.q.cmd("migrate-incoming", uri=f"file:{image}")
    else:
        g = Guest("snapvmm", [s.a.bin, "run", "--incoming", f"file:{image}", "--restore-mode", kind,
                              "--qmp", f"unix:{sock}", "--serial", "stdio"], sock)
    while True:
        st = g.status()
        if st == "running":
            break
        if st in ("shutdown", "internal-error", "guest-panicked") or g.p.poll() is not None:
            sys.exit(f"restore {kind}: status {st}: {g.q.cmd('query-migrate')}")
        if time.perf_counter() - t0 > 600:
            sys.exit(f"restore {kind}: still {st} after 600 s")
        time.sleep(0.0005)
    ms = (time.perf_counter() - t0) * 1000
    incoming_ms = (time.perf_counter() - t_in) * 1000 if t_in is not None else None
    if verify:
        t = time.monotonic()
        g.wait_for(lambda: sum(r[0] > t for r in g.reports) >= 2, "two reports after the restore")
    g.quit()
    if g.corrupt:
        sys.exit(f"restore {kind}: the guest found corruption: {g.corrupt}")
    return ms, incoming_ms


def mem_available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) << 10
    return 0


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def tables(a, snaps, restores, disks):
    print(f"Reference guest, 1 vCPU, memwrite over 7/8 of RAM{'' if a.hot == 100 else f', hot={a.hot}'}; "
          f"{a.snapshots} interleaved rounds; medians (min–max)\n")
    print("| RAM | VMM | pause (VMM) | guest felt: median, max (usual) | guest stall p99 "
          "| fault waits p99 / max (VMM) | total (plain write) | extra host mem | image | guest page writes/s: before → inside → after |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    def mm(xs, key, digits):
        v = med([r[key] for r in xs])
        return "–" if v is None else f"{v / 1e6:.{digits}f}M"

    for size in a.sizes.split(","):
        for vmm, method in KINDS:
            xs = [r for r in snaps if r["size"] == size and r["vmm"] == vmm and r["method"] == method]
            if not xs:
                continue
            p = [r["pause_ms"] for r in xs]
            felt = [r["guest_maxgap_ms"] for r in xs]
            p99 = [r.get("fault_p99_ms") for r in xs if r.get("fault_p99_ms") is not None]
            fmax = [r.get("fault_max_ms") for r in xs if r.get("fault_max_ms") is not None]
            waits = f"{med(p99):.2f} / {max(fmax):.2f} ms" if p99 else "–"
            sp = [r.get("guest_stall_p99_ms") for r in xs]
            sp = [x for x in sp if x is not None]
            stall = f"≤ {max(sp):g} ms ({sum(sum(r.get('guest_stalls') or []) for r in xs)})" if sp else "–"
            print(f"| {size} | {label(vmm, method)} | {med(p):.2f} ms ({min(p):.2f}–{max(p):.2f}) "
                  f"| {med(felt):.1f}, {max(felt):.1f} ms ({med([r['maxgap_before_ms'] for r in xs]):.1f}) "
                  f"| {stall} | {waits} "
                  f"| {med([r['total_ms'] for r in xs]):.0f} ms ({med([r['plain_ms'] for r in xs]):.0f}) "
                  f"| {med([r['extra_mib'] for r in xs]):.0f} MiB ({max(r['extra_mib'] for r in xs):.0f} max) "
                  f"| {med([r['image_mib'] for r in xs]):.0f} MiB "
                  f"| {mm(xs, 'rate_before', 1)} → {mm(xs, 'rate_inside', 2)} "
                  f"(covering: {mm(xs, 'rate_during', 2)}) → {mm(xs, 'rate_after', 1)} |")
    print("\npause: snapvmm x-downtime-us, QEMU `downtime` (whole ms); guest felt: longest gap between two page "
          "writes in the reports covering the capture, median and max over the rounds (usual: median before); "
          "guest stall p99: of the guest's stalls (gaps of 50 us or more) in those reports, the length 99 % stay "
          "under (the guest counts them in buckets 50/100/200/500 us, 1/2/5/10 ms: the bucket's upper bound, "
          "the largest over the rounds; in brackets how many stalls, all rounds); "
          "fault waits: the write-protect engine's per-fault wait (x-write-protect fault-waits, all causes), "
          "median of the rounds' p99 and the longest; total: query-migrate total-time + "
          "fsync of the image (plain: the image's bytes at this round's plain-write speed); inside: median of "
          "per-second reports wholly inside the capture, covering: the reports that overlap it.")
    if restores:
        print(f"\nRestore, process start → query-status running, {a.restores} interleaved runs; median (min–max)\n")
        print("| RAM | snapvmm lazy | snapvmm copy | snapvmm uffd | QEMU (-incoming defer + migrate-incoming) "
              "| warm: snapvmm migrate-incoming → running | warm: QEMU migrate-incoming → running |")
        print("|---|---|---|---|---|---|---|")
        for size in a.sizes.split(","):
            cells = []
            for kind, key in (("lazy", "ms"), ("copy", "ms"), ("uffd", "ms"), ("qemu", "ms"),
                              ("warm", "incoming_ms"), ("qemu", "incoming_ms")):
                xs = [r[key] for r in restores if r["size"] == size and r["kind"] == kind]
                cells.append(f"{med(xs):.1f} ms ({min(xs):.1f}–{max(xs):.1f})" if xs else "–")
            print(f"| {size} | " + " | ".join(cells) + " |")
    print("\nplain write (1 MiB writes + fdatasync) of the region, per round: " + ", ".join(
        f"{d['size']} {d['mbps']:.0f} MB/s" for d in disks))


COLORS = {("snapvmm", "fork"): "#4c78a8", ("snapvmm", "uffd"): "#72b7b2", ("qemu", "background-snapshot"): "#e45756"}


def chart(path, a, snaps):
    """Two panels of grouped bars (medians, with min–max whiskers)."""
    sizes = a.sizes.split(",")
    kinds = [k for k in KINDS if any((r["vmm"], r["method"]) == k for r in snaps)]
    W, H, top, bottom, left = 470, 360, 50, 60, 70
    pw, ph = W - left - 20, H - top - bottom
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * W}" height="{H + 60}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{2 * W}" height="{H + 60}" fill="white"/>']

    def stats(size, kind, key):
        xs = [r[key] for r in snaps if r["size"] == size and (r["vmm"], r["method"]) == kind and r[key] is not None]
        return (statistics.median(xs), min(xs), max(xs)) if xs else None

    def panel(x0, title, key, log, unit, fallback=None, marker=None):
        data = {}
        starred = set()
        for size in sizes:
            for k in kinds:
                v = stats(size, k, key)
                if v is None and fallback:
                    v = stats(size, k, fallback)
                    if v:
                        starred.add((size, k))
                data[size, k] = v
        vals = [x for v in data.values() if v for x in v]
        if marker:
            vals += [v[0] for s in sizes for k in kinds if (v := stats(s, k, marker))]
        vals = [x for x in vals if x > 0] or [1]
        if log:
            lo = 10 ** math.floor(math.log10(min(vals)))
            hi = 10 ** math.ceil(math.log10(max(vals)))
            if hi <= lo:
                hi = lo * 10
            ticks = [lo * 10 ** i for i in range(int(round(math.log10(hi / lo))) + 1)]

            def y(v):
                v = max(v, lo)
                return top + ph - ph * math.log10(v / lo) / math.log10(hi / lo)
        else:
            lo, raw = 0, max(vals) * 1.1
            step = 10 ** math.floor(math.log10(raw / 5))
            step = next(m * step for m in (1, 2, 5, 10) if raw / (m * step) <= 6)
            hi = step * math.ceil(raw / step)
            ticks = [i * step for i in range(int(round(hi / step)) + 1)]

            def y(v):
                return top + ph - ph * v / hi
        out.append(f'<text x="{x0 + left + pw / 2}" y="22" text-anchor="middle" font-size="14" '
                   f'font-weight="bold">{title}</text>')
        for t in ticks:
            yy = y(t)
            out.append(f'<line x1="{x0 + left}" x2="{x0 + left + pw}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#ddd"/>')
            out.append(f'<text x="{x0 + left - 6}" y="{yy + 4:.1f}" text-anchor="end">{t:g}</text>')
        out.append(f'<text x="{x0 + 16}" y="{top + ph / 2}" text-anchor="middle" '
                   f'transform="rotate(-90 {x0 + 16} {top + ph / 2})">{unit}</text>')
        out.append(f'<line x1="{x0 + left}" x2="{x0 + left}" y1="{top}" y2="{top + ph}" stroke="black"/>')
        out.append(f'<line x1="{x0 + left}" x2="{x0 + left + pw}" y1="{top + ph}" y2="{top + ph}" stroke="black"/>')
        gw = pw / len(sizes)
        bw = gw * 0.8 / max(1, len(kinds))
        for i, size in enumerate(sizes):
            gx = x0 + left + i * gw + gw * 0.1
            out.append(f'<text x="{x0 + left + (i + 0.5) * gw:.1f}" y="{top + ph + 18}" '
                       f'text-anchor="middle">{size} RAM</text>')
            for j, k in enumerate(kinds):
                v = data[size, k]
                if not v:
                    continue
                bx = gx + j * bw
                yb = y(v[0])
                out.append(f'<rect x="{bx + 1:.1f}" y="{yb:.1f}" width="{bw - 2:.1f}" height="{top + ph - yb:.1f}" '
                           f'fill="{COLORS[k]}"><title>{label(*k)} {size}: {v[0]:.3g} {unit}</title></rect>')
                cx = bx + bw / 2
                out.append(f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{y(v[1]):.1f}" y2="{y(v[2]):.1f}" stroke="black"/>')
                star = "*" if (size, k) in starred else ""
                if top + ph - yb > 18:  # inside the bar, clear of whiskers and markers
                    out.append(f'<text x="{cx:.1f}" y="{top + ph - 6:.1f}" text-anchor="middle" font-size="10" '
                               f'fill="white">{v[0]:.3g}{star}</text>')
                else:
                    out.append(f'<text x="{cx:.1f}" y="{min(yb, y(v[2])) - 4:.1f}" text-anchor="middle" '
                               f'font-size="10">{v[0]:.3g}{star}</text>')
                if marker and (mv := stats(size, k, marker)):
                    ym = y(mv[0])
                    out.append(f'<line x1="{bx + 1:.1f}" x2="{bx + bw - 1:.1f}" y1="{ym:.1f}" y2="{ym:.1f}" '
                               f'stroke="black" stroke-width="2" stroke-dasharray="3,2"/>')
        return starred

    for r in snaps:
        for k in ("rate_inside", "rate_during", "rate_before"):
            r[k + "_m"] = r[k] / 1e6 if r[k] is not None else None
    panel(0, "Pause (VMM-reported; log scale)", "pause_ms", True, "ms")
    starred = panel(W, "Guest page writes/s inside the capture", "rate_inside_m", False, "million pages/s",
                    fallback="rate_during_m", marker="rate_before_m")
    for r in snaps:
        for k in ("rate_inside", "rate_during", "rate_before"):
            del r[k + "_m"]
    lx = left
    ly = H + 10
    for k in kinds:
        out.append(f'<rect x="{lx}" y="{ly}" width="12" height="12" fill="{COLORS[k]}"/>')
        out.append(f'<text x="{lx + 16}" y="{ly + 10}">{label(*k)}</text>')
        lx += 120
    note = "bars: median, whiskers: min–max; dashed: guest rate before the snapshot"
    if starred:
        note += "; * capture under 1 s: the reports covering it"
    hot = "" if a.hot == 100 else f", hot={a.hot}"
    note = f"1 vCPU, memwrite over 7/8 of RAM{hot}; {note}"
    out.append(f'<text x="{left}" y="{ly + 32}" font-size="11">{note}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1G,4G,8G")
    ap.add_argument("--snapshots", type=int, default=3, help="interleaved rounds (fork, uffd, QEMU) per size")
    ap.add_argument("--hot", type=int, default=100, help="guest hot=PERCENT (100: rewrite the whole region)")
    ap.add_argument("--settle", type=int, default=4, help="guest reports after pass 1 before each snapshot")
    ap.add_argument("--after", type=float, default=4.0, help="seconds observed after each snapshot")
    ap.add_argument("--restores", type=int, default=3, help="interleaved restore runs per size (0: none)")
    ap.add_argument("--dir", default="target/bench")
    ap.add_argument("--bin", default="target/release/snapvmm")
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--fresh", action="store_true", help="boot a new VM for every snapshot")
    mode.add_argument("--keep", action="store_true", help="keep both VMs booted (the idle one stopped)")
    ap.add_argument("--kinds", default="fork,uffd,qemu",
                    help="which of snapvmm fork, snapvmm uffd and QEMU to run (for quick comparisons)")
    ap.add_argument("--wp-pool", type=int, metavar="MIB",
                    help="the write-protect capture's pool (x-wp-pool-size and -max-size), MiB")
    ap.add_argument("--wp-pool-max", type=int, metavar="MIB",
                    help="what the write-protect capture's pool may grow to (x-wp-pool-max-size), MiB")
    ap.add_argument("--json")
    ap.add_argument("--chart")
    a = ap.parse_args()
    want = a.kinds.split(",")
    kinds = [k for k in KINDS if (k[1] if k[0] == "snapvmm" else k[0]) in want]
    if not 1 <= a.hot <= 100:
        sys.exit("--hot must be 1..100")
    if not shutil.which(a.qemu):
        sys.exit(f"{a.qemu} not found (.ci/install-qemu.sh)")
    os.makedirs(a.dir, exist_ok=True)
    elf = os.path.abspath(os.path.join(a.dir, "refguest.elf"))
    subprocess.run([a.bin, "export-guest", elf], check=True)
    s = Setup(a, elf)
    qemu_version = subprocess.run([a.qemu, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    snaps, restores, disks = [], [], []
    for size in a.sizes.split(","):
        nbytes = bs.parse_size(size)
        region = nbytes * 7 // 8
        fresh = a.fresh or (not a.keep and mem_available() < 3 * nbytes)
        print(f"{size}: {'a fresh VM per snapshot' if fresh else 'both VMs kept, the idle one stopped'}",
              file=sys.stderr)
        images = {}
        vms = {}
        for rnd in range(a.snapshots):
            disk_s = plain_write_s(os.path.join(a.dir, "vsq-plain.bin"), region)
            disks.append({"size": size, "round": rnd + 1, "mbps": region / disk_s / 1e6})
            for vmm, method in kinds:
                if fresh or vmm not in vms:
                    for other in list(vms):
                        if fresh:
                            vms.pop(other).quit()
                        elif vms[other].status() == "running":
                            vms[other].q.cmd("stop")
                    vms[vmm] = s.boot(vmm, size, f"{size}-{rnd}")
                    since = 0
                else:
                    for other, g in vms.items():
                        if other != vmm and g.status() == "running":
                            g.q.cmd("stop")
                    g = vms[vmm]
                    if g.status() != "running":
                        g.q.cmd("cont")
                    # The first report after `cont` spans the stop.
                    t = time.monotonic()
                    g.wait_for(lambda: any(r[0] > t for r in g.reports), "a report after cont")
                    since = next(r[0] for r in g.reports if r[0] > t)
                g = vms[vmm]
                settled_at = g.settle(since, a.settle)
                image = os.path.join(a.dir, f"vsq-{vmm}-{method}-{size}.img")
                r = snapshot(g, method, image, settled_at, a.after, a.wp_pool, a.wp_pool_max)
                r.update(size=size, vmm=vmm, method=method, round=rnd + 1,
                         plain_ms=r["image_bytes"] / (region / disk_s) * 1000)
                snaps.append(r)
                images[vmm, method] = image
                print(json.dumps(r), file=sys.stderr)
                if g.corrupt:
                    sys.exit(f"{vmm}: the guest found corruption: {g.corrupt}")
        for g in vms.values():
            g.quit()
            if g.corrupt:
                sys.exit(f"{g.vmm}: the guest found corruption: {g.corrupt}")
        for rnd in range(a.restores):
            img = images["snapvmm", "fork"]
            for kind, image in (("lazy", img), ("copy", img), ("uffd", img), ("warm", img),
                                ("qemu", images["qemu", "background-snapshot"])):
                ms, incoming_ms = restore(s, kind, size, image, rnd, verify=rnd == 0)
                restores.append({"size": size, "kind": kind, "run": rnd + 1, "ms": ms,
                                 "incoming_ms": incoming_ms})
                print(json.dumps(restores[-1]), file=sys.stderr)
        for image in images.values():
            os.unlink(image)
    tables(a, snaps, restores, disks)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "qemu": qemu_version, "guest_tsc_khz": s.tsc_khz,
                       "snapshots": snaps, "restores": restores, "plain_write": disks}, f, indent=1)
    if a.chart:
        chart(a.chart, a, snaps)


if __name__ == "__main__":
    main()
