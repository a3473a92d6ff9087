#!/usr/bin/env python3
"""Where a vCPU thread's time went while a page-fault handler served it: run a command
under the kernel's scheduler trace and account the vCPU's time.

Usage (root: it uses tracefs):
  scripts/trace-vcpu.py [--waker livesnap-fill-f] [--window 0.1] [--min-ms 0.3] -- COMMAND...
  scripts/trace-vcpu.py --trace FILE [...]        (analyse a trace saved before)

The vCPU thread is the first `vcpu*` thread woken by a thread whose name starts with
--waker (the restore/migration fill's fault handler `livesnap-fill-f`, or the
write-protect capture's `livesnap-wp-fau`): on a live migration that is the target's
vCPU. From its first such wake-up, for --window seconds, its time is split into
running, sleeping (waiting for a fault to be served) and runnable but not running (its
CPU taken by another thread); each wait longer than --min-ms is listed, and for the
runnable ones the threads that had the CPU meanwhile.

Example, the switch of a live migration:
  sudo scripts/trace-vcpu.py -- scripts/bench-live-migration.py --sizes 1G --loads little \\
      --kinds snapvmm --delay-ms 0
"""
import argparse
import collections
import os
import re
import subprocess
import sys

T = "/sys/kernel/tracing"
LINE = re.compile(r"\s*(.+?)-(\d+)\s+\[(\d+)\]\s+\S+\s+([\d.]+): (sched_\w+): (.*)")
SWITCH = re.compile(r"prev_comm=(.+?) prev_pid=(\d+).*prev_state=(\S+) ==> next_comm=(.+?) next_pid=(\d+)")
WAKE = re.compile(r"comm=(.+?) pid=(\d+) prio=(\d+) target_cpu=(\d+)")


def put(path, value):
    with open(os.path.join(T, path), "w") as f:
        f.write(value)


def record(cmd):
    if not os.path.exists(os.path.join(T, "trace")):
        subprocess.run(["mount", "-t", "tracefs", "nodev", T], check=True)
    put("tracing_on", "0")
    put("trace", "")
    put("trace_clock", "mono")
    put("buffer_size_kb", "262144")
    for e in ("sched_switch", "sched_wakeup"):
        put(f"events/sched/{e}/enable", "1")
    put("tracing_on", "1")
    try:
        rc = subprocess.run(cmd).returncode
    finally:
        put("tracing_on", "0")
        for e in ("sched_switch", "sched_wakeup"):
            put(f"events/sched/{e}/enable", "0")
    with open(os.path.join(T, "trace")) as f:
        text = f.read()
    put("trace", "")
    return rc, text


def events(text):
    for line in text.splitlines():
        m = LINE.match(line)
        if m:
            yield float(m.group(4)), int(m.group(3)), m.group(1), m.group(5), m.group(6)


def analyse(text, waker, window, min_ms):
    ev = list(events(text))
    vcpu = start = None
    for t, _, comm, kind, rest in ev:
        if kind == "sched_wakeup" and comm.startswith(waker):
            m = WAKE.search(rest)
            if m and m.group(1).startswith("vcpu"):
                vcpu, start = int(m.group(2)), t
                break
    if vcpu is None:
        sys.exit(f"no vCPU thread woken by a '{waker}*' thread in the trace")
    end = start + window
    state, since = "S", start
    spans = {"run": [], "S": [], "R": []}
    for t, cpu, _, kind, rest in ev:
        if t < start:
            continue
        if t > end:
            break
        if kind == "sched_switch":
            m = SWITCH.search(rest)
            prev, prev_state, nxt = int(m.group(2)), m.group(3), int(m.group(5))
            if nxt == vcpu:
                spans[state].append((since, t, cpu))
                state, since = "run", t
            elif prev == vcpu:
                spans["run"].append((since, t, cpu))
                state, since = ("R" if prev_state.startswith("R") else "S"), t
        else:
            m = WAKE.search(rest)
            if m and int(m.group(2)) == vcpu and state == "S":
                spans["S"].append((since, t, cpu))
                state, since = "R", t

    def total(k):
        return sum(b - a for a, b, _ in spans[k]) * 1000

    print(f"vCPU thread {vcpu}, {window * 1000:.0f} ms from its first wake-up by {waker}*: "
          f"running {total('run'):.1f} ms, sleeping {total('S'):.1f} ms, "
          f"runnable but not running {total('R'):.1f} ms")
    for k, what in (("S", "sleeping"), ("R", "runnable, CPU taken")):
        long = [(a, b, c) for a, b, c in spans[k] if (b - a) * 1000 >= min_ms]
        print(f"{what}, {len(long)} spans of {min_ms} ms or more:")
        for a, b, cpu in long:
            line = f"  at {(a - start) * 1000:8.2f} ms: {(b - a) * 1000:6.2f} ms"
            if k == "R":
                ran = collections.Counter()
                cur, last = None, a
                for t, c, _, kind, rest in ev:
                    if c != cpu or kind != "sched_switch":
                        continue
                    m = SWITCH.search(rest)
                    if t < a:
                        cur = m.group(4)
                        continue
                    if t > b:
                        break
                    if cur:
                        ran[cur] += t - last
                    cur, last = m.group(4), t
                if cur:
                    ran[cur] += b - last
                line += " on CPU %d, held by %s" % (cpu, ", ".join(
                    f"{n} {d * 1000:.2f} ms" for n, d in ran.most_common(3) if not n.startswith("vcpu")))
            print(line)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--waker", default="livesnap-fill-f")
    ap.add_argument("--window", type=float, default=0.1, help="seconds")
    ap.add_argument("--min-ms", type=float, default=0.3)
    ap.add_argument("--trace", help="analyse this saved trace instead of running a command")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if a.trace:
        with open(a.trace) as f:
            text = f.read()
        rc = 0
    elif cmd:
        rc, text = record(cmd)
    else:
        ap.error("a command to run, or --trace FILE")
    analyse(text, a.waker, a.window, a.min_ms)
    sys.exit(rc)


if __name__ == "__main__":
    main()
