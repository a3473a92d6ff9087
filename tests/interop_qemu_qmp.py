#!/usr/bin/env python3
"""Interoperability: drive snapvmm with QEMU's own Python client (qemu.qmp) and qmp-shell:
live snapshot + deferred restore, internal snapshots (snapshot-save/load/delete, HMP savevm),
and a post-copy live migration over a socket passed with getfd (send_fd_scm).

Usage: interop_qemu_qmp.py SNAPVMM_BINARY WORKDIR
A script written for QEMU: start, query, stop, cont, live snapshot, quit.
"""
import asyncio
import os
import subprocess
import sys
import threading
import time

from qemu.qmp import QMPClient


async def main(binary, workdir):
    sock = os.path.join(workdir, "qmp.sock")
    snap = os.path.join(workdir, "vm.snap")
    vm = subprocess.Popen([binary, "run", "--mem", "128M", "--qmp", f"unix:{sock},server=on,wait=off",
                           "--name", "interop", "--cmdline", "workload=memwrite region=32M"],
                          stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(300):
            if os.path.exists(sock):
                break
            time.sleep(0.02)
        qmp = QMPClient("interop")
        await qmp.connect(sock)
        status = await qmp.execute("query-status")
        while status["status"] == "prelaunch":
            await asyncio.sleep(0.01)
            status = await qmp.execute("query-status")
        assert status == {"running": True, "status": "running"}, status
        assert (await qmp.execute("query-name")) == {"name": "interop"}
        version = await qmp.execute("query-version")
        assert version["qemu"]["major"] >= 6, version
        names = {c["name"] for c in await qmp.execute("query-commands")}
        for n in ["stop", "cont", "quit", "migrate", "query-migrate", "human-monitor-command"]:
            assert n in names, n
        assert (await qmp.execute("query-kvm")) == {"enabled": True, "present": True}
        with qmp.listener() as listener:
            await qmp.execute("stop")
            ev = await asyncio.wait_for(listener.get(), 10)
            assert ev["event"] == "STOP", ev
        assert (await qmp.execute("query-status"))["status"] == "paused"
        hmp = await qmp.execute("human-monitor-command", {"command-line": "info status"})
        assert hmp == "VM status: paused\r\n", repr(hmp)
        await qmp.execute("cont")
        # The restore below expects the guest to continue with a progress line: snapshot
        # only once it has printed one (a fresh, slow machine may take a while to get there).
        for line in vm.stdout:
            if line.startswith("refguest: cpu="):
                break
        threading.Thread(target=lambda: [None for _ in vm.stdout], daemon=True).start()
        await qmp.execute("migrate-set-capabilities",
                          {"capabilities": [{"capability": "background-snapshot", "state": True}]})
        await qmp.execute("migrate", {"uri": f"file:{snap}"})
        for _ in range(3000):
            m = await qmp.execute("query-migrate")
            if m["status"] in ("completed", "failed", "cancelled"):
                break
            await asyncio.sleep(0.01)
        assert m["status"] == "completed", m
        assert (await qmp.execute("query-status"))["status"] == "running"
        try:
            await qmp.execute("no-such-command")
            raise AssertionError("unknown command accepted")
        except Exception as e:  # qemu.qmp.ExecuteError
            assert "CommandNotFound" in str(e) or "has not been found" in str(e), e
        await qmp.disconnect()

        # qmp-shell, non-interactively: commands on stdin.
        shell = subprocess.run([os.path.join(os.path.dirname(sys.executable), "qmp-shell"), sock],
                               input="query-status\nquit\n", capture_output=True, text=True, timeout=60)
        assert '"status": "running"' in shell.stdout, shell.stdout + shell.stderr
        assert vm.wait(timeout=30) == 0
    finally:
        if vm.poll() is None:
            vm.kill()
    await restore_deferred(binary, workdir, snap)
    await savevm(binary, workdir)
    await live_migration(binary, workdir)
    print("interop: 1 passed, 0 failed")


async def live_migration(binary, workdir):
    """A QEMU user's post-copy migration: postcopy-ram on both sides, the source's socket
    and the target's passed with getfd (qemu.qmp's send_fd_scm), migrate-start-postcopy,
    MIGRATION events until completed on both sides."""
    import socket
    sa, sb = os.path.join(workdir, "src.sock"), os.path.join(workdir, "dst.sock")
    src = subprocess.Popen([binary, "run", "--mem", "256M", "--qmp", f"unix:{sa}",
                            "--cmdline", "workload=memwrite region=128M"], stdout=subprocess.PIPE, text=True)
    dst = subprocess.Popen([binary, "run", "--incoming", "defer", "--qmp", f"unix:{sb}"],
                           stdout=subprocess.PIPE, text=True)
    try:
        for line in src.stdout:
            if line.startswith("refguest: cpu="):
                break
        threading.Thread(target=lambda: [None for _ in src.stdout], daemon=True).start()
        qa, qb = await connect(sa), await connect(sb)
        caps = [{"capability": "postcopy-ram", "state": True}, {"capability": "events", "state": True}]
        for q in (qa, qb):
            await q.execute("migrate-set-capabilities", {"capabilities": caps})
        a, b = socket.socketpair()
        qa.send_fd_scm(a.fileno())
        await qa.execute("getfd", {"fdname": "mig"})
        qb.send_fd_scm(b.fileno())
        await qb.execute("getfd", {"fdname": "mig"})
        a.close()
        b.close()
        await qb.execute("migrate-incoming", {"uri": "fd:mig"})
        with qa.listener("MIGRATION") as events:
            await qa.execute("migrate", {"uri": "fd:mig"})
            await qa.execute("migrate-start-postcopy")
            seen = []
            while "completed" not in seen and "failed" not in seen:
                ev = await asyncio.wait_for(events.get(), 120)
                seen.append(ev["data"]["status"])
        assert seen == ["setup", "active", "postcopy-active", "completed"], seen
        assert (await qa.execute("query-status"))["status"] == "postmigrate"
        line = dst.stdout.readline()
        assert line.startswith("refguest: cpu=") and "CORRUPT" not in line, line
        for _ in range(3000):
            if (await qb.execute("query-migrate"))["status"] == "completed":
                break
            await asyncio.sleep(0.01)
        assert (await qb.execute("query-migrate"))["status"] == "completed"
        for q in (qa, qb):
            await quit_vm(q)
        assert src.wait(timeout=30) == 0 and dst.wait(timeout=30) == 0
    finally:
        for p in (src, dst):
            if p.poll() is None:
                p.kill()


async def quit_vm(qmp):
    """`quit`, then close our side. The VM may close the socket first: qemu.qmp then
    raises EOFError from disconnect(), which after a quit we asked for is expected
    (QEMU's own python/qemu/machine tolerates it the same way)."""
    await qmp.execute("quit")
    try:
        await qmp.disconnect()
    except EOFError:
        pass


async def connect(sock):
    for _ in range(500):
        if os.path.exists(sock):
            break
        time.sleep(0.02)
    qmp = QMPClient("interop")
    await qmp.connect(sock)
    return qmp


async def restore_deferred(binary, workdir, snap):
    """-incoming defer + migrate-incoming, as a QEMU user would."""
    sock = os.path.join(workdir, "restore.sock")
    vm = subprocess.Popen([binary, "run", "--incoming", "defer", "--qmp", f"unix:{sock}"],
                          stdout=subprocess.PIPE, text=True)
    try:
        qmp = await connect(sock)
        assert (await qmp.execute("query-status"))["status"] == "inmigrate"
        await qmp.execute("migrate-incoming", {"uri": f"file:{snap}"})
        assert (await qmp.execute("query-status"))["status"] == "running"
        line = vm.stdout.readline()
        assert line.startswith("refguest: cpu=") and "CORRUPT" not in line, line
        await quit_vm(qmp)
        assert vm.wait(timeout=30) == 0
    finally:
        if vm.poll() is None:
            vm.kill()


async def wait_job(qmp, listener, job_id):
    statuses = []
    while True:
        ev = await asyncio.wait_for(listener.get(), 60)
        if ev["event"] == "JOB_STATUS_CHANGE" and ev["data"]["id"] == job_id:
            statuses.append(ev["data"]["status"])
            if ev["data"]["status"] == "concluded":
                break
    jobs = await qmp.execute("query-jobs")
    job = [j for j in jobs if j["id"] == job_id][0]
    assert "error" not in job, job
    await qmp.execute("job-dismiss", {"id": job_id})
    return statuses


async def savevm(binary, workdir):
    """QEMU >= 6.0 internal snapshots on a qcow2 disk, over QMP and HMP."""
    if subprocess.run(["qemu-img", "--version"], capture_output=True).returncode != 0:
        print("savevm part skipped: qemu-img not found")
        return
    disk = os.path.join(workdir, "disk.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", disk, "64M"], check=True)
    sock = os.path.join(workdir, "savevm.sock")
    vm = subprocess.Popen([binary, "run", "--mem", "128M", "--cpus", "2", "--disk", disk,
                           "--qmp", f"unix:{sock}", "--cmdline",
                           "workload=diskwrite disk_region=8M region=32M"],
                          stdout=subprocess.PIPE, text=True)
    try:
        qmp = await connect(sock)
        args = {"job-id": "snap0", "tag": "t0", "vmstate": "disk0", "devices": ["disk0"]}
        with qmp.listener() as listener:
            await qmp.execute("snapshot-save", args)
            statuses = await wait_job(qmp, listener, "snap0")
            assert statuses == ["created", "running", "waiting", "pending", "concluded"], statuses
            assert (await qmp.execute("query-status"))["status"] == "running"
            await qmp.execute("snapshot-load", dict(args, **{"job-id": "load0"}))
            await wait_job(qmp, listener, "load0")
        hmp = await qmp.execute("human-monitor-command", {"command-line": "savevm t1"})
        assert hmp == "", repr(hmp)
        info = await qmp.execute("human-monitor-command", {"command-line": "info snapshots"})
        assert "t0" in info and "t1" in info, info
        hmp = await qmp.execute("human-monitor-command", {"command-line": "loadvm t1"})
        assert hmp == "", repr(hmp)
        assert (await qmp.execute("query-status"))["status"] == "running"
        hmp = await qmp.execute("human-monitor-command", {"command-line": "delvm t0"})
        assert hmp == "", repr(hmp)
        hmp = await qmp.execute("human-monitor-command", {"command-line": "loadvm t0"})
        assert hmp.startswith("Error: "), repr(hmp)
        hmp = await qmp.execute("human-monitor-command", {"command-line": "savevm t0"})
        assert hmp == "", repr(hmp)
        with qmp.listener() as listener:
            await qmp.execute("snapshot-delete", {"job-id": "del0", "tag": "t1", "devices": ["disk0"]})
            await wait_job(qmp, listener, "del0")
        await quit_vm(qmp)
        out = vm.stdout.read()
        assert vm.wait(timeout=30) == 0
        assert "CORRUPT" not in out and "workload=diskwrite" in out, out[-2000:]
    finally:
        if vm.poll() is None:
            vm.kill()
    listing = subprocess.run(["qemu-img", "snapshot", "-l", disk], capture_output=True, text=True).stdout
    assert "t0" in listing and "t1" not in listing, listing
    check = subprocess.run(["qemu-img", "check", disk], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
