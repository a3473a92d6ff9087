//! The CPUID each vCPU sees: KVM's supported set, with the topology of this
//! machine and the TSC frequency leaf the reference guest reads.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// KVM/VMware timing leaf: EAX = TSC kHz, EBX = APIC bus kHz.
pub const TIMING_LEAF: u32 = 0x4000_0010;
const HYPERVISOR_BASE: u32 = 0x4000_0000;
const APIC_BUS_KHZ: u32 = 1_000_000;

/// Adjusts `cpuid` for vCPU `id` of `cpus`: APIC IDs, logical CPU count,
/// hypervisor bit, and the timing leaf with `tsc_khz`.
pub fn patch(cpuid: &mut CpuId, id: u8, cpus: u8, tsc_khz: u32) -> Result<(), String> {
    let mut has_timing = false;
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(cpus) << 16);
                e.ecx |= 1 << 31; // running under a hypervisor
                if cpus > 1 {
                    e.edx |= 1 << 28; // HTT: EBX[23:16] is valid
                }
            }
            0xb | 0x1f => e.edx = u32::from(id), // x2APIC ID
            HYPERVISOR_BASE => e.eax = e.eax.max(TIMING_LEAF),
            TIMING_LEAF => {
                has_timing = true;
                e.eax = tsc_khz;
                e.ebx = APIC_BUS_KHZ;
            }
            _ => {}
        }
    }
    if !has_timing && tsc_khz != 0 {
        let leaf = kvm_cpuid_entry2 {
            function: TIMING_LEAF,
            eax: tsc_khz,
            ebx: APIC_BUS_KHZ,
            ..Default::default()
        };
        cpuid
            .push(leaf)
            .map_err(|e| format!("cannot add CPUID leaf {TIMING_LEAF:#x}: {e:?}"))?;
    }
    Ok(())
}

/// True if entry `e` is indexed by ECX (so `index` matters).
pub fn indexed(e: &kvm_cpuid_entry2) -> bool {
    e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> CpuId {
        CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xff00_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: HYPERVISOR_BASE,
                eax: 0x4000_0001,
                ..Default::default()
            },
        ])
        .unwrap()
    }

    #[test]
    fn topology_and_timing_leaf() {
        let mut c = base();
        patch(&mut c, 3, 4, 2_100_000).unwrap();
        let s = c.as_slice();
        let l1 = s.iter().find(|e| e.function == 1).unwrap();
        assert_eq!(l1.ebx >> 24, 3, "APIC ID");
        assert_eq!((l1.ebx >> 16) & 0xff, 4, "logical CPUs");
        assert_eq!(l1.ebx & 0xffff, 0x0800, "other bits kept");
        assert_ne!(l1.edx & (1 << 28), 0);
        assert_eq!(
            s.iter()
                .find(|e| e.function == HYPERVISOR_BASE)
                .unwrap()
                .eax,
            TIMING_LEAF
        );
        assert_eq!(
            s.iter().find(|e| e.function == TIMING_LEAF).unwrap().eax,
            2_100_000
        );
    }
}
