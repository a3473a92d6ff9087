#!/usr/bin/env python3
"""Time from process start to the guest's first serial line.

Usage: scripts/bench-boot.py [--runs N] [--mem 256M] [--cpus 1] [--bin target/release/snapvmm]
       scripts/bench-boot.py --qemu   (same guest under qemu-system-x86_64, for comparison)
Prints min / median / max in milliseconds over N runs (after one warm-up run).
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time


def one(cmd):
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    line = p.stdout.readline()
    dt = time.perf_counter() - t0
    p.kill()
    p.wait()
    if not line.startswith(b"refguest:"):
        sys.exit(f"unexpected first line: {line!r}")
    return dt * 1000


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--mem", default="256M")
    ap.add_argument("--cpus", default="1")
    ap.add_argument("--bin", default="target/release/snapvmm")
    ap.add_argument("--qemu", action="store_true")
    a = ap.parse_args()
    if a.qemu:
        elf = os.path.join(tempfile.mkdtemp(), "refguest.elf")
        subprocess.run([a.bin, "export-guest", elf], check=True)
        cmd = ["qemu-system-x86_64", "-accel", "kvm", "-M", "pc", "-cpu", "host,-arch-capabilities,vmware-cpuid-freq=on,+invtsc",
               "-m", a.mem, "-smp", a.cpus, "-kernel", elf, "-append", "workload=idle",
               "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-serial", "stdio", "-display", "none",
               "-nodefaults", "-no-user-config"]
    else:
        cmd = [a.bin, "run", "--mem", a.mem, "--cpus", a.cpus, "--cmdline", "workload=idle"]
    one(cmd)
    xs = sorted(one(cmd) for _ in range(a.runs))
    print(f"{'qemu' if a.qemu else 'snapvmm'} first serial line, {a.mem}, {a.cpus} vCPU, {a.runs} runs: "
          f"min {xs[0]:.1f} ms, median {statistics.median(xs):.1f} ms, max {xs[-1]:.1f} ms")


if __name__ == "__main__":
    main()
