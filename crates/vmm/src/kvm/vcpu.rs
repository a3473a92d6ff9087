//! One vCPU: boot register setup and the architectural state saved in a snapshot.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use super::{ioctl, KvmError};
use crate::boot::{linux, BootEntry};
use crate::layout;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// MSRs saved with every vCPU (those KVM accepts; probed once per VM).
pub const SAVED_MSRS: &[u32] = &[
    0x10,        // TSC
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x1a0,       // MISC_ENABLE
    0x277,       // PAT
    0x2ff,       // MTRR default type
    0x6e0,       // TSC_DEADLINE
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
    0x4b56_4d00, // kvmclock wall clock
    0x4b56_4d01, // kvmclock system time
    // The "page ready" vector must be set before async PF is enabled (KVM
    // checks it then): without it a restored Linux guest that takes an async
    // page fault (RAM not yet in place: a lazy or userfaultfd restore) never
    // hears that the page is ready, and the faulting task hangs for good.
    0x4b56_4d06, // async PF interrupt vector
    0x4b56_4d02, // async PF
    0x4b56_4d03, // steal time
    0x4b56_4d04, // PV EOI
    0x4b56_4d05, // poll control
];

/// Everything KVM holds for one vCPU. Saved with the vCPU paused and out of
/// `KVM_RUN` (so pending I/O completed); restored in an order where each step
/// only depends on earlier ones (CPUID first, events last).
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub msrs: Vec<kvm_msr_entry>,
    pub lapic: kvm_lapic_state,
    pub vcpu_events: kvm_vcpu_events,
    pub debugregs: kvm_debugregs,
    pub tsc_khz: u32,
}

/// A vCPU file descriptor with its index.
pub struct Vcpu {
    pub id: u8,
    pub fd: VcpuFd,
}

