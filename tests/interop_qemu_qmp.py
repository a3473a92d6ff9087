#!/usr/bin/env python3
"""Interoperability: drive snapvmm with QEMU's own Python client (qemu.qmp) and qmp-shell.

Usage: interop_qemu_qmp.py SNAPVMM_BINARY WORKDIR
A script written for QEMU: start, query, stop, cont, live snapshot, quit.
"""
import asyncio
import os
import subprocess
import sys
import time

from qemu.qmp import QMPClient


async def main(binary, workdir):
    sock = os.path.join(workdir, "qmp.sock")
    snap = os.path.join(workdir, "vm.snap")
    vm = subprocess.Popen([binary, "run", "--mem", "128M", "--qmp", f"unix:{sock},server=on,wait=off",
                           "--name", "interop", "--cmdline", "workload=memwrite region=32M"],
                          stdout=subprocess.DEVNULL)
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
    print("interop: 1 passed, 0 failed")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
