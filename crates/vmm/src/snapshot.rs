//! Saving and restoring everything of a machine except RAM.
//!
//! The snapshot engine (crate `livesnap`) treats this state as opaque bytes; this
//! module owns its shape. Everything is read while all vCPUs are paused and out
//! of `KVM_RUN`, in this order: vCPUs first (reading `mp_state` folds pending
//! APIC events into saved state), then the VM-wide irqchip, PIT and clock, then
//! the emulated devices. With the vCPUs stopped nothing can change any of these
//! in between, so the pieces agree with each other and with RAM at that instant.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use serde::{Deserialize, Serialize};

use crate::devices::i8042::I8042State;
use crate::devices::lock;
use crate::devices::serial::SerialState;
use crate::kvm::vcpu::VcpuState;
use crate::kvm::vm::KvmVm;
use crate::kvm::{ioctl, KvmError};
use crate::machine::Machine;
use crate::VmmError;

/// Version of [`MachineState`]'s layout; bumped on any incompatible change.
pub const STATE_VERSION: u32 = 1;
/// Minor version, bumped when fields are added compatibly (older readers ignore
/// them; newer readers default them): 1 added `acpi`, 2 added `nets` and `vsock`,
/// 3 added `pci` (and the devices' PCI registers and extra disk queues), 4
/// added `pci_hotplug`.
pub const STATE_MINOR: u32 = 4;

/// KVM's VM-wide state: PIC, IOAPIC, PIT, kvmclock.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// Everything of a machine except guest RAM.
#[derive(Serialize, Deserialize)]
pub struct MachineState {
    /// Major version: a reader refuses any other (naming both).
    pub version: u32,
    /// Minor version: fields added compatibly; a reader ignores fields it does
    /// not know, so an image from a newer minor version restores.
    #[serde(default)]
    pub minor: u32,
    pub mem_bytes: u64,
    pub cpus: u8,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub serial: SerialState,
    pub i8042: I8042State,
    /// ACPI power management (absent in images from before ACPI).
    #[serde(default)]
    pub acpi: crate::devices::acpi::AcpiPmState,
    /// virtio-blk devices, in device order (absent in images without disks).
    #[serde(default)]
    pub virtio: Vec<crate::devices::virtio::VirtioBlkState>,
    /// virtio-net devices, in device order (absent in images without NICs).
    #[serde(default)]
    pub nets: Vec<crate::devices::virtio::net::VirtioNetState>,
    /// The vsock device (absent in images without one).
    #[serde(default)]
    pub vsock: Option<crate::devices::virtio::vsock::VsockState>,
    /// The virtio devices are on virtio-pci (false: virtio-mmio, as in
    /// images from before virtio-pci).
    #[serde(default)]
    pub pci: bool,
    /// A re-plug the guest had not finished (absent: none).
    #[serde(default)]
    pub pci_hotplug: crate::devices::hotplug::PciHotplugState,
}

/// Errors decoding saved state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("saved machine state is not readable: {0}")]
    Decode(String),
    #[error("saved machine state has version {found}, this snapvmm reads version {expected}")]
    Version { found: u32, expected: u32 },
    #[error("saved machine state is inconsistent: {0}")]
    Inconsistent(String),
}

