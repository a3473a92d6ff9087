#!/usr/bin/env python3
"""Live snapshot benchmark: fork, uffd (write-protect) and stop-and-copy on a guest writing memory at full speed.

Usage: scripts/bench-snapshot.py [--sizes 256M,1G,4G] [--snapshots 10] [--after 10]
                                 [--dir target/bench] [--bin target/release/snapvmm]
                                 [--no-collapse] [--json out.json]

For each RAM size it boots the reference guest (1 vCPU, memwrite over 7/8 of RAM),
measures a plain sequential write of the same size to the same directory (the disk
baseline), then takes --snapshots live snapshots with `fork` and then with `stop`,
and finally restores the last fork image 5 times (lazy), once (copy) and 5 times (uffd).
Per snapshot it records the VMM's pause (x-downtime-us and its parts), the longest
gap the guest itself felt (its maxgap_us report), the total time, throughput, the
peak extra host memory (PSS of snapvmm + its capture child over the baseline),
the image size on disk and the guest's page writes/s before, during and after, and
inside the capture (the median of the guest's per-second reports that lie wholly
within it; empty for a capture shorter than a second).
Prints markdown tables (docs/BENCHMARKS.md) and optionally writes all data as JSON.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time


def parse_size(s):
    units = {"K": 10, "M": 20, "G": 30}
    return int(s[:-1]) << units[s[-1].upper()] if s[-1].upper() in units else int(s) << 20


class Qmp:
    """A raw QMP client (JSON lines over a unix socket)."""

    def __init__(self, path, timeout=30):
        end = time.time() + timeout
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                if time.time() > end:
                    raise
                time.sleep(0.002)
        self.f = self.s.makefile("rwb", buffering=0)
        json.loads(self.f.readline())
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        while True:
            r = json.loads(self.f.readline())
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise RuntimeError(f"{name}: {r['error']['desc']}")


class Vm:
    """`snapvmm run` with time-stamped guest report lines."""

    def __init__(self, binary, args, sock):
        self.p = subprocess.Popen([binary, "run", "--qmp", f"unix:{sock}"] + args,
                                  stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        self.reports = []  # (host time, pages, maxgap_us)
        self.corrupt = []
        threading.Thread(target=self._read, daemon=True).start()
        self.q = Qmp(sock)

    def _read(self):
        for line in self.p.stdout:
            t = time.monotonic()
            line = line.decode(errors="replace").strip()
            if line.startswith("refguest: cpu="):
                kv = dict(x.split("=", 1) for x in line.split()[1:])
                self.reports.append((t, int(kv["pages"]), int(kv["maxgap_us"])))
            elif "CORRUPT" in line:
                self.corrupt.append(line)

    def wait_reports(self, n, timeout=120):
        end = time.time() + timeout
        while len(self.reports) < n:
            if time.time() > end or self.p.poll() is not None:
                sys.exit("the guest stopped reporting")
            time.sleep(0.05)

    def quit(self):
        try:
            self.q.cmd("quit")
        except Exception:
            pass
        self.p.wait(timeout=30)


def rollup_kib(pid, fields):
    """Sum of the smaps_rollup `fields` of pid and its children, in KiB."""
    total = 0
    pids = [pid]
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{t}/children") as f:
                pids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.split(":")[0] in fields:
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def pss_kib(pid):
    """PSS of pid and its children, in KiB (smaps_rollup)."""
    return rollup_kib(pid, ("Pss",))


def plain_write(path, size):
    """Sequential 1 MiB writes of non-zero data + fdatasync: the disk baseline, MB/s."""
    buf = os.urandom(1 << 20)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for _ in range(size >> 20):
        os.write(fd, buf)
    os.fdatasync(fd)
    os.close(fd)
    dt = time.perf_counter() - t0
    os.unlink(path)
    return size / dt / 1e6


def rate(reports, t0, t1):
    """Guest page writes per second from the reports received in (t0, t1]."""
    xs = [r for r in reports if t0 < r[0] <= t1]
    if not xs:
        return None
    # Each report counts the pages written in the second before it.
    return sum(r[1] for r in xs) / len(xs)


def rate_inside(reports, t0, t1):
    """Median of the guest's per-second page-write counts whose whole second lies
    inside (t0, t1] (the speed inside the operation, not averaged across it);
    None when the operation is shorter than a report period."""
    xs = [r[1] for r in reports if t0 <= r[0] - 1.0 and r[0] <= t1]
    return statistics.median(xs) if xs else None


def snapshot(vm, image, after):
    base = pss_kib(vm.p.pid)
    before_t = time.monotonic()
    vm.q.cmd("migrate", uri=f"file:{image}")
    t_start = time.monotonic()
    peak = base
    while True:
        peak = max(peak, pss_kib(vm.p.pid))
        m = vm.q.cmd("query-migrate")
        if m["status"] not in ("setup", "active", "cancelling"):
            break
        time.sleep(0.05)
    t_done = time.monotonic()
    if m["status"] != "completed":
        sys.exit(f"snapshot failed: {m}")
    if m.get("x-snapshot-method") == "stop" and vm.q.cmd("query-status")["status"] != "running":
        vm.q.cmd("cont")
    time.sleep(after)
    # The report that covers the snapshot instant is the first one after it.
    covering = [r for r in vm.reports if r[0] > t_start]
    during = [r for r in vm.reports if t_start < r[0] <= t_done + 1.0]
    st = os.stat(image)
    return {
        "pause_us": m["x-downtime-us"],
        "vcpu_pause_us": m["x-vcpu-pause-us"],
        "state_us": m.get("x-state-save-us"),
        "fork_us": m["x-fork-us"],
        "guest_maxgap_us": max((r[2] for r in during), default=covering[0][2] if covering else None),
        "total_ms": m["total-time"],
        "ram_bytes": m["ram"]["transferred"],
        "mbps": m["ram"]["transferred"] / max(m["total-time"], 1) / 1e3,
        "extra_mib": max(0, peak - base) / 1024,
        "image_mib": st.st_blocks * 512 / 2**20,
        "rate_before": rate(vm.reports, before_t - 5.5, before_t),
        "maxgap_before_us": statistics.median([r[2] for r in vm.reports if before_t - 5.5 < r[0] <= before_t] or [0]),
        "rate_during": rate(vm.reports, t_start, t_done + 1.0),
        "rate_inside": rate_inside(vm.reports, t_start, t_done),
        "rate_after_1s": rate(vm.reports, t_done + 1.0, t_done + 2.0),
        "rate_after": rate(vm.reports, t_done + 1.0, t_done + 1.0 + after),
        "huge_pages": m.get("x-huge-pages-rebuilt"),
        "write_protect": m.get("x-write-protect"),
    }


def restore_times(binary, image, d, mode, runs):
    xs = []
    for i in range(runs):
        sock = os.path.join(d, f"restore-{i}.sock")
        t0 = time.perf_counter()
        p = subprocess.Popen([binary, "run", "--incoming", f"file:{image}", "--restore-mode", mode,
                              "--qmp", f"unix:{sock}", "--serial", "none"], stdin=subprocess.DEVNULL)
        q = Qmp(sock)
        while q.cmd("query-status")["status"] != "running":
            time.sleep(0.0002)
        xs.append((time.perf_counter() - t0) * 1000)
        q.cmd("quit")
        p.wait(timeout=30)
    return xs


def fmt(x, spec="{:.0f}"):
    return "–" if x is None else spec.format(x)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="256M,1G,4G")
    ap.add_argument("--snapshots", type=int, default=10)
    ap.add_argument("--after", type=float, default=10.0, help="seconds observed after the 1st and last snapshot")
    ap.add_argument("--gap", type=float, default=2.0, help="seconds between the other snapshots")
    ap.add_argument("--dir", default="target/bench")
    ap.add_argument("--bin", default="target/release/snapvmm")
    ap.add_argument("--no-collapse", action="store_true", help="do not rebuild huge pages between snapshots")
    ap.add_argument("--methods", default="fork,stop")
    ap.add_argument("--json")
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    results = []
    for size_s in a.sizes.split(","):
        size = parse_size(size_s)
        region = size * 7 // 8 >> 20
        disk = plain_write(os.path.join(a.dir, "plain.bin"), region << 20)
        sock = os.path.join(a.dir, f"vm-{size_s}.sock")
        vm = Vm(a.bin, ["--mem", size_s, "--cmdline", f"workload=memwrite region={region}M",
                        "--serial", "stdio"], sock)
        vm.wait_reports(4)
        vm.q.cmd("migrate-set-capabilities", capabilities=[{"capability": "background-snapshot", "state": True}])
        vm.q.cmd("migrate-set-parameters", **{"x-collapse-huge-pages": not a.no_collapse})
        image = os.path.join(a.dir, f"vm-{size_s}.snap")
        for method in a.methods.split(","):
            vm.q.cmd("migrate-set-parameters", **{"x-snapshot-method": method})
            for i in range(a.snapshots):
                last = i == a.snapshots - 1
                after = a.after if i == 0 or last else a.gap
                r = snapshot(vm, image, after)
                r.update(size=size_s, method=method, n=i + 1, disk_mbps=disk)
                results.append(r)
                print(json.dumps(r), file=sys.stderr)
            if method == "fork":
                fork_image = image + ".fork"
                os.replace(image, fork_image)
        corrupt = list(vm.corrupt)
        vm.quit()
        if corrupt:
            sys.exit(f"guest found corruption: {corrupt}")
        if "fork" in a.methods:
            lazy = restore_times(a.bin, image + ".fork", a.dir, "lazy", 5)
            copy = restore_times(a.bin, image + ".fork", a.dir, "copy", 1)
            fill = restore_times(a.bin, image + ".fork", a.dir, "uffd", 5)
            results.append({"size": size_s, "restore_lazy_ms": lazy, "restore_copy_ms": copy,
                            "restore_uffd_ms": fill})
            os.unlink(image + ".fork")
        if os.path.exists(image):
            os.unlink(image)

    print("| RAM | method | # | pause (VMM) | guest felt (usual) | total | MB/s (disk) | extra mem | image | pages/s before → during → 1st s after → 10 s after | pages/s inside (median of whole seconds) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "method" not in r or r["n"] not in (1, a.snapshots):
            continue
        M = 1e6
        print(f"| {r['size']} | {r['method']} | {r['n']} | {r['pause_us'] / 1000:.2f} ms "
              f"(fork {r['fork_us'] / 1000:.2f}) | {r['guest_maxgap_us'] / 1000:.1f} ms ({r['maxgap_before_us'] / 1000:.1f}) | {r['total_ms']} ms | "
              f"{r['mbps']:.0f} ({r['disk_mbps']:.0f}) | {r['extra_mib']:.0f} MiB | {r['image_mib']:.0f} MiB | "
              f"{fmt(r['rate_before'] and r['rate_before'] / M, '{:.1f}')}M → "
              f"{fmt(r['rate_during'] and r['rate_during'] / M, '{:.2f}')}M → "
              f"{fmt(r['rate_after_1s'] and r['rate_after_1s'] / M, '{:.1f}')}M → "
              f"{fmt(r['rate_after'] and r['rate_after'] / M, '{:.1f}')}M | "
              f"{fmt(r.get('rate_inside') and r['rate_inside'] / M, '{:.2f}')}M |")
    for r in results:
        if "restore_lazy_ms" in r:
            print(f"restore {r['size']}: lazy median {statistics.median(r['restore_lazy_ms']):.1f} ms "
                  f"(min {min(r['restore_lazy_ms']):.1f}), copy {r['restore_copy_ms'][0]:.0f} ms, "
                  f"uffd median {statistics.median(r['restore_uffd_ms']):.1f} ms "
                  f"(min {min(r['restore_uffd_ms']):.1f}) (process start → running)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
