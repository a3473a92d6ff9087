//! The network scenarios: Linux's own virtio-net driver on a tap that
//! snapvmm creates, the tap's host side configured where the scenarios run
//! (the TCG VM on PVM hosts), with busybox's `ip`, `ping` and `nc`; and
//! Linux's vsock driver against snapvmm's unix-socket host side.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use super::scenarios::{
    catch, field_text, figure, live_snapshot_to, migration_completed, qmp, Ctx, T,
};
use super::vm::Vm;

/// Names of these scenarios.
pub const ALL: &[&str] = &[
    "network-tap-snapshot-restore",
    "network-pci-clones-own-macs",
    "vsock-host-guest-restore",
    "network-throughput",
];

pub fn run(name: &str, ctx: &Ctx) -> Result<(), String> {
    catch(|| match name {
        "network-tap-snapshot-restore" => tap_snapshot_restore(ctx),
        "network-pci-clones-own-macs" => clones_own_macs(ctx),
        "vsock-host-guest-restore" => vsock(ctx),
        "network-throughput" => throughput(ctx),
        other => panic!("unknown scenario {other}"),
    })
}

const HOST: &str = "10.0.2.1";
const GUEST: &str = "10.0.2.15";
/// What the guest sends the host, checked by hash.
const BLOB_MIB: usize = 64;
/// What the throughput benchmark sends each way (the TCG VM moves about
/// 1 MiB/s guest → host, whatever the VMM: kept short).
const BENCH_MIB: usize = 16;

/// Waits for the tap snapvmm creates, then gives the host side its address.
fn host_side(tap: &str) {
    let end = Instant::now() + T;
    while !Path::new("/sys/class/net").join(tap).exists() {
        assert!(Instant::now() < end, "snapvmm never created tap {tap}");
        std::thread::sleep(Duration::from_millis(100));
    }
    for args in [
        vec!["addr", "add", &format!("{HOST}/24"), "dev", tap],
        vec!["link", "set", tap, "up"],
    ] {
        let st = Command::new("ip").args(&args).status().expect("ip");
        assert!(st.success(), "ip {args:?}: {st}");
    }
}

/// The host's count of retransmitted TCP segments (`/proc/net/snmp`).
fn host_retransmits() -> i64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RetransSegs")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// Types `cmd` until the guest prints `marker` (the shell may not be reading yet).
fn run_in_guest(vm: &mut Vm, cmd: &str, marker: &str, limit: Duration) -> String {
    let end = Instant::now() + limit;
    loop {
        vm.type_line(cmd);
        match vm.poll(&[marker], Duration::from_secs(20)) {
            Ok(l) => return l,
            Err(e) if e.contains("exited") => panic!("{e}"),
            Err(_) => assert!(Instant::now() < end, "the guest never printed {marker}"),
        }
    }
}

fn host_pings_guest() {
    let end = Instant::now() + T;
    loop {
        let st = Command::new("ping")
            .args(["-c", "2", "-W", "5", GUEST])
            .status()
            .expect("ping");
        if st.success() {
            return;
        }
        assert!(Instant::now() < end, "the host cannot ping the guest");
    }
}

