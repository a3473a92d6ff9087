#!/usr/bin/env python3
"""Clone fleets: one image restored N times at once, each clone a distinct VM.

Usage: scripts/bench-clones.py [--counts 1,10,50] [--modes lazy,uffd] [--mem 512M]
                               [--fill 448M] [--hot 1] [--wait 10] [--dir target/bench]
                               [--bin target/release/snapvmm] [--uffd-max-gib 12]
                               [--json out.json]

A reference guest with --mem RAM fills --fill of it (memwrite) and then rewrites a
--hot % hot set; once it has finished two passes a live snapshot of it is taken
(the default write-protect capture). Then, per restore mode and count N, N
`snapvmm run --incoming file:IMAGE --restore-mode MODE --paused` processes start at once,
each with its own vsock CID and socket (`--vsock cid=3+i,path=...`) and its own VM
generation ID (new at every restore). Reported per (mode, N):
- time from the first process start until every clone is restored (`paused`: the
  restore's own cost), and until every one answers `running` after `cont` (one
  client thread per clone, as a fleet manager talks to its clones at once; the
  reference guest never idles: N running clones share the host's cores, so on a
  small host the later ones start slowly);
- each clone's memory (PSS: its process and children, smaps_rollup; pages shared
  between clones count 1/N) --wait s after all run, two ways: `rewriting` (the
  guests go on rewriting their hot sets) and `idle` (each clone `stop`ped as soon
  as it runs: no guest writes; a restore's fill still completes);
- the generation IDs are all different (`query-vm-generation-id`), or the run fails;
- beside N copies: N x the guest's RAM.
The uffd fill gives each clone its own RAM (nothing shared), so counts whose total
would pass --uffd-max-gib are skipped for it (and said so). A guest that prints
CORRUPT fails the run.
"""
import argparse
import concurrent.futures
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

_spec = importlib.util.spec_from_file_location("bs", os.path.join(os.path.dirname(__file__), "bench-snapshot.py"))
bs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bs)


def make_image(binary, d, mem, fill, hot):
    sock = os.path.join(d, "src.sock")
    image = os.path.join(d, "clone-source.snap")
    args = ["--mem", mem, "--serial", "stdio", "--vsock", f"cid=3,path={os.path.join(d, 'src.vsock')}",
            "--cmdline", f"workload=memwrite region={fill} hot={hot} report_ms=1000"]
    vm = bs.Vm(binary, args, sock)
    vm.wait_reports(4, timeout=300)
    vm.q.cmd("migrate-set-capabilities",
             capabilities=[{"capability": "background-snapshot", "state": True}])
    vm.q.cmd("migrate", uri=f"file:{image}")
    while True:
        m = vm.q.cmd("query-migrate")
        if m["status"] in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.05)
    vm.quit()
    if m["status"] != "completed" or vm.corrupt:
        sys.exit(f"the source snapshot failed: {m} {vm.corrupt}")
    return image


def private_mib(pid):
    """Memory only this clone holds (Private_Clean + Private_Dirty, its process
    and children): what it wrote, its page tables aside."""
    return bs.rollup_kib(pid, ("Private_Clean", "Private_Dirty")) / 1024


