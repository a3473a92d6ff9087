//! The KVM VM: memory slots, in-kernel irqchip and PIT, irqfds, and the GSI
//! routes of MSI-X vectors.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip,
    kvm_irq_routing_msi, kvm_pit_config, kvm_userspace_memory_region, KvmIrqRouting,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP,
    KVM_IRQ_ROUTING_MSI, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::{ioctl, KvmError};
use crate::devices::virtio::pci::{MsiMessage, MsiRoutes};
use crate::memory::GuestRam;

/// Default KVM device.
pub const KVM_DEVICE: &str = "/dev/kvm";
const TSS_ADDR: usize = 0xfffb_d000;
const IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// An open KVM system handle and one VM.
pub struct KvmVm {
    pub kvm: Kvm,
    /// Shared with [`GsiRoutes`], which changes the VM's interrupt routing.
    pub fd: Arc<VmFd>,
}

impl KvmVm {
    /// Opens `path` (normally `/dev/kvm`) and creates a VM with an in-kernel
    /// irqchip and PIT.
    pub fn new(path: &Path) -> Result<Self, KvmError> {
        let kvm = open(path)?;
        for (cap, name) in [
            (Cap::Irqchip, "IRQCHIP"),
            (Cap::Pit2, "PIT2"),
            (Cap::ImmediateExit, "IMMEDIATE_EXIT"),
            (Cap::UserMemory, "USER_MEMORY"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(KvmError::MissingCap(name));
            }
        }
        let fd = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        fd.set_tss_address(TSS_ADDR)
            .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
        fd.set_identity_map_address(IDENTITY_MAP_ADDR)
            .map_err(ioctl("KVM_SET_IDENTITY_MAP_ADDR"))?;
        fd.create_irq_chip().map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(ioctl("KVM_CREATE_PIT2"))?;
        init_pics(&fd)?;
        Ok(KvmVm {
            kvm,
            fd: Arc::new(fd),
        })
    }

    /// Registers every RAM region as a memory slot.
    pub fn map_ram(&self, ram: &GuestRam) -> Result<(), KvmError> {
        for (slot, r) in ram.regions().iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: r.gpa,
                memory_size: r.len,
                userspace_addr: r.host as u64,
            };
            // SAFETY: the region's host range is a live mapping owned by `ram`, and the
            // machine keeps `ram` alive for as long as this VM exists.
            unsafe { self.fd.set_user_memory_region(region) }
                .map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }

    /// Connects an eventfd to a GSI.
    pub fn irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), KvmError> {
        self.fd.register_irqfd(evt, gsi).map_err(ioctl("KVM_IRQFD"))
    }

    /// Largest number of vCPUs this KVM supports.
    /// Has KVM signal `evt` on a guest write of `value` (4 bytes) to MMIO
    /// address `addr`, without leaving `KVM_RUN`.
    pub fn ioeventfd(&self, evt: &EventFd, addr: u64, value: u32) -> Result<(), KvmError> {
        self.fd
            .register_ioevent(evt, &kvm_ioctls::IoEventAddress::Mmio(addr), value)
            .map_err(ioctl("KVM_IOEVENTFD"))
    }

    /// Has KVM signal `evt` on a guest write of any size and value to MMIO
    /// address `addr` (a virtio-pci queue notification).
    pub fn ioeventfd_any(&self, evt: &EventFd, addr: u64) -> Result<(), KvmError> {
        self.fd
            .register_ioevent(
                evt,
                &kvm_ioctls::IoEventAddress::Mmio(addr),
                kvm_ioctls::NoDatamatch,
            )
            .map_err(ioctl("KVM_IOEVENTFD"))
    }

    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }
}

/// GSIs below this are the irqchip pins; MSI routes are numbered from here.
pub const FIRST_MSI_GSI: u32 = 24;

/// The VM's interrupt routing: the irqchip pins as KVM sets them up by
/// default (GSI 0-15 to both 8259s and the IOAPIC, 16-23 to the IOAPIC),
/// plus a route per MSI-X vector the guest programmed. KVM replaces the
/// whole table on every change, so the table is kept here.
pub struct GsiRoutes {
    fd: Arc<VmFd>,
    msi: Mutex<BTreeMap<u32, MsiMessage>>,
}

