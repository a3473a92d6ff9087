//! Probe: does a PVM guest's write to write-protected RAM reach a userfaultfd
//! in the VMM (and wait for it)? Boots the reference guest writing memory,
//! write-protects all of RAM, unprotects each 2 MiB chunk on its first fault,
//! and reports faults and the guest's progress.
//!   cargo run --release --example uffd_probe

use std::sync::Arc;
use std::time::{Duration, Instant};

use livesnap::uffd::Uffd;

fn main() {
    let serial: Box<dyn std::io::Write + Send> =
        Box::new(std::io::LineWriter::new(std::io::stdout()));
    let cfg = vmm::MachineConfig {
        mem_bytes: 256 << 20,
        cpus: 1,
        start: vmm::Start::Kernel {
            kernel: refguest::ELF.to_vec(),
            initrd: None,
            cmdline: "workload=memwrite region=128M".into(),
        },
        serial,
        kvm_path: "/dev/kvm".into(),
        disks: Vec::new(),
        nets: Vec::new(),
        vsock: None,
        vmgenid: None,
        virtio_pci: None,
    };
    let mut m = vmm::Machine::create(cfg, Arc::new(|e| eprintln!("machine event: {e:?}"))).unwrap();
    let uffd = Uffd::new_wp().unwrap();
    let regions: Vec<(u64, u64)> = m
        .ram()
        .regions()
        .iter()
        .map(|r| (r.host as u64, r.len))
        .collect();
    for &(h, l) in &regions {
        uffd.register_wp(h, l).unwrap();
    }
    m.resume();
    std::thread::sleep(Duration::from_secs(2));
    let t0 = Instant::now();
    m.pause().unwrap();
    for &(h, l) in &regions {
        uffd.write_protect(h, l, true).unwrap();
    }
    m.resume();
    eprintln!("pause+WP took {:?}", t0.elapsed());
    let chunk = 2u64 << 20;
    let mut faults = 0;
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end {
        if let Some(f) = uffd.next_fault(Duration::from_millis(100)).unwrap() {
            faults += 1;
            let start = f.addr & !(chunk - 1);
            uffd.write_protect(start, chunk, false).unwrap();
        }
    }
    eprintln!("faults in 3 s: {faults} (one per 2 MiB chunk the guest wrote)");
    std::thread::sleep(Duration::from_secs(1));
    let _ = m.pause();
}
