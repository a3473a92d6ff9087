#!/usr/bin/env python3
"""Incremental snapshots: what they write compared with a full one.

Usage: scripts/bench-incremental.py [--sizes 1G,4G] [--hot 10] [--gap 3] [--levels 3]
                                    [--dir target/bench] [--bin target/release/snapvmm]

Boots the reference guest (1 vCPU, memwrite over 7/8 of RAM with hot=PERCENT: after
its first pass it rewrites only that share of its region), waits for the first pass
to end, takes a full snapshot (x-snapshot-method uffd), then --levels incremental
snapshots --gap seconds apart, each with the previous image as `x-parent`, and a
full one right after the last. Per snapshot: the pause, the total time, the RAM
bytes written (query-migrate) and the image's blocks on disk. Then restores the
last incremental (a chain) and the last full image with --restore-mode uffd and
copy, process start → running, and checks the guest runs on.
"""
import argparse
import importlib.util
import os
import time

_spec = importlib.util.spec_from_file_location("bs", os.path.join(os.path.dirname(__file__), "bench-snapshot.py"))
bs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bs)


def snap(vm, path, parent):
    vm.q.cmd("migrate-set-parameters", **{"x-parent": f"file:{parent}" if parent else ""})
    vm.q.cmd("migrate", uri=f"file:{path}")
    while True:
        m = vm.q.cmd("query-migrate")
        if m["status"] not in ("setup", "active"):
            break
        time.sleep(0.02)
    if m["status"] != "completed":
        raise SystemExit(f"snapshot failed: {m}")
    return {
        "pause_ms": m["x-downtime-us"] / 1000,
        "total_ms": m["total-time"],
        "ram_written": m["ram"]["normal-bytes"],
        "disk": os.stat(path).st_blocks * 512,
        "incremental": parent is not None,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1G,4G")
    ap.add_argument("--hot", type=int, default=10)
    ap.add_argument("--gap", type=float, default=3.0)
    ap.add_argument("--levels", type=int, default=3)
    ap.add_argument("--dir", default="target/bench")
    ap.add_argument("--bin", default="target/release/snapvmm")
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    print("| RAM | snapshot | pause | total | RAM bytes written | image on disk | vs the full one |")
    print("|---|---|---|---|---|---|---|")
    restores = []
    for size in a.sizes.split(","):
        region = bs.parse_size(size) * 7 // 8 >> 20
        base = os.path.join(a.dir, f"incr-{size}")
        vm = bs.Vm(a.bin, ["--mem", size, "--cmdline", f"workload=memwrite region={region}M hot={a.hot}",
                           "--serial", "stdio"], base + ".sock")
        # The first pass (the whole region, a few ms at these sizes) is long
        # over after three reports.
        vm.wait_reports(3)
        vm.q.cmd("migrate-set-capabilities", capabilities=[{"capability": "background-snapshot", "state": True}])
        vm.q.cmd("migrate-set-parameters", **{"x-snapshot-method": "uffd"})
        rows = [("full", snap(vm, f"{base}-0.snap", None))]
        for i in range(1, a.levels + 1):
            time.sleep(a.gap)
            rows.append((f"incremental {i}", snap(vm, f"{base}-{i}.snap", f"{base}-{i - 1}.snap")))
        rows.append(("full, right after", snap(vm, f"{base}-full.snap", None)))
        vm.quit()
        full = rows[-1][1]
        for name, r in rows:
            print(f"| {size} | {name} | {r['pause_ms']:.2f} ms | {r['total_ms']} ms | {r['ram_written'] >> 20} MiB "
                  f"| {r['disk'] >> 20} MiB | {100 * r['ram_written'] / full['ram_written']:.1f} % |")
        for image, what in ((f"{base}-{a.levels}.snap", f"chain of {a.levels + 1}"), (f"{base}-full.snap", "full")):
            for mode in ("uffd", "copy"):
                ms = bs.restore_times(a.bin, image, a.dir, mode, 3)
                restores.append((size, what, mode, sorted(ms)[1]))
        for f in os.listdir(a.dir):
            if f.startswith(f"incr-{size}-"):
                os.unlink(os.path.join(a.dir, f))
    print("\n| RAM | image | restore mode | process start → running (median of 3) |")
    print("|---|---|---|---|")
    for size, what, mode, ms in restores:
        print(f"| {size} | {what} | {mode} | {ms:.1f} ms |")


if __name__ == "__main__":
    main()
