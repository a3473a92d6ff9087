#!/usr/bin/env python3
"""Live migration side by side: snapvmm (pre-copy pass + post-copy, and post-copy alone)
against QEMU (pre-copy and post-copy).

Usage (root): scripts/bench-live-migration.py [--sizes 1G,4G] [--loads full,little,idle]
                  [--kinds snapvmm,snapvmm-postcopy,qemu-postcopy,qemu-precopy]
                  [--rate 1gbit] [--delay-ms 1] [--precopy-limit 60] [--dir target/bench]
                  [--bin target/release/snapvmm] [--qemu qemu-system-x86_64] [--json out.json]

Two "hosts": network namespaces A and B joined by a veth pair, each end capped at
--rate by `tc tbf`. This host's kernel has no `sch_netem`, so the one-way delay
(--delay-ms) is added by a relay in namespace B (a thread per direction holding each
block for the delay; it is what both VMMs' streams go through, so both pay it alike);
with --delay-ms 0 there is no relay and the source connects to the target directly.
Both VMMs boot the identical reference guest (`snapvmm export-guest`, 1 vCPU; `full`:
memwrite over 7/8 of RAM at full speed; `little`: the same region filled once, then
only 5 % of it rewritten while the rest is read back (`hot=5`); `idle`:
workload=idle) in A and migrate it to a target started in B (`--incoming tcp:` /
`-incoming tcp:`), driven over QMP:

* snapvmm: `migrate tcp:` without background-snapshot (the default: one pre-copy pass,
  then post-copy for what the guest wrote since and what the pass did not reach);
* snapvmm-postcopy: the same with `x-precopy` false (post-copy from the start);
* QEMU post-copy: capabilities `postcopy-ram` on both sides, `migrate`, then
  `migrate-start-postcopy` at once (QEMU sends the dirty bitmap and device state, then
  serves faults);
* QEMU pre-copy: QEMU's defaults (`max-bandwidth` raised to the link, the default 300 ms
  downtime limit), given --precopy-limit seconds to converge; if it has not, the run is
  reported as not converged and the VM is left running on the source.

Per run: downtime (source pause → target running: snapvmm's `downtime` from pause to
the target's word, QEMU's `downtime`), total time (`total-time`), bytes sent
(snapvmm `x-postcopy.bytes-sent`, QEMU `ram.transferred`) against RAM, the link's floor
(RAM / rate), the post-copy phase (the source's MIGRATION postcopy-active → completed:
while it lasts the target's guest depends on the source) and the guest's page writes/s on
the target while post-copy runs (median of its per-second reports wholly inside: the
speed inside the operation, not averaged across it) and after, and what the guest felt:
the longest gap between two of its page writes in the target's first three reports
(the one that covers the switch, and two seconds after it), beside its usual longest
gap on the source before. A CORRUPT line on either side fails the run.

Each run's JSON also has `timeline`: the switch on one clock, in ms from the source's
STOP — the guest's longest gap in the target's first report (placed by the guest's own
`gap_ago_us`), the target's RESUME and, when the VMMs run with
SNAPVMM_LOG=livesnap::timeline=debug (snapvmm), RUNNING and GO on both sides and every
fault the target's handler read in the first 100 ms (when it read it, when it was done).
"""
import argparse
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import deque

HERE = os.path.dirname(os.path.abspath(__file__))


def load(name, file):
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, file))
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


bs = load("bs", "bench-snapshot.py")
vq = load("vq", "bench-vs-qemu.py")

def _cmd(self, name, **args):
    """bs.Qmp.cmd that keeps the events it reads, with their QMP timestamps."""
    self.f.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
    while True:
        r = json.loads(self.f.readline())
        if "event" in r:
            if not hasattr(self, "events"):
                self.events = []
            ts = r["timestamp"]
            name = r["event"]
            if name == "MIGRATION":
                name += ":" + r.get("data", {}).get("status", "")
            self.events.append((name, ts["seconds"] + ts["microseconds"] / 1e6))
        if "return" in r:
            return r["return"]
        if "error" in r:
            raise RuntimeError(f"{name}: {r['error']['desc']}")