impl GsiRoutes {
    pub fn new(fd: Arc<VmFd>) -> GsiRoutes {
        GsiRoutes {
            fd,
            msi: Mutex::new(BTreeMap::new()),
        }
    }

    fn table(msi: &BTreeMap<u32, MsiMessage>) -> Vec<kvm_irq_routing_entry> {
        let chip = |gsi: u32, irqchip: u32, pin: u32| kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            u: kvm_irq_routing_entry__bindgen_ty_1 {
                irqchip: kvm_irq_routing_irqchip { irqchip, pin },
            },
            ..Default::default()
        };
        let mut t = Vec::new();
        for gsi in 0..FIRST_MSI_GSI {
            if gsi < 16 {
                let pic = if gsi < 8 {
                    KVM_IRQCHIP_PIC_MASTER
                } else {
                    KVM_IRQCHIP_PIC_SLAVE
                };
                t.push(chip(gsi, pic, gsi % 8));
            }
            t.push(chip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        }
        for (gsi, m) in msi {
            t.push(kvm_irq_routing_entry {
                gsi: *gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                u: kvm_irq_routing_entry__bindgen_ty_1 {
                    msi: kvm_irq_routing_msi {
                        address_lo: m.addr as u32,
                        address_hi: (m.addr >> 32) as u32,
                        data: m.data,
                        ..Default::default()
                    },
                },
                ..Default::default()
            });
        }
        t
    }
}

impl MsiRoutes for GsiRoutes {
    fn route(&self, gsi: u32, msg: Option<MsiMessage>) -> std::io::Result<()> {
        let mut msi = crate::devices::lock(&self.msi);
        let changed = match msg {
            Some(m) => msi.insert(gsi, m) != Some(m),
            None => msi.remove(&gsi).is_some(),
        };
        if !changed {
            return Ok(());
        }
        let entries = GsiRoutes::table(&msi);
        let mut r = KvmIrqRouting::new(entries.len())
            .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        r.as_mut_slice().copy_from_slice(&entries);
        self.fd
            .set_gsi_routing(&r)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

fn open(path: &Path) -> Result<Kvm, KvmError> {
    let owned = path.to_path_buf();
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(KvmError::DeviceMissing { path: owned })
        }
        _ => {}
    }
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
        KvmError::NotKvm {
            path: owned.clone(),
            what: "path contains NUL".into(),
        }
    })?;
    let kvm = Kvm::new_with_path(&cpath).map_err(|e| match e.errno() {
        libc::ENOENT => KvmError::DeviceMissing {
            path: owned.clone(),
        },
        libc::EACCES | libc::EPERM => KvmError::DeviceAccess {
            path: owned.clone(),
        },
        _ => KvmError::DeviceOpen {
            path: owned.clone(),
            source: std::io::Error::from_raw_os_error(e.errno()),
        },
    })?;
    let api = kvm.get_api_version();
    if api != 12 {
        return Err(KvmError::NotKvm {
            path: owned,
            what: format!("KVM_GET_API_VERSION returned {api}, expected 12"),
        });
    }
    Ok(kvm)
}

/// Sets the 8259 PICs as PC firmware leaves them: vectors 0x08 / 0x70, every
/// line masked but the cascade. KVM creates them zeroed — vector base 0,
/// nothing masked — so a guest that enables interrupts before programming
/// them would take IRQ 4 as exception vector 4. An OS that uses them
/// programs them itself (Linux: vectors 0x30 / 0x38).
fn init_pics(fd: &VmFd) -> Result<(), KvmError> {
    use kvm_bindings::{kvm_irqchip, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE};
    for (chip, base, imr) in [
        (KVM_IRQCHIP_PIC_MASTER, 0x08u8, 0xfbu8),
        (KVM_IRQCHIP_PIC_SLAVE, 0x70, 0xff),
    ] {
        let mut c = kvm_irqchip {
            chip_id: chip,
            ..Default::default()
        };
        fd.get_irqchip(&mut c).map_err(ioctl("KVM_GET_IRQCHIP"))?;
        // SAFETY: chip_id selects the PIC member of the union, which
        // KVM_GET_IRQCHIP just filled.
        let pic = unsafe { &mut c.chip.pic };
        pic.irq_base = base;
        pic.imr = imr;
        pic.init4 = 1;
        fd.set_irqchip(&c).map_err(ioctl("KVM_SET_IRQCHIP"))?;
    }
    Ok(())
}
