#!/usr/bin/env python3
"""savevm benchmark: snapshot-save of a running guest (live) vs. the same save
with the guest stopped for the whole operation (what QEMU's savevm does).

Usage: scripts/bench-savevm.py [--mem 1G] [--disk-size 4G] [--disk-data 2G] [--runs 3]
                               [--dir target/bench] [--bin target/release/snapvmm]

It creates a qcow2 disk of --disk-size holding --disk-data of data (qemu-io), boots
the reference guest with 2 vCPUs running diskwrite (CPU 0, 64 MiB of the disk) and
memwrite (CPU 1, 7/8 of RAM), then alternates live and stopped saves. Per save:
the guest's pause (live: x-pause-us, the cut; stopped: stop → concluded → cont),
the total time, the longest stall the guest itself reported, and `qemu-img check`.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import importlib.util  # noqa: E402

_spec = importlib.util.spec_from_file_location("bs", os.path.join(os.path.dirname(__file__), "bench-snapshot.py"))
bs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bs)


def wait_job(q, job_id):
    while True:
        for j in q.cmd("query-jobs"):
            if j["id"] == job_id and j["status"] == "concluded":
                q.cmd("job-dismiss", id=job_id)
                if "error" in j:
                    sys.exit(f"{job_id} failed: {j['error']}")
                return j
        time.sleep(0.02)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mem", default="1G")
    ap.add_argument("--disk-size", default="4G")
    ap.add_argument("--disk-data", default="2G")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="target/bench")
    ap.add_argument("--bin", default="target/release/snapvmm")
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    disk = os.path.join(a.dir, "savevm.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", disk, a.disk_size], check=True)
    # Data at the end of the disk; the guest writes the first 64 MiB.
    data = bs.parse_size(a.disk_data)
    size = bs.parse_size(a.disk_size)
    chunk = 1 << 30
    cmds = []
    for off in range(size - data, size, chunk):
        cmds += ["-c", f"write -P 0x5a {off} {min(chunk, size - off)}"]
    subprocess.run(["qemu-io", "-f", "qcow2"] + cmds + [disk], check=True, stdout=subprocess.DEVNULL)
    region = bs.parse_size(a.mem) * 7 // 8 >> 20
    sock = os.path.join(a.dir, "savevm.sock")
    vm = bs.Vm(a.bin, ["--mem", a.mem, "--cpus", "2", "--disk", disk, "--serial", "stdio",
                       "--cmdline", f"workload=diskwrite disk_region=64M region={region}M"], sock)
    vm.wait_reports(6)
    rows = []
    for i in range(a.runs):
        for mode in ("live", "stopped"):
            time.sleep(3)
            job = f"{mode}{i}"
            t0 = time.monotonic()
            if mode == "stopped":
                vm.q.cmd("stop")
            vm.q.cmd("snapshot-save", **{"job-id": job, "tag": job, "vmstate": "disk0", "devices": ["disk0"]})
            j = wait_job(vm.q, job)
            if mode == "stopped":
                vm.q.cmd("cont")
            t1 = time.monotonic()
            time.sleep(1.5)
            felt = max((r[2] for r in vm.reports if t0 < r[0] <= t1 + 1.2), default=None)
            pause_ms = j["x-pause-us"] / 1000 if mode == "live" else (t1 - t0) * 1000
            rows.append({"mode": mode, "pause_ms": pause_ms, "total_ms": (t1 - t0) * 1000,
                         "guest_felt_ms": felt / 1000 if felt else None,
                         "vmstate_mib": j["x-vmstate-bytes"] / 2**20})
            print(json.dumps(rows[-1]), file=sys.stderr)
    corrupt = list(vm.corrupt)
    vm.quit()
    chk = subprocess.run(["qemu-img", "check", disk], capture_output=True, text=True)
    if corrupt:
        sys.exit(f"guest found corruption: {corrupt}")
    print(f"savevm, {a.mem} RAM, {a.disk_size} qcow2 disk with {a.disk_data} of data, "
          f"{a.runs} runs each (medians); qemu-img check: exit {chk.returncode}")
    print("| mode | guest paused | total | longest stall the guest felt |")
    print("|---|---|---|---|")
    for mode in ("live", "stopped"):
        xs = [r for r in rows if r["mode"] == mode]
        med = lambda k: statistics.median(r[k] for r in xs if r[k] is not None)  # noqa: E731
        print(f"| {mode} | {med('pause_ms'):.1f} ms | {med('total_ms'):.0f} ms | {med('guest_felt_ms'):.1f} ms |")
    os.unlink(disk)


if __name__ == "__main__":
    main()