bs.Qmp.cmd = _cmd
vq.bs.Qmp.cmd = _cmd

NS_A, NS_B = "lmA", "lmB"
IP_A, IP_B = "10.213.0.1", "10.213.0.2"


def sh(*args, check=True):
    r = subprocess.run(args, capture_output=True, text=True)
    if check and r.returncode != 0:
        sys.exit(f"{' '.join(args)}: {r.stderr.strip()}")
    return r.returncode == 0


def netns_up(rate):
    netns_down()
    sh("ip", "netns", "add", NS_A)
    sh("ip", "netns", "add", NS_B)
    sh("ip", "link", "add", "lmva", "type", "veth", "peer", "name", "lmvb")
    sh("ip", "link", "set", "lmva", "netns", NS_A)
    sh("ip", "link", "set", "lmvb", "netns", NS_B)
    sh("ip", "-n", NS_A, "addr", "add", f"{IP_A}/24", "dev", "lmva")
    sh("ip", "-n", NS_B, "addr", "add", f"{IP_B}/24", "dev", "lmvb")
    for ns, dev in ((NS_A, "lmva"), (NS_B, "lmvb")):
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
           "rate", rate, "burst", "256kb", "latency", "100ms")


def netns_down():
    sh("ip", "netns", "del", NS_A, check=False)
    sh("ip", "netns", "del", NS_B, check=False)


RELAY = r'''
import socket, sys, threading, time
from collections import deque
listen_port, to_port, delay = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]) / 1000
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((sys.argv[4], listen_port)); ls.listen(8)
def pump(src, dst):
    q = deque(); cv = threading.Condition(); done = [False]
    def reader():
        while True:
            try: b = src.recv(1 << 20)
            except OSError: b = b""
            with cv:
                q.append((time.monotonic() + delay, b)); cv.notify()
            if not b: return
    threading.Thread(target=reader, daemon=True).start()
    while True:
        with cv:
            while not q: cv.wait()
            t, b = q.popleft()
        d = t - time.monotonic()
        if d > 0: time.sleep(d)
        if not b:
            try: dst.shutdown(socket.SHUT_WR)
            except OSError: pass
            return
        try: dst.sendall(b)
        except OSError: return
while True:
    c, _ = ls.accept()
    t = socket.create_connection(("127.0.0.1", to_port))
    for s in (c, t): s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    threading.Thread(target=pump, args=(c, t), daemon=True).start()
    threading.Thread(target=pump, args=(t, c), daemon=True).start()
'''


def start_relay(listen_port, to_port, delay_ms, d):
    path = os.path.join(d, "relay.py")
    with open(path, "w") as f:
        f.write(RELAY)
    # The relay is the network: real-time priority, so that the VMMs under
    # test (on the same few CPUs) never hold its packets back.
    p = subprocess.Popen(["ip", "netns", "exec", NS_B, "chrt", "-f", "20", sys.executable, path, str(listen_port),
                          str(to_port), str(delay_ms), IP_B])
    time.sleep(0.5)
    return p


def in_ns(ns, cmd):
    return ["ip", "netns", "exec", ns] + cmd


def guest_cmdline(size, load, qemu, tsc_khz):
    if load == "idle":
        c = "workload=idle"
    elif load == "little":
        c = f"workload=memwrite region={bs.parse_size(size) * 7 // 8 >> 20}M hot=5"
    else:
        c = f"workload=memwrite region={bs.parse_size(size) * 7 // 8 >> 20}M"
    if qemu:
        c += f" tsc_khz={tsc_khz}"
    return c


def qemu_cmd(a, elf, size, sock, cmdline, incoming=None):
    cmd = [a.qemu, "-accel", "kvm", "-M", "pc", "-cpu", "host,-arch-capabilities", "-m", size,
           "-smp", "1", "-kernel", elf, "-append", cmdline,
           "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-serial", "stdio",
           "-display", "none", "-nodefaults", "-no-user-config", "-qmp", f"unix:{sock},server=on,wait=off"]
    return cmd + (["-incoming", incoming] if incoming else [])