impl Vcpu {
    /// Sets CPUID, FPU defaults, LAPIC LINT pins and, for the boot vCPU, the
    /// registers its boot protocol expects. Application processors stay in
    /// wait-for-SIPI (KVM's default for them with an in-kernel irqchip).
    pub fn configure(&self, cpuid: &CpuId, boot: Option<BootEntry>) -> Result<(), KvmError> {
        self.fd.set_cpuid2(cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd.set_fpu(&fpu).map_err(ioctl("KVM_SET_FPU"))?;
        self.set_lint()?;
        if let Some(entry) = boot {
            let mut sregs = self.fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
            let regs = boot_registers(entry, &mut sregs);
            self.fd.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS"))?;
            self.fd.set_regs(&regs).map_err(ioctl("KVM_SET_REGS"))?;
        }
        Ok(())
    }

    fn set_lint(&self) -> Result<(), KvmError> {
        let mut lapic = self.fd.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
        let set = |l: &mut kvm_lapic_state, reg: usize, mode: u32| {
            let mut b = [0u8; 4];
            for (i, x) in b.iter_mut().enumerate() {
                *x = l.regs[reg + i] as u8;
            }
            let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
            for (i, x) in v.to_le_bytes().iter().enumerate() {
                l.regs[reg + i] = *x as _;
            }
        };
        set(&mut lapic, APIC_LVT0, APIC_MODE_EXTINT);
        set(&mut lapic, APIC_LVT1, APIC_MODE_NMI);
        self.fd.set_lapic(&lapic).map_err(ioctl("KVM_SET_LAPIC"))
    }

    /// Reads every piece of vCPU state. The vCPU must not be in `KVM_RUN`.
    pub fn save(&self, msr_list: &[u32]) -> Result<VcpuState, KvmError> {
        let f = &self.fd;
        // mp_state first: reading it may flush pending APIC events into state.
        let mp_state = f.get_mp_state().map_err(ioctl("KVM_GET_MP_STATE"))?;
        let regs = f.get_regs().map_err(ioctl("KVM_GET_REGS"))?;
        let sregs = f.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
        let xsave = f.get_xsave().map_err(ioctl("KVM_GET_XSAVE"))?;
        let xcrs = f.get_xcrs().map_err(ioctl("KVM_GET_XCRS"))?;
        let msrs = read_msrs(f, msr_list)?;
        let lapic = f.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
        let debugregs = f.get_debug_regs().map_err(ioctl("KVM_GET_DEBUGREGS"))?;
        let cpuid = f
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        let tsc_khz = f.get_tsc_khz().unwrap_or(0);
        // Events last: they reflect everything read above.
        let vcpu_events = f.get_vcpu_events().map_err(ioctl("KVM_GET_VCPU_EVENTS"))?;
        Ok(VcpuState {
            id: self.id,
            cpuid,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            msrs,
            lapic,
            vcpu_events,
            debugregs,
            tsc_khz,
        })
    }

    /// Writes back state from [`Vcpu::save`].
    pub fn restore(&self, s: &VcpuState) -> Result<(), KvmError> {
        let f = &self.fd;
        let cpuid = CpuId::from_entries(&s.cpuid).map_err(|_| KvmError::Ioctl {
            op: "KVM_SET_CPUID2",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        f.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
        if s.tsc_khz != 0 && f.get_tsc_khz().ok() != Some(s.tsc_khz) {
            // Not fatal: hosts with a different TSC rate still run the guest.
            let _ = f.set_tsc_khz(s.tsc_khz);
        }
        f.set_sregs(&s.sregs).map_err(ioctl("KVM_SET_SREGS"))?;
        f.set_regs(&s.regs).map_err(ioctl("KVM_SET_REGS"))?;
        // SAFETY: snapvmm never enables dynamically-permitted XSTATE features (no
        // ARCH_REQ_XCOMP_GUEST_PERM), so the state fits the legacy 4 KiB kvm_xsave.
        unsafe { f.set_xsave(&s.xsave) }.map_err(ioctl("KVM_SET_XSAVE"))?;
        f.set_xcrs(&s.xcrs).map_err(ioctl("KVM_SET_XCRS"))?;
        f.set_lapic(&s.lapic).map_err(ioctl("KVM_SET_LAPIC"))?;
        let msrs = Msrs::from_entries(&s.msrs).map_err(|_| KvmError::Ioctl {
            op: "KVM_SET_MSRS",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let n = f.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
        if n != s.msrs.len() {
            let idx = s.msrs[n].index;
            return Err(KvmError::Ioctl {
                op: "KVM_SET_MSRS",
                source: kvm_ioctls::Error::new(libc::EINVAL),
            })
            .inspect_err(|_| tracing::warn!(msr = format!("{idx:#x}"), "MSR rejected on restore"));
        }
        f.set_debug_regs(&s.debugregs)
            .map_err(ioctl("KVM_SET_DEBUGREGS"))?;
        f.set_mp_state(s.mp_state)
            .map_err(ioctl("KVM_SET_MP_STATE"))?;
        f.set_vcpu_events(&s.vcpu_events)
            .map_err(ioctl("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// The MSRs of `candidates` this vCPU can read (probed one by one).
pub fn probe_msrs(fd: &VcpuFd, candidates: &[u32]) -> Vec<u32> {
    candidates
        .iter()
        .copied()
        .filter(|&m| read_msrs(fd, &[m]).is_ok())
        .collect()
}

fn read_msrs(fd: &VcpuFd, list: &[u32]) -> Result<Vec<kvm_msr_entry>, KvmError> {
    let entries: Vec<_> = list
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|_| KvmError::Ioctl {
        op: "KVM_GET_MSRS",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    let n = fd.get_msrs(&mut msrs).map_err(ioctl("KVM_GET_MSRS"))?;
    if n != list.len() {
        return Err(KvmError::Ioctl {
            op: "KVM_GET_MSRS",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        });
    }
    Ok(msrs.as_slice().to_vec())
}

/// Registers and segment state for entering `entry`; updates `sregs` in place.
pub fn boot_registers(entry: BootEntry, sregs: &mut kvm_sregs) -> kvm_regs {
    let seg = |selector: u16, type_: u8, l: u8, db: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        BootEntry::Pvh { entry, start_info } => {
            // PVH: 32-bit flat protected mode, paging off (xen/arch-x86/hvm/start_info.h).
            sregs.cs = seg(0x8, 0xb, 0, 1);
            let data = seg(0x10, 0x3, 0, 1);
            (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
            sregs.tr = kvm_segment {
                limit: 0x67,
                type_: 0xb,
                present: 1,
                selector: 0x18,
                ..Default::default()
            };
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry;
            regs.rbx = start_info;
        }
        BootEntry::Linux64 { entry, boot_params } => {
            sregs.gdt.base = layout::BOOT_GDT;
            sregs.gdt.limit = (linux::BOOT_GDT.len() * 8 - 1) as u16;
            sregs.cs = seg(linux::BOOT_CS, 0xb, 1, 0);
            let data = seg(linux::BOOT_DS, 0x3, 0, 1);
            (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
            sregs.tr = kvm_segment {
                limit: 0x67,
                type_: 0xb,
                present: 1,
                selector: 0x20,
                ..Default::default()
            };
            sregs.cr3 = layout::BOOT_PML4;
            sregs.cr4 = X86_CR4_PAE;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
            regs.rip = entry;
            regs.rsi = boot_params;
            regs.rsp = layout::BOOT_PML4 - 0x10;
            regs.rbp = regs.rsp;
        }
    }
    regs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvh_entry_is_flat_protected_mode_without_paging() {
        let mut s = kvm_sregs::default();
        let r = boot_registers(
            BootEntry::Pvh {
                entry: 0x10_0020,
                start_info: 0x6000,
            },
            &mut s,
        );
        assert_eq!((r.rip, r.rbx, r.rflags), (0x10_0020, 0x6000, 2));
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE);
        assert_eq!(
            (s.cs.db, s.cs.l, s.cs.limit, s.cs.base),
            (1, 0, 0xffff_ffff, 0)
        );
        assert_eq!(s.efer, 0);
    }

    #[test]
    fn linux_entry_is_long_mode_with_boot_params_in_rsi() {
        let mut s = kvm_sregs::default();
        let r = boot_registers(
            BootEntry::Linux64 {
                entry: 0x10_0200,
                boot_params: 0x7000,
            },
            &mut s,
        );
        assert_eq!((r.rip, r.rsi), (0x10_0200, 0x7000));
        assert_eq!(s.cs.selector, linux::BOOT_CS);
        assert_eq!(s.ds.selector, linux::BOOT_DS);
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, layout::BOOT_PML4);
        assert_ne!(s.cr4 & X86_CR4_PAE, 0);
    }
}