def fleet(binary, image, d, mode, n, wait, idle):
    procs, socks = [], []
    t0 = time.perf_counter()
    for i in range(n):
        sock = os.path.join(d, f"c{i}.sock")
        vs = os.path.join(d, f"c{i}.vsock")
        socks.append(sock)
        procs.append(subprocess.Popen(
            [binary, "run", "--incoming", f"file:{image}", "--restore-mode", mode,
             "--qmp", f"unix:{sock}", "--serial", "none", "--paused",
             "--vsock", f"cid={3 + i},path={vs}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL))
    # A fleet manager talks to its clones at once, not one after the other:
    # one client thread per clone (a clone's answer then waits for that
    # clone alone, not for every clone before it).
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=n)
    qs = list(pool.map(lambda s: bs.Qmp(s, timeout=120), socks))

    def until(q, status):
        while q.cmd("query-status")["status"] != status:
            if time.perf_counter() - t0 > 300:
                sys.exit(f"a clone never got to {status}")
            time.sleep(0.001)

    # Restored and paused (-S): what the restore itself costs, before N busy
    # reference guests compete for the host's CPUs.
    list(pool.map(lambda q: until(q, "paused"), qs))
    all_restored_s = time.perf_counter() - t0
    list(pool.map(lambda q: (q.cmd("cont"), until(q, "running")), qs))
    all_running_s = time.perf_counter() - t0
    pool.shutdown()
    if idle:
        for q in qs:
            q.cmd("stop")
    ids = {q.cmd("query-vm-generation-id")["guid"] for q in qs}
    if len(ids) != n:
        sys.exit(f"{n} clones share generation IDs: {len(ids)} distinct")
    time.sleep(wait)
    pss = [bs.pss_kib(p.pid) / 1024 for p in procs]
    private = [private_mib(p.pid) for p in procs]
    for p, q in zip(procs, qs):
        if p.poll() is not None:
            sys.exit(f"a clone ended early with {p.returncode}")
        try:
            q.cmd("quit")
        except Exception:
            pass
    for p in procs:
        p.wait(timeout=60)
    return {
        "mode": mode,
        "guest": "idle" if idle else "rewriting",
        "n": n,
        "all_restored_s": all_restored_s,
        "all_running_s": all_running_s,
        "pss_mib_mean": statistics.mean(pss),
        "pss_mib_max": max(pss),
        "pss_mib_total": sum(pss),
        "private_mib_mean": statistics.mean(private),
        "distinct_ids": len(ids),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", default="1,10,50")
    ap.add_argument("--modes", default="lazy,uffd")
    ap.add_argument("--mem", default="512M")
    ap.add_argument("--fill", default="448M")
    ap.add_argument("--hot", type=int, default=1)
    ap.add_argument("--wait", type=float, default=10)
    ap.add_argument("--dir", default="target/bench")
    ap.add_argument("--bin", default="target/release/snapvmm")
    ap.add_argument("--uffd-max-gib", type=float, default=12)
    ap.add_argument("--json")
    a = ap.parse_args()
    d = os.path.join(a.dir, f"clones-{os.getpid()}")
    os.makedirs(d, exist_ok=True)
    mem_mib = bs.parse_size(a.mem) >> 20
    results = []
    try:
        image = make_image(a.bin, d, a.mem, a.fill, a.hot)
        img_mib = os.stat(image).st_blocks * 512 / 2**20
        print(f"image: {img_mib:.0f} MiB on disk, guest RAM {mem_mib} MiB, fill {a.fill}, hot {a.hot} %")
        for mode in a.modes.split(","):
            for n in [int(x) for x in a.counts.split(",")]:
                if mode != "lazy" and n * mem_mib / 1024 > a.uffd_max_gib:
                    print(f"skipped: {mode} x {n} would need {n * mem_mib / 1024:.0f} GiB of private RAM")
                    continue
                for idle in (False, True):
                    r = fleet(a.bin, image, d, mode, n, a.wait, idle)
                    results.append(r)
                    print(f"{mode} x {n} ({r['guest']}): all restored after {r['all_restored_s']:.2f} s, running after {r['all_running_s']:.2f} s, "
                          f"PSS {r['pss_mib_mean']:.1f} MiB/clone (max {r['pss_mib_max']:.1f}), "
                          f"private {r['private_mib_mean']:.1f} MiB", flush=True)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print()
    print(f"| restore mode | guest | clones | all restored (paused) after | all running after | PSS per clone after {a.wait:.0f} s (mean / max) | private per clone | all clones (PSS) | N copies of the RAM |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['guest']} | {r['n']} | {r['all_restored_s']:.2f} s | {r['all_running_s']:.2f} s | {r['pss_mib_mean']:.1f} / {r['pss_mib_max']:.1f} MiB "
              f"| {r['private_mib_mean']:.1f} MiB | {r['pss_mib_total'] / 1024:.2f} GiB | {r['n'] * mem_mib / 1024:.1f} GiB |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