impl MachineState {
    /// Guest-physical addresses KVM reads or writes as soon as this state is
    /// loaded, before any vCPU runs: the paravirtual areas enabled through
    /// MSRs (kvmclock system time, steal time, async PF, PV EOI). A restore
    /// whose RAM arrives later wants these pages first.
    pub fn pv_area_addresses(&self) -> Vec<u64> {
        // (MSR, whether bit 0 enables the area): kvmclock wall clock (any
        // write makes KVM write the wall clock there), kvmclock system time,
        // async PF, steal time, PV EOI; old and new numbers.
        const AREAS: [(u32, bool); 7] = [
            (0x11, false),
            (0x12, true),
            (0x4b56_4d00, false),
            (0x4b56_4d01, true),
            (0x4b56_4d02, true),
            (0x4b56_4d03, true),
            (0x4b56_4d04, true),
        ];
        let mut out = Vec::new();
        for v in &self.vcpus {
            for m in &v.msrs {
                let Some((_, enable_bit)) = AREAS.iter().find(|(i, _)| *i == m.index) else {
                    continue;
                };
                if (!enable_bit && m.data != 0) || (*enable_bit && m.data & 1 != 0) {
                    out.push(m.data & !0xfff);
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Guest-physical pages each vCPU goes through first when it runs
    /// again: the page tables its MMU walks for the instruction pointer, the
    /// stack pointer, the interrupt table, its handlers and the kernel stack
    /// an interrupt switches to, and those pages themselves
    /// ([`crate::paging`]), read from `mem` while the guest is paused. A
    /// live migration sends them with the state, so that the guest's first
    /// instructions on the target do not each wait for a round trip.
    pub fn pages_touched_first(&self, mem: &impl vm_memory::GuestMemory) -> Vec<u64> {
        use crate::paging::{idt_handlers, walk, Paging};
        let mut out = Vec::new();
        for v in &self.vcpus {
            let s = &v.sregs;
            let paging = Paging::of(s.cr0, s.cr4, s.efer);
            let mut at = vec![v.regs.rip, v.regs.rsp, s.idt.base];
            // An interrupt taken first goes to its handler, on the kernel
            // stack the TSS names (RSP0) when the vCPU was in user mode.
            at.extend(idt_handlers(mem, paging, s.cr3, s.idt.base, s.idt.limit));
            let mut scratch = Vec::new();
            if let Some(pa) = walk(mem, paging, s.cr3, s.tr.base + 4, &mut scratch) {
                if let Ok(rsp0) =
                    vm_memory::Bytes::read_obj::<u64>(mem, vm_memory::GuestAddress(pa))
                {
                    at.push(rsp0.wrapping_sub(8));
                }
            }
            for va in at {
                walk(mem, paging, s.cr3, va, &mut out);
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Serializes to bytes (JSON: self-describing, easy to inspect with `jq`).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("machine state is always serializable")
    }

    /// Parses bytes from [`MachineState::to_bytes`], checking version and shape.
    pub fn from_bytes(b: &[u8]) -> Result<Self, StateError> {
        #[derive(Deserialize)]
        struct Probe {
            version: u32,
        }
        let probe: Probe =
            serde_json::from_slice(b).map_err(|e| StateError::Decode(e.to_string()))?;
        if probe.version != STATE_VERSION {
            return Err(StateError::Version {
                found: probe.version,
                expected: STATE_VERSION,
            });
        }
        let s: MachineState =
            serde_json::from_slice(b).map_err(|e| StateError::Decode(e.to_string()))?;
        if s.cpus > crate::machine::MAX_CPUS {
            return Err(StateError::Inconsistent(format!(
                "the snapshot is of a machine with {} vCPUs; snapvmm runs 1 to {}",
                s.cpus,
                crate::machine::MAX_CPUS
            )));
        }
        if s.mem_bytes < crate::machine::MIN_MEM {
            return Err(StateError::Inconsistent(format!(
                "the snapshot is of a machine with {} bytes of RAM; snapvmm needs at least {}",
                s.mem_bytes,
                crate::machine::MIN_MEM
            )));
        }
        if s.cpus == 0 || s.vcpus.len() != usize::from(s.cpus) {
            return Err(StateError::Inconsistent(format!(
                "{} vCPU states for {} vCPUs",
                s.vcpus.len(),
                s.cpus
            )));
        }
        if s.vcpus
            .iter()
            .enumerate()
            .any(|(i, v)| usize::from(v.id) != i)
        {
            return Err(StateError::Inconsistent("vCPU states out of order".into()));
        }
        Ok(s)
    }
}

impl VmState {
    pub(crate) fn save(vm: &KvmVm) -> Result<Self, KvmError> {
        let chip = |id| {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            vm.fd
                .get_irqchip(&mut c)
                .map(|_| c)
                .map_err(ioctl("KVM_GET_IRQCHIP"))
        };
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: vm.fd.get_pit2().map_err(ioctl("KVM_GET_PIT2"))?,
            clock: vm.fd.get_clock().map_err(ioctl("KVM_GET_CLOCK"))?,
        })
    }

    pub(crate) fn restore(&self, vm: &KvmVm) -> Result<(), KvmError> {
        for c in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            vm.fd.set_irqchip(c).map_err(ioctl("KVM_SET_IRQCHIP"))?;
        }
        vm.fd.set_pit2(&self.pit).map_err(ioctl("KVM_SET_PIT2"))?;
        // Only the clock value is meaningful on another host or later; drop the
        // flags that describe the saving host's TSC.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.fd.set_clock(&clock).map_err(ioctl("KVM_SET_CLOCK"))
    }
}

impl Machine {
    /// Reads all non-RAM state. The machine must be paused.
    pub fn save_state(&self) -> Result<MachineState, VmmError> {
        let pending = self.begin_save_state()?;
        self.finish_save_state(pending)
    }

    /// Starts saving the state of a paused machine: every vCPU thread saves
    /// its own registers, in parallel, while the caller does something else
    /// that needs the machine paused (e.g. fork the RAM capture).
    /// [`Machine::finish_save_state`] collects the result.
    pub fn begin_save_state(&self) -> Result<PendingState, VmmError> {
        if self.is_running() {
            return Err(VmmError::NotPaused);
        }
        Ok(PendingState(
            self.vcpus().iter().map(|v| v.begin_save()).collect(),
        ))
    }

    /// Completes [`Machine::begin_save_state`]: the vCPUs' registers, then the
    /// VM (irqchip, PIT, clock) and the devices. The machine must still be paused.
    pub fn finish_save_state(&self, pending: PendingState) -> Result<MachineState, VmmError> {
        let vcpus = pending
            .0
            .into_iter()
            .map(|p| p.wait())
            .collect::<Result<Vec<_>, _>>()?;
        let vm = VmState::save(self.vm())?;
        Ok(MachineState {
            version: STATE_VERSION,
            minor: STATE_MINOR,
            mem_bytes: self.ram().size(),
            cpus: self.cpus(),
            vcpus,
            vm,
            serial: lock(&self.bus().serial).save(),
            i8042: lock(&self.bus().i8042).save(),
            acpi: self.bus().acpi.save(),
            virtio: self.bus().virtio.iter().map(|d| lock(d).save()).collect(),
            nets: self.bus().nets.iter().map(|n| lock(n).save()).collect(),
            pci: self.bus().pci.is_some(),
            pci_hotplug: self
                .bus()
                .pci
                .as_ref()
                .map(|p| p.hotplug.save())
                .unwrap_or_default(),
            vsock: self.bus().vsock.as_ref().map(|v| lock(v).save()),
        })
    }
}

/// A machine-state save in progress (see [`Machine::begin_save_state`]).
pub struct PendingState(Vec<crate::vcpu_thread::PendingSave>);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_and_wrong_versions_are_refused() {
        assert!(matches!(
            MachineState::from_bytes(b"not json"),
            Err(StateError::Decode(_))
        ));
        assert!(matches!(
            MachineState::from_bytes(br#"{"version": 99}"#),
            Err(StateError::Version { found: 99, .. })
        ));
        assert!(matches!(
            MachineState::from_bytes(br#"{"version": 1}"#),
            Err(StateError::Decode(_))
        ));
    }
}
