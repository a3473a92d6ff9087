//! Internal snapshots in qcow2 disks (QEMU's `savevm`), live.
//!
//! The cut: pause the vCPUs, save the machine state, freeze every disk of
//! the snapshot (qcow2 metadata only: later guest writes copy-on-write), fork
//! the RAM capture child, resume. Then the capture streams the image (the
//! livesnap format: RAM + machine state) into the vmstate area of the
//! vmstate disk while the guest runs and keeps writing to its disks; when
//! it is complete every disk commits the snapshot under the tag. Nothing is
//! visible before the commit; a failure aborts the frozen state.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::SnapshotError;
use crate::disk::{Disks, Qcow2Handle};

/// The VM clock recorded with snapshot `tag` (on the disk that holds its VM state).
pub fn snapshot_clock(disks: &Disks, tag: &str) -> u64 {
    (0..disks.len())
        .filter_map(|i| {
            disks
                .with_qcow2(i, |q| {
                    q.snapshots()
                        .iter()
                        .find(|s| s.name == tag && s.vm_state_size > 0)
                        .map(|s| s.vm_clock_nsec)
                })
                .flatten()
        })
        .next()
        .unwrap_or(0)
}

/// Resolves the `devices` and `vmstate` of a snapshot command to device
/// indexes, with QEMU's errors. An empty `devices` means every disk.
pub fn resolve(
    ids: &[String],
    devices: &[String],
    vmstate: Option<&str>,
    is_qcow2: impl Fn(usize) -> bool,
) -> Result<(Vec<usize>, Option<usize>), SnapshotError> {
    let mut out = Vec::new();
    let wanted: Vec<&str> = if devices.is_empty() {
        ids.iter().map(String::as_str).collect()
    } else {
        devices.iter().map(String::as_str).collect()
    };
    for name in wanted {
        let i = ids
            .iter()
            .position(|d| d == name)
            .ok_or_else(|| SnapshotError::NoDevice(name.to_string()))?;
        if !is_qcow2(i) {
            return Err(SnapshotError::NotSnapshotCapable(name.to_string()));
        }
        if !out.contains(&i) {
            out.push(i);
        }
    }
    if out.is_empty() {
        return Err(SnapshotError::NoSnapshotDisk);
    }
    let vm = match vmstate {
        None => None,
        Some(v) => {
            let i = ids
                .iter()
                .position(|d| d == v)
                .ok_or_else(|| SnapshotError::NoDevice(v.to_string()))?;
            if !out.contains(&i) {
                return Err(SnapshotError::VmstateNotListed(v.to_string()));
            }
            Some(i)
        }
    };
    Ok((out, vm))
}

/// The capture's destination: the frozen vmstate of one qcow2 disk.
pub struct VmStateSink {
    pub image: Qcow2Handle,
    pub frozen: Arc<Mutex<Option<qcow2::Frozen>>>,
    /// Length of the complete image (set by `finish`).
    pub image_len: Arc<AtomicU64>,
}

impl livesnap::Sink for VmStateSink {
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let frozen = self.frozen.lock().unwrap_or_else(|e| e.into_inner());
        let f = frozen
            .as_ref()
            .ok_or_else(|| io::Error::other("snapshot no longer pending"))?;
        self.image
            .with(|q| q.write_frozen_vmstate(f, offset, buf))
            .map_err(|e| io::Error::other(e.to_string()))
    }

    fn finish(&mut self, summary: &livesnap::ImageSummary) -> io::Result<()> {
        self.image_len.store(summary.image_len, Ordering::SeqCst);
        Ok(())
    }

    fn abort(&mut self) {}
}

/// The VM state of snapshot `tag` of disk `d`, as a livesnap source that reads it
/// from the image as it is needed (through a second, read-only handle): loading
/// never holds the whole VM state in memory, only guest RAM itself.
pub fn vmstate_source(
    d: &Qcow2Handle,
    tag: &str,
) -> Result<Box<dyn livesnap::Source>, SnapshotError> {
    let q = d.reader().map_err(|source| SnapshotError::ReadVmState {
        tag: tag.to_string(),
        source,
    })?;
    let info = q
        .snapshots()
        .iter()
        .find(|s| s.name == tag)
        .cloned()
        .ok_or_else(|| SnapshotError::NoSuchSnapshot(tag.to_string()))?;
    if info.vm_state_size == 0 {
        return Err(SnapshotError::NoVmState(tag.to_string()));
    }
    Ok(Box::new(VmStateSource {
        q: Mutex::new(q),
        tag: tag.to_string(),
        len: info.vm_state_size,
    }))
}

/// A snapshot's VM state inside a qcow2 image, read on demand.
struct VmStateSource {
    q: Mutex<qcow2::Qcow2>,
    tag: String,
    len: u64,
}

impl livesnap::Source for VmStateSource {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        vmm::devices::lock(&self.q)
            .read_vmstate(&self.tag, offset, buf)
            .map_err(io::Error::other)
    }
    fn len(&self) -> u64 {
        self.len
    }
}

/// `--loadvm TAG`: reverts every qcow2 disk holding TAG and decodes the VM
/// state from the first of them that has one.
pub fn load_from_disks(
    disks: &Disks,
    tag: &str,
) -> Result<(vmm::memory::GuestRam, vmm::MachineState), SnapshotError> {
    let mut vmstate = None;
    let mut holders = Vec::new();
    for d in disks.iter() {
        if d.readonly {
            continue; // not part of VM snapshots, as in QEMU
        }
        let Some(q) = &d.qcow2 else {
            return Err(SnapshotError::NotSnapshotCapable(d.id.clone()));
        };
        // Every writable disk must hold the snapshot: RAM and disks of one instant.
        let size = q.with(|q| {
            q.snapshots()
                .iter()
                .find(|s| s.name == tag)
                .map(|s| s.vm_state_size)
        });
        let size = size.ok_or_else(|| SnapshotError::NotOnEveryDisk(tag.to_string()))?;
        if vmstate.is_none() && size > 0 {
            vmstate = Some(q);
        }
        holders.push(d);
    }
    let vm = vmstate.ok_or_else(|| SnapshotError::NoVmStateDisk(tag.to_string()))?;
    let (ram, state) = super::restore::from_source(vmstate_source(vm, tag)?)?;
    for d in holders {
        if let Some(q) = &d.qcow2 {
            q.with(|q| q.apply_snapshot(tag))
                .map_err(|e| SnapshotError::disk(&d.id, e))?;
        }
    }
    Ok((ram, state))
}
