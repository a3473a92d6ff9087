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

/// Feature words a guest uses without asking the hypervisor: (leaf, subleaf,
/// register index 0..4 = EAX, EBX, ECX, EDX, bits to ignore). The ignored bits
/// are set by snapvmm itself (hypervisor, HTT) or follow the guest's own control
/// registers (OSXSAVE, OSPKE), so they say nothing about the host.
const FEATURE_WORDS: &[(u32, u32, usize, u32)] = &[
    (1, 0, 2, 1 << 31 | 1 << 27),
    (1, 0, 3, 1 << 28),
    (7, 0, 1, 0),
    (7, 0, 2, 1 << 4),
    (7, 0, 3, 0),
    (0xd, 1, 0, 0),
    (0x8000_0001, 0, 2, 0),
    (0x8000_0001, 0, 3, 0),
];

fn word(entries: &[kvm_cpuid_entry2], leaf: u32, sub: u32, reg: usize) -> u32 {
    entries
        .iter()
        .find(|e| e.function == leaf && (!indexed(e) || e.index == sub))
        .map_or(0, |e| [e.eax, e.ebx, e.ecx, e.edx][reg])
}

/// The CPU features a saved vCPU was given (its CPUID) that `supported` (what a
/// vCPU booted on this host gets) lacks, one line each: restoring such a vCPU
/// would let the guest run instructions this CPU lacks.
pub fn missing_features(saved: &[kvm_cpuid_entry2], supported: &[kvm_cpuid_entry2]) -> Vec<String> {
    const REGS: [&str; 4] = ["EAX", "EBX", "ECX", "EDX"];
    let mut out = Vec::new();
    for &(leaf, sub, reg, ignore) in FEATURE_WORDS {
        let lacking = word(saved, leaf, sub, reg) & !word(supported, leaf, sub, reg) & !ignore;
        for bit in (0..32).filter(|b| lacking & (1 << b) != 0) {
            out.push(format!(
                "CPUID.(EAX={leaf:#x},ECX={sub}):{}[{bit}]",
                REGS[reg]
            ));
        }
    }
    out
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

    fn leaf(function: u32, index: u32, regs: [u32; 4], indexed: bool) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: if indexed {
                KVM_CPUID_FLAG_SIGNIFCANT_INDEX
            } else {
                0
            },
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    #[test]
    fn features_the_host_lacks_are_named() {
        let host = [
            leaf(1, 0, [0, 0, 0x0000_0201, 0x0000_0001], false),
            leaf(7, 0, [0, 1 << 5, 0, 0], true), // AVX2
            leaf(7, 1, [0, 0, 0, 0], true),
        ];
        // The same features, plus the bits snapvmm sets or the guest toggles.
        let same = [
            leaf(
                1,
                0,
                [0, 0, 0x0000_0201 | 1 << 31 | 1 << 27, 1 | 1 << 28],
                false,
            ),
            leaf(7, 0, [0, 1 << 5, 1 << 4, 0], true),
        ];
        assert!(missing_features(&same, &host).is_empty());
        // A source CPU with AVX-512F (leaf 7 EBX bit 16) and SSE4.2 (leaf 1 ECX bit 20).
        let richer = [
            leaf(1, 0, [0, 0, 0x0000_0201 | 1 << 20, 1], false),
            leaf(7, 0, [0, 1 << 5 | 1 << 16, 0, 0], true),
        ];
        assert_eq!(
            missing_features(&richer, &host),
            vec![
                "CPUID.(EAX=0x1,ECX=0):ECX[20]".to_string(),
                "CPUID.(EAX=0x7,ECX=0):EBX[16]".to_string()
            ]
        );
        // Subleaves are told apart: leaf 7 subleaf 1 is not subleaf 0.
        let sub1 = [leaf(7, 1, [0, 1 << 16, 0, 0], true)];
        assert!(missing_features(&sub1, &host).is_empty());
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