fn accept(l: &TcpListener) -> TcpStream {
    l.set_nonblocking(true).unwrap();
    let end = Instant::now() + T;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(T)).unwrap();
                return s;
            }
            Err(_) => {
                assert!(Instant::now() < end, "the guest never connected");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Receives `bytes` from the guest on `port`, into `to`; returns its sha256.
fn receive(port: u16, bytes: usize, to: &Path, guest: &mut Vm, cmd: &str) -> String {
    let l = TcpListener::bind((HOST, port)).expect("listen on the tap's address");
    guest.type_line(cmd);
    let mut s = accept(&l);
    let mut data = vec![0u8; bytes];
    s.read_exact(&mut data)
        .unwrap_or_else(|e| panic!("reading {bytes} bytes from the guest: {e}"));
    std::fs::write(to, &data).unwrap();
    let out = Command::new("sha256sum")
        .arg(to)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// A guest with a NIC: ping both ways, 64 MiB guest → host checked by hash,
/// a TCP connection that stays up across a live snapshot of the running
/// guest, then the image restored in a new process on a new tap: ping and
/// TCP work again (the guest's data from the snapshot instant included);
/// then that VM live-migrates to a target on a third tap, reachable there.
fn tap_snapshot_restore(ctx: &Ctx) {
    let snap = ctx.dir.join("linux-net.snap");
    let mut src = ctx.linux("net", "512M", "1", "net", &["--net", "tap=snt0"]);
    host_side("snt0");
    let up = src.wait("GUEST-NET", T);
    let mac =
        vmm::devices::virtio::net::format_mac(&vmm::devices::virtio::net::default_mac("net0"));
    assert!(
        up.contains(&format!("mac={mac}")),
        "the MAC from the id: {up}"
    );
    // Linux's driver took merged receive buffers, EVENT_IDX and the offloads.
    let features = field_text(&up, "features=");
    for (bit, what) in [
        (15, "MRG_RXBUF"),
        (29, "EVENT_IDX"),
        (0, "CSUM"),
        (7, "GUEST_TSO4"),
    ] {
        assert_eq!(
            features.as_bytes().get(bit),
            Some(&b'1'),
            "{what} negotiated: {up}"
        );
    }
    src.wait("GUEST-SHELL", T);
    run_in_guest(
        &mut src,
        &format!("ping -c 2 -W 5 {HOST} >/dev/null && echo GUEST-PING-$((1+1))"),
        "GUEST-PING-2",
        T,
    );
    host_pings_guest();

    let t0 = Instant::now();
    let want = receive(
        5000,
        BLOB_MIB << 20,
        &ctx.dir.join("blob"),
        &mut src,
        &format!(
            "mkdir -p /tmp; dd if=/dev/urandom of=/tmp/blob bs=1M count={BLOB_MIB} 2>/dev/null; \
             echo GUEST-SHA$((1+1)) $(sha256sum /tmp/blob); nc {HOST} 5000 < /tmp/blob"
        ),
    );
    let said = src.wait("GUEST-SHA2 ", T);
    assert!(said.contains(&want), "guest {said}, host {want}");
    println!(
        "{BLOB_MIB} MiB guest -> host in {:.1} s (nested, emulated)",
        t0.elapsed().as_secs_f64()
    );

    // A connection that stays up across a live snapshot.
    let l = TcpListener::bind((HOST, 5001)).unwrap();
    src.type_line(&format!(
        "(while :; do echo tick; sleep 0.2; done | nc {HOST} 5001) &"
    ));
    let mut ticks = BufReader::new(accept(&l));
    let mut line = String::new();
    for _ in 0..3 {
        line.clear();
        ticks
            .read_line(&mut line)
            .expect("ticks before the snapshot");
        assert_eq!(line.trim(), "tick");
    }
    let mut q = qmp(&src);
    live_snapshot_to(&mut q, &snap);
    for _ in 0..5 {
        line.clear();
        let n = ticks
            .read_line(&mut line)
            .expect("the connection survives the snapshot");
        assert!(
            n > 0 && line.trim() == "tick",
            "after the snapshot: {line:?}"
        );
    }
    q.ok("quit", json!({}));
    src.exit_code(T);
    drop(ticks);

    // Restored in a new process on a new tap.
    let mut dst = ctx.vm(
        "net-restored",
        &[
            "--incoming",
            &format!("file:{}", snap.display()),
            "--net",
            "tap=snt1",
        ],
    );
    host_side("snt1");
    host_pings_guest();
    const AGAIN: usize = 8 << 20;
    let again = receive(
        5002,
        AGAIN,
        &ctx.dir.join("blob-again"),
        &mut dst,
        &format!("head -c {AGAIN} /tmp/blob | nc {HOST} 5002"),
    );
    let first = std::fs::read(ctx.dir.join("blob")).unwrap();
    std::fs::write(ctx.dir.join("blob-head"), &first[..AGAIN]).unwrap();
    let out = Command::new("sha256sum")
        .arg(ctx.dir.join("blob-head"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with(&again),
        "the restored guest sent what it held at the snapshot"
    );

    // Live-migrated to a target with its own tap: reachable there.
    let mut target = ctx.vm("net-target", &["--incoming", "defer", "--net", "tap=snt2"]);
    let mut qt = qmp(&target);
    let uri = format!("unix:{}", ctx.dir.join("mig.sock").display());
    qt.ok("migrate-incoming", json!({ "uri": uri }));
    let mut q = qmp(&dst);
    q.ok("migrate", json!({ "uri": uri }));
    migration_completed([&mut q, &mut qt]);
    assert_eq!(qt.ok("query-status", json!({}))["status"], "running");
    // The source's tap (and its address) goes with it; the target's gets one.
    q.ok("quit", json!({}));
    dst.exit_code(T);
    host_side("snt2");
    host_pings_guest();
    qt.ok("quit", json!({}));
    target.exit_code(T);
}

/// Clones that are distinct on the network: a guest with a NIC on
/// virtio-pci, live-snapshotted, then restored twice, one clone after the
/// other, each on its own tap with its own MAC. snapvmm re-plugs the NIC
/// (ACPI PCI hotplug), Linux's driver probes it again and takes the new
/// MAC: the guest's interface has it, and the host's neighbour table learns
/// it from the guest's replies.
fn clones_own_macs(ctx: &Ctx) {
    let snap = ctx.dir.join("linux-pci-net.snap");
    let mut src = ctx.linux(
        "pcinet",
        "256M",
        "1",
        "net",
        &["--net", "tap=spc0", "--virtio-transport", "pci"],
    );
    host_side("spc0");
    let up = src.wait("GUEST-NET", T);
    let image_mac =
        vmm::devices::virtio::net::format_mac(&vmm::devices::virtio::net::default_mac("net0"));
    assert!(up.contains(&format!("mac={image_mac}")), "{up}");
    src.wait("GUEST-SHELL", T);
    host_pings_guest();
    let mut q = qmp(&src);
    live_snapshot_to(&mut q, &snap);
    q.ok("quit", json!({}));
    src.exit_code(T);

    for (name, tap, mac) in [
        ("clone-a", "spc1", "52:54:00:c1:00:0a"),
        ("clone-b", "spc2", "52:54:00:c1:00:0b"),
    ] {
        let mut clone = ctx.vm(
            name,
            &[
                "--incoming",
                &format!("file:{}", snap.display()),
                "--net",
                &format!("tap={tap},mac={mac}"),
            ],
        );
        host_side(tap);
        // The interface comes back (as a new eth0) with the clone's MAC; the
        // guest configures it as a hotplug-aware network setup would.
        let said = run_in_guest(
            &mut clone,
            &format!(
                "for i in $(seq 1 150); do [ \"$(cat /sys/class/net/eth0/address 2>/dev/null)\" = {mac} ] && break; \
                 sleep 0.2; done; ip addr add {GUEST}/24 dev eth0; ip link set eth0 up; \
                 echo GUEST-MAC-$((6*7)) $(cat /sys/class/net/eth0/address)"
            ),
            "GUEST-MAC-42",
            T,
        );
        assert!(
            said.ends_with(mac),
            "{name}: the guest's interface has the clone's MAC: {said}"
        );
        host_pings_guest();
        let neigh = Command::new("ip")
            .args(["neigh", "show", GUEST, "dev", tap])
            .output()
            .expect("ip neigh");
        let neigh = String::from_utf8_lossy(&neigh.stdout);
        assert!(
            neigh.contains(mac),
            "{name}: the host learnt the clone's MAC from its replies: {neigh:?}"
        );
        let mut q = qmp(&clone);
        q.ok("quit", json!({}));
        assert_eq!(clone.exit_code(T), Some(0), "{name}");
    }
}

/// A host process connects through the device's socket (`CONNECT <port>`)
/// to a guest listener; returns the stream after `OK <hostport>`.
fn vsock_connect(path: &Path, port: u32) -> BufReader<UnixStream> {
    let end = Instant::now() + T;
    loop {
        if let Ok(mut s) = UnixStream::connect(path) {
            s.set_read_timeout(Some(T)).unwrap();
            writeln!(s, "CONNECT {port}").unwrap();
            let mut r = BufReader::new(s);
            let mut line = String::new();
            if r.read_line(&mut line).is_ok() && line.starts_with("OK ") {
                return r;
            }
        }
        assert!(
            Instant::now() < end,
            "CONNECT {port} through {} never answered OK",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn echoes(r: &mut BufReader<UnixStream>, text: &str) {
    writeln!(r.get_mut(), "{text}").unwrap();
    let mut line = String::new();
    r.read_line(&mut line).expect("the echo");
    assert_eq!(line.trim_end(), text);
}

/// vsock with Linux's own driver, in Firecracker's hybrid convention: a host
/// process reaches the guest's listener through `CONNECT`, a guest
/// connection to host port 6000 reaches the unix socket `PATH_6000`; after a
/// live snapshot restored in a new process with another CID and socket, the
/// guest's listener still accepts and the connection that was open at the
/// snapshot was reset in the guest.
fn vsock(ctx: &Ctx) {
    let path = ctx.dir.join("v.sock");
    let snap = ctx.dir.join("linux-vsock.snap");
    let arg = format!("cid=3,path={}", path.display());
    let mut src = ctx.linux("vsock", "256M", "1", "vsock", &["--vsock", &arg]);
    src.wait("VSOCK-LISTENING port=5000", T);
    let mut held = vsock_connect(&path, 5000);
    echoes(&mut held, "hello");
    src.wait("VSOCK-ACCEPTED", T);

    // Guest -> host port 6000: the unix socket PATH_6000.
    let l = UnixListener::bind(ctx.dir.join("v.sock_6000")).unwrap();
    let server = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        writeln!(r.get_mut(), "pong:{}", line.trim_end()).unwrap();
    });
    // (The shell came up before the listener: typing is retried until it runs.)
    run_in_guest(
        &mut src,
        "/stress vsock-send 6000 ping",
        "VSOCK-REPLY pong:ping",
        T,
    );
    server.join().unwrap();

    let mut q = qmp(&src);
    live_snapshot_to(&mut q, &snap);
    // The source goes on talking after its snapshot.
    echoes(&mut held, "still-here");
    q.ok("quit", json!({}));
    src.exit_code(T);
    drop(held);

    let path2 = ctx.dir.join("v2.sock");
    let arg2 = format!("cid=4,path={}", path2.display());
    let mut dst = ctx.vm(
        "vsock-restored",
        &[
            "--incoming",
            &format!("file:{}", snap.display()),
            "--vsock",
            &arg2,
        ],
    );
    // The connection open at the snapshot instant was reset in the guest...
    dst.wait("VSOCK-CONN-RESET", T);
    // ... and its listener still accepts, through the restoring process's socket.
    let mut again = vsock_connect(&path2, 5000);
    echoes(&mut again, "after-restore");
    let mut q = qmp(&dst);
    q.ok("quit", json!({}));
    dst.exit_code(T);
}

/// Round trips and bytes each way (a benchmark, run by name): the same guest
/// on a tap under snapvmm (virtio-mmio, then virtio-pci) and then under QEMU (userspace virtio-net over PCI,
/// no vhost) in the same TCG VM; host → guest ping, 16 MiB of TCP each way,
/// two rounds. Figures: [`figure`] lines.
fn throughput(ctx: &Ctx) {
    let runs = [
        ("snapvmm", "sbt0"),
        ("snapvmm-pci", "spt0"),
        ("snapvmm-pci-base", "sbp0"),
        ("qemu", "qbt0"),
    ];
    for (pass, (vmm, tap)) in super::scenarios::bench_order(&runs, |r| r.0) {
        let figures = |text: String| {
            figure(
                "network-throughput",
                &format!("vmm={vmm} pass={pass} {text}"),
            )
        };
        let mut vm = if vmm.starts_with("snapvmm") {
            let net = format!("tap={tap}");
            let mut args = vec!["--net", &net];
            if vmm.starts_with("snapvmm-pci") {
                args.extend(["--virtio-transport", "pci"]);
            }
            ctx.linux(vmm, "512M", "1", "net", &args)
        } else {
            let netdev = format!("tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off");
            ctx.qemu(
                vmm,
                "512M",
                "1",
                "net",
                &[
                    "-netdev",
                    &netdev,
                    "-device",
                    "virtio-net-pci,netdev=n0,romfile=",
                ],
            )
        };
        host_side(tap);
        let up = vm.wait("GUEST-NET", T);
        figures(up);
        vm.wait("GUEST-SHELL", T);
        run_in_guest(&mut vm, "echo ready-$((2+3))", "ready-5", T);
        host_pings_guest();
        for round in 1..=2 {
            let o = Command::new("ping")
                .args(["-c", "20", "-i", "0.2", GUEST])
                .output()
                .expect("ping");
            let text = String::from_utf8_lossy(&o.stdout);
            let rtt = text
                .lines()
                .find(|l| l.contains("min/avg/max"))
                .unwrap_or_else(|| panic!("no round-trip summary in {text}"));
            figures(format!("round={round} ping {rtt}"));

            let t0 = Instant::now();
            receive(
                5000 + round,
                BENCH_MIB << 20,
                &ctx.dir.join("netbench-blob"),
                &mut vm,
                &format!(
                    "dd if=/dev/zero bs=1M count={BENCH_MIB} 2>/dev/null | nc {HOST} {}",
                    5000 + round
                ),
            );
            let ms = t0.elapsed().as_millis();
            figures(format!(
                "round={round} tcp-guest-to-host MiB={BENCH_MIB} ms={ms}"
            ));

            let port = 5100 + round;
            vm.type_line(&format!(
                "echo NETBENCH-RX$((1+1)) bytes=$(nc -l -p {port} | wc -c)"
            ));
            let blob = vec![0x5au8; 1 << 20];
            let end = Instant::now() + T;
            let mut s = loop {
                match TcpStream::connect((GUEST, port)) {
                    Ok(s) => break s,
                    Err(e) => {
                        assert!(Instant::now() < end, "the guest never listened: {e}");
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            };
            // A guest that stops receiving fails the round instead of
            // holding the run until the TCG VM's budget ends.
            s.set_write_timeout(Some(T)).unwrap();
            let resent = host_retransmits();
            let t0 = Instant::now();
            for _ in 0..BENCH_MIB {
                s.write_all(&blob)
                    .unwrap_or_else(|e| panic!("{vmm}: sending to the guest: {e}"));
            }
            drop(s);
            let done = vm.wait("NETBENCH-RX2", T);
            let ms = t0.elapsed().as_millis();
            assert!(
                done.contains(&format!("bytes={}", BENCH_MIB << 20)),
                "the guest got everything: {done}"
            );
            // Segments the host sent again: frames lost on the way in (a tap
            // queue that overflowed while the device did not read it).
            let resent = host_retransmits() - resent;
            figures(format!(
                "round={round} tcp-host-to-guest MiB={BENCH_MIB} ms={ms} host-retransmits={resent}"
            ));
        }
        // The guest's interrupts per device (how often each queue woke it).
        let irqs = run_in_guest(
            &mut vm,
            "echo NETBENCH-IRQS$((1+1)) $(grep -E 'virtio|LNRO' /proc/interrupts | tr -s ' ' | tr '\\n' ';')",
            "NETBENCH-IRQS2",
            T,
        );
        figures(format!("guest {irqs}"));
        // The guest's TCP counters (retransmitted segments: frames lost on the way).
        let snmp = run_in_guest(
            &mut vm,
            "echo NETBENCH-TCP$((1+1)) $(grep Tcp: /proc/net/snmp | tail -1)",
            "NETBENCH-TCP2",
            T,
        );
        figures(format!("guest {snmp}"));
        // The NIC's frames and bytes each way as the guest counts them (the
        // average frame: how much segmentation the offloads took over).
        let dev = run_in_guest(
            &mut vm,
            "echo NETBENCH-DEV$((1+1)) $(cd /sys/class/net/eth0/statistics && echo rx_packets=$(cat rx_packets) rx_bytes=$(cat rx_bytes) tx_packets=$(cat tx_packets) tx_bytes=$(cat tx_bytes))",
            "NETBENCH-DEV2",
            T,
        );
        figures(format!("guest {dev}"));
        vm.type_line("poweroff -f");
        let _ = vm.exit_code(T);
        // The next VMM's tap takes the same address: wait for this one to go.
        let end = Instant::now() + T;
        while Path::new("/sys/class/net").join(tap).exists() {
            assert!(Instant::now() < end, "tap {tap} outlived its VMM");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
