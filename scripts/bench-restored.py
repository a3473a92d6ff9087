#!/usr/bin/env python3
"""Snapshots in a row, printing the fork and the pause of each: of a booted VM, and
of VMs restored from its image lazily and by copy.

Usage: scripts/bench-restored.py [--mem 1G] [--snapshots 3] [--gap 2] [--modes lazy,copy,uffd]
                                 [--no-collapse] [--dir target/bench] [--bin target/release/snapvmm]

The guest (1 vCPU) writes 7/8 of its RAM at full speed. First the booted VM takes
--snapshots snapshots (with --no-collapse: without rebuilding huge pages between them),
then each restore mode restores the first image and takes --snapshots more.
"""
import argparse
import importlib.util
import os
import time

_spec = importlib.util.spec_from_file_location("bs", os.path.join(os.path.dirname(__file__), "bench-snapshot.py"))
bs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bs)


def series(vm, a, name, image_prefix):
    vm.wait_reports(3)
    vm.q.cmd("migrate-set-capabilities", capabilities=[{"capability": "background-snapshot", "state": True}])
    vm.q.cmd("migrate-set-parameters", **{"x-collapse-huge-pages": not a.no_collapse})
    for i in range(a.snapshots):
        vm.q.cmd("migrate", uri=f"file:{image_prefix}{i}.snap")
        while True:
            m = vm.q.cmd("query-migrate")
            if m["status"] not in ("setup", "active"):
                break
            time.sleep(0.05)
        if m["status"] != "completed":
            raise SystemExit(f"snapshot failed: {m}")
        rebuilt = m.get("x-huge-pages-rebuilt")
        extra = f", huge pages rebuilt in {rebuilt['ms']} ms" if rebuilt else ""
        print(f"{name} snapshot {i + 1}: fork {m['x-fork-us'] / 1000:.2f} ms, "
              f"pause {m['x-downtime-us'] / 1000:.2f} ms{extra}")
        time.sleep(a.gap)
    vm.quit()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mem", default="1G")
    ap.add_argument("--snapshots", type=int, default=3)
    ap.add_argument("--gap", type=float, default=2.0)
    ap.add_argument("--modes", default="lazy,copy,uffd")
    ap.add_argument("--no-collapse", action="store_true")
    ap.add_argument("--dir", default="target/bench")
    ap.add_argument("--bin", default="target/release/snapvmm")
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    region = bs.parse_size(a.mem) * 7 // 8 >> 20
    base = os.path.join(a.dir, "restored-")
    vm = bs.Vm(a.bin, ["--mem", a.mem, "--cmdline", f"workload=memwrite region={region}M", "--serial", "stdio"],
               base + "boot.sock")
    series(vm, a, "booted", base + "boot-")
    for mode in [m for m in a.modes.split(",") if m]:
        vm = bs.Vm(a.bin, ["--incoming", f"file:{base}boot-0.snap", "--restore-mode", mode, "--serial", "stdio"],
                   base + mode + ".sock")
        series(vm, a, f"restored ({mode})", f"{base}{mode}-")
    for f in os.listdir(a.dir):
        if f.startswith("restored-") and f.endswith(".snap"):
            os.unlink(os.path.join(a.dir, f))


if __name__ == "__main__":
    main()