def wait_status(g, pred, timeout):
    end = time.monotonic() + timeout
    while True:
        m = g.q.cmd("query-migrate")
        if pred(m.get("status")):
            return m
        if time.monotonic() > end:
            return m
        time.sleep(0.02)


def run_one(a, elf, tsc, size, load, kind, n):
    d = a.dir
    sa, sb = os.path.join(d, f"lm-a-{n}.sock"), os.path.join(d, f"lm-b-{n}.sock")
    port = 4400 + n % 50
    qemu = kind.startswith("qemu")
    cmdline = guest_cmdline(size, load, qemu, tsc)
    # The target listens on 127.0.0.1 in B; the relay (in B, on B's veth address) delays.
    # Without a delay there is no relay: the target listens on B's veth address and the
    # source connects to it (a relay, at real-time priority, takes CPU the VMMs need).
    relayed = a.delay_ms > 0
    target_uri = f"tcp:127.0.0.1:{port}" if relayed else f"tcp:{IP_B}:{port}"
    if qemu:
        src = vq.Guest("qemu", in_ns(NS_A, qemu_cmd(a, elf, size, sa, cmdline)), sa)
        dst = vq.Guest("qemu", in_ns(NS_B, qemu_cmd(a, elf, size, sb, cmdline, target_uri)), sb)
        src.q.cmd("migrate-set-parameters", **{"max-bandwidth": bs.parse_size(a.rate_bytes)})
        if kind == "qemu-postcopy":
            for g in (src, dst):
                g.q.cmd("migrate-set-capabilities", capabilities=[{"capability": "postcopy-ram", "state": True}])
    else:
        src = vq.Guest("snapvmm", in_ns(NS_A, [a.bin, "run", "--qmp", f"unix:{sa}", "--mem", size, "--cpus", "1",
                                               "--serial", "stdio", "--cmdline", cmdline]), sa)
        # --mem/--cpus: the target builds its VM ahead (as QEMU's is given -m).
        dst = vq.Guest("snapvmm", in_ns(NS_B, [a.bin, "run", "--qmp", f"unix:{sb}", "--serial", "stdio",
                                               "--mem", size, "--cpus", "1", "--incoming", target_uri]), sb)
        src.q.cmd("migrate-set-parameters", **{"x-precopy": kind == "snapvmm"})
    src.q.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
    relay = start_relay(port + 100, port, a.delay_ms, d) if relayed else None
    try:
        if load == "idle":
            src.wait_for(lambda: src.ready is not None or len(src.reports) > 0 or True, "boot")
            time.sleep(3)
        else:
            t1 = src.settle(0, 2)
        before = bs.rate(src.reports, time.monotonic() - 3, time.monotonic())
        t0 = time.monotonic()
        src.q.cmd("migrate", uri=f"tcp:{IP_B}:{port + 100 if relayed else port}")
        if kind == "qemu-postcopy":
            wait_status(src, lambda s: s in ("active", "failed", "completed"), 30)
            src.q.cmd("migrate-start-postcopy")
        limit = a.precopy_limit if kind == "qemu-precopy" else 600
        m = wait_status(src, lambda s: s in ("completed", "failed", "cancelled"), limit)
        t_done = time.monotonic()
        converged = m.get("status") == "completed"
        if kind == "qemu-precopy" and not converged:
            src.q.cmd("migrate_cancel")
            wait_status(src, lambda s: s in ("cancelled", "failed", "completed"), 60)
        elif not converged:
            sys.exit(f"{kind} {size} {load}: migration {m.get('status')}: {m.get('error-desc', m)}")
        # The switch: when the target's guest ran its first report.
        time.sleep(3)
        t_run = next((r[0] for r in dst.reports), None)
        for g in (dst, src):
            try:
                g.q.cmd("query-status")
            except OSError:
                pass  # a QEMU target whose incoming migration was cancelled exits
        stop = [t for e, t in getattr(src.q, "events", []) if e == "STOP"]
        resume = [t for e, t in getattr(dst.q, "events", []) if e == "RESUME"]
        # Downtime as both VMMs' own events say: the source's STOP → the target's RESUME.
        event_downtime_ms = (resume[0] - stop[0]) * 1000 if stop and resume and converged else None
        if src.corrupt or dst.corrupt:
            sys.exit(f"{kind}: CORRUPT: {src.corrupt + dst.corrupt}")
        ram = bs.parse_size(size)
        if not qemu:
            sent = m["x-postcopy"]["bytes-sent"] + m.get("x-precopy", {}).get("bytes-sent", 0)
            downtime_ms = m.get("x-downtime-us", 0) / 1000
        else:
            sent = m.get("ram", {}).get("transferred", 0)
            downtime_ms = float(m.get("downtime", "nan")) if converged else None
        switch = t_run - 1.0 if t_run else None
        mig = {e: t for e, t in getattr(src.q, "events", []) if e.startswith("MIGRATION:")}
        pc_ms = ((mig["MIGRATION:completed"] - mig["MIGRATION:postcopy-active"]) * 1000
                 if "MIGRATION:completed" in mig and "MIGRATION:postcopy-active" in mig else None)
        # The target's own account of its faults (snapvmm): how long faulting
        # threads waited for a page from the source, and for its placing.
        fill = None
        if not qemu and converged:
            for _ in range(50):
                fill = dst.q.cmd("query-migrate").get("x-restore-fill")
                if fill:
                    break
                time.sleep(0.1)
        # The switch on one clock: the guest's longest gap in the target's
        # first report, the source's STOP, the target's RESUME (QMP events,
        # as they arrived), and with SNAPVMM_LOG=livesnap::timeline=debug the
        # VMMs' own switch records and the target's faults.
        timeline = []
        if stop and dst.gaps:
            # QMP events carry wall-clock times; the rest is monotonic.
            base = stop[0] - (time.time() - time.monotonic())
            timeline.append(("guest gap", round((dst.gaps[0][0] - base) * 1000, 2),
                             round((dst.gaps[0][1] - base) * 1000, 2)))
            if resume:
                timeline.append(("RESUME event", round((resume[0] - stop[0]) * 1000, 2)))
            for who, g in (("source", src), ("target", dst)):
                for line in g.stderr.decode(errors="replace").splitlines():
                    if "livesnap::timeline" not in line or "at_us=" not in line:
                        continue
                    kv = dict(x.split("=", 1) for x in line.split() if "=" in x)
                    at = int(kv["at_us"]) / 1e6 - base
                    if -0.01 < at < 0.1:
                        what = line.split("livesnap::timeline:")[-1].split(" at_us")[0].strip()
                        done = int(kv["done_us"]) / 1e6 - base if "done_us" in kv else None
                        timeline.append((f"{who}: {what} {kv.get('addr', '')}".strip(), round(at * 1000, 2),
                                         round(done * 1000, 2) if done is not None else None))
        res = {
            "vmm": kind, "size": size, "load": load, "converged": converged,
            "timeline": timeline,
            "target_fault_source_waits": (fill or {}).get("fault-source-waits"),
            "target_fault_fills": (fill or {}).get("fault-fills"),
            "downtime_ms": event_downtime_ms,
            "vmm_downtime_ms": downtime_ms,
            "precopy_bytes": m.get("ram", {}).get("precopy-bytes"),
            "postcopy_phase_ms": pc_ms,
            "x_precopy": m.get("x-precopy"),
            "x_postcopy": m.get("x-postcopy"),
            "postcopy_bytes": m.get("ram", {}).get("postcopy-bytes"),
            "total_ms": m.get("total-time") if converged else None,
            "bytes_sent": sent, "ram_bytes": ram,
            "floor_ms": ram * 8 / a.rate_bits * 1000,
            "rate_before": before,
            # What the guest felt: the longest gap between two page writes in the
            # target's first three reports (the one covering the switch and the
            # two seconds after it), and the usual one on the source before.
            "felt_target_ms": max((r[2] for r in dst.reports[:3]), default=0) / 1000 if dst.reports else None,
            "felt_target_reports_ms": [r[2] / 1000 for r in dst.reports[:3]],
            "felt_usual_ms": (statistics.median([r[2] for r in src.reports if r[0] < t0][-4:]) / 1000
                              if any(r[0] < t0 for r in src.reports) else None),
            "rate_target_inside": bs.rate_inside(dst.reports, switch, t_done) if switch else None,
            "rate_target_after": bs.rate(dst.reports, t_done, t_done + 3),
            "status": m.get("status"),
            "limit_s": limit,
        }
        print(json.dumps(res), flush=True)
        return res
    finally:
        if relay:
            relay.kill()
        for g in (src, dst):
            g.quit() if g.p.poll() is None else None


def table(rs):
    def ms(v):
        return "–" if v is None else f"{v:.2f} ms" if v < 100 else f"{v:.0f} ms"

    def mp(v):
        return "–" if v is None else f"{v / 1e6:.2f} M"

    print("\n| RAM | guest | VMM | downtime (STOP → RESUME) | VMM's downtime | guest felt on the target (usual) | total | total / (RAM ÷ link) "
          "| bytes sent / RAM | post-copy phase | guest page writes/s: source before → target during post-copy → after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rs:
        if not r["converged"]:
            print(f"| {r['size']} | {r['load']} | {r['vmm']} | did not converge in {r['limit_s']:.0f} s | – | – | – | – "
                  f"| {r['bytes_sent'] / r['ram_bytes']:.2f} (cancelled) | – | {mp(r['rate_before'])} → – → – |")
            continue
        tot = r["total_ms"]
        felt = r.get("felt_target_ms")
        usual = r.get("felt_usual_ms")
        felt_s = "–" if felt is None else f"{felt:.1f} ms ({usual:.1f})" if usual is not None else f"{felt:.1f} ms"
        print(f"| {r['size']} | {r['load']} | {r['vmm']} | {ms(r['downtime_ms'])} | {ms(r['vmm_downtime_ms'])} | {felt_s} "
              f"| {tot} ms | {tot / r['floor_ms']:.2f}× | {r['bytes_sent'] / r['ram_bytes']:.2f} "
              f"| {ms(r['postcopy_phase_ms'])} "
              f"| {mp(r['rate_before'])} → {mp(r['rate_target_inside'])} → {mp(r['rate_target_after'])} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1G,4G")
    ap.add_argument("--loads", default="full,little,idle")
    ap.add_argument("--kinds", default="snapvmm,snapvmm-postcopy,qemu-postcopy,qemu-precopy")
    ap.add_argument("--rate", default="1gbit")
    ap.add_argument("--delay-ms", type=float, default=1.0)
    ap.add_argument("--precopy-limit", type=float, default=60)
    ap.add_argument("--dir", default="target/bench")
    ap.add_argument("--bin", default="target/release/snapvmm")
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--json")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces)")
    a.rate_bits = {"gbit": 1e9, "mbit": 1e6}[a.rate[-4:]] * float(a.rate[:-4])
    a.rate_bytes = str(int(a.rate_bits / 8))
    os.makedirs(a.dir, exist_ok=True)
    a.dir = os.path.abspath(a.dir)
    elf = os.path.join(a.dir, "refguest.elf")
    subprocess.run([a.bin, "export-guest", elf], check=True)
    netns_up(a.rate)
    rs = []
    try:
        # The guest's tsc_khz for QEMU (snapvmm's ready line).
        probe = vq.Guest("snapvmm", [a.bin, "run", "--qmp", f"unix:{a.dir}/lm-probe.sock", "--mem", "64M",
                                     "--serial", "stdio", "--cmdline", "workload=idle"], f"{a.dir}/lm-probe.sock")
        probe.wait_for(lambda: probe.ready is not None, "the ready line")
        tsc = int(next(w for w in probe.ready.split() if w.startswith("tsc_khz="))[8:])
        probe.quit()
        n = 0
        for size in a.sizes.split(","):
            for load in a.loads.split(","):
                for kind in a.kinds.split(","):
                    n += 1
                    rs.append(run_one(a, elf, tsc, size, load, kind, n))
    finally:
        netns_down()
    table(rs)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rs, f, indent=1)


if __name__ == "__main__":
    main()
