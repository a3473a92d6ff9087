//! Hardware-reduced ACPI tables: how stock distribution kernels find the
//! machine's devices (Debian's kernels, for one, are built without
//! `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`, so ACPI is their only way to see a
//! virtio-mmio disk).
//!
//! ```text
//! RSDP (0xe0000, where Linux also scans for it) -> XSDT -> FADT -> DSDT, FACS
//!                                                       -> MADT
//! ```
//! - FADT: hardware-reduced, or for a `noapic` command line a full one (PM1
//!   event and control blocks, the SCI on [`pm::SCI_IRQ`], a FACS; see
//!   [`Platform`]). The PM1 blocks, the sleep control/status and the reset
//!   register are ports of [`crate::devices::acpi`] (S5 and reset).
//! - MADT: one local APIC per vCPU, the IOAPIC at GSI 0; for `noapic` also
//!   PC-AT compatible (8259s present) and the SCI level-triggered active high.
//! - DSDT: COM1, each virtio-mmio device (`LNRO0005`, its window and
//!   interrupt), a Generic Event Device whose `_EVT` notifies the power
//!   button (`system_powerdown`), and `_S5_`.
//!
//! The MP table and the command-line virtio entries stay for guests without
//! ACPI (the reference guest).

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::BootError;
use crate::devices::acpi as pm;
use crate::layout;

const OEM_ID: [u8; 6] = *b"SNAPVM";
const OEM_TABLE_ID: [u8; 8] = *b"SNAPVMM ";
const OEM_REVISION: u32 = 1;

/// A memory-mapped device the DSDT describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

/// The tables, each with the guest address it is built for.
pub struct Tables {
    pub blobs: Vec<(u64, Vec<u8>)>,
}

impl Tables {
    /// Address of the RSDP (what `boot_params.acpi_rsdp_addr` and PVH's
    /// `rsdp_paddr` point at).
    pub fn rsdp(&self) -> u64 {
        layout::ACPI_START
    }
}

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn io_gas(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// The DSDT's AML body (without the table header). Each object is built and
/// serialized in one statement: the AML builders borrow their parts.
/// What the DSDT says about bus 0 when the virtio devices are on
/// virtio-pci.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PciSpec<'a> {
    /// PCI device numbers (on bus 0) of the devices that can be re-plugged
    /// ([`crate::devices::hotplug`]): each gets a slot with `_EJ0`.
    pub replug: &'a [u8],
}

/// The host bridge and, under it, a slot for each device that can be
/// re-plugged, with `PCNT` (run by the GED) notifying the slots the
/// hotplug registers name.
fn pci_host_bridge(spec: &PciSpec<'_>, body: &mut Vec<u8>) {
    use crate::devices::hotplug;
    let crs = aml::Name::new(
        "_CRS".into(),
        &aml::ResourceTemplate::new(vec![
            &aml::AddressSpace::new_bus_number(0u16, 0u16),
            &aml::IO::new(0xcf8, 0xcf8, 1, 8),
            &aml::AddressSpace::new_memory(
                aml::AddressSpaceCacheable::NotCacheable,
                true,
                layout::PCI_MMIO_START as u32,
                (layout::PCI_MMIO_END - 1) as u32,
                None,
            ),
        ]),
    );
    let (hid, adr, seg, uid, bbn) = (
        aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A03")),
        aml::Name::new("_ADR".into(), &aml::ZERO),
        aml::Name::new("_SEG".into(), &aml::ZERO),
        aml::Name::new("_UID".into(), &aml::ZERO),
        aml::Name::new("_BBN".into(), &aml::ZERO),
    );
    let base = u32::from(hotplug::BASE);
    let region = aml::OpRegion::new("PCHP".into(), aml::OpRegionSpace::SystemIO, &base, &12u32);
    let fields = aml::Field::new(
        "PCHP".into(),
        aml::FieldAccessType::DWord,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![
            aml::FieldEntry::Named(*b"PCIU", 32),
            aml::FieldEntry::Named(*b"PCID", 32),
            aml::FieldEntry::Named(*b"PCEJ", 32),
        ],
    );
    // Each slot: its address, its number, and _EJ0 writing its bit.
    let bits: Vec<u32> = spec.replug.iter().map(|d| 1u32 << d).collect();
    let addrs: Vec<u32> = spec.replug.iter().map(|d| u32::from(*d) << 16).collect();
    let suns: Vec<u32> = spec.replug.iter().map(|d| u32::from(*d)).collect();
    let names: Vec<String> = spec.replug.iter().map(|d| format!("SL{d:02X}")).collect();
    let pcej = aml::Path::new("\\_SB_.PCI0.PCEJ");
    let stores: Vec<aml::Store> = bits.iter().map(|b| aml::Store::new(&pcej, b)).collect();
    let ej0: Vec<aml::Method> = stores
        .iter()
        .map(|s| aml::Method::new("_EJ0".into(), 1, false, vec![s]))
        .collect();
    let adr_names: Vec<aml::Name> = addrs
        .iter()
        .map(|a| aml::Name::new("_ADR".into(), a))
        .collect();
    let sun_names: Vec<aml::Name> = suns
        .iter()
        .map(|n| aml::Name::new("_SUN".into(), n))
        .collect();
    let slots: Vec<aml::Device> = (0..bits.len())
        .map(|k| {
            aml::Device::new(
                names[k].as_str().into(),
                vec![&adr_names[k], &sun_names[k], &ej0[k]],
            )
        })
        .collect();
    // PCNT: Local0 = PCIU (scan), Local1 = PCID (eject request); for each
    // slot, Notify(slot, 1) (device check) or Notify(slot, 3) (eject request).
    let (up, down) = (aml::Local(0), aml::Local(1));
    let (pciu, pcid) = (aml::Path::new("PCIU"), aml::Path::new("PCID"));
    let (read_up, read_down) = (aml::Store::new(&up, &pciu), aml::Store::new(&down, &pcid));
    let slot_paths: Vec<aml::Path> = names.iter().map(|n| aml::Path::new(n)).collect();
    let up_and: Vec<aml::And> = bits
        .iter()
        .map(|b| aml::And::new(&aml::ZERO, &up, b))
        .collect();
    let down_and: Vec<aml::And> = bits
        .iter()
        .map(|b| aml::And::new(&aml::ZERO, &down, b))
        .collect();
    let up_set: Vec<aml::Equal> = up_and
        .iter()
        .zip(&bits)
        .map(|(a, b)| aml::Equal::new(a, b))
        .collect();
    let down_set: Vec<aml::Equal> = down_and
        .iter()
        .zip(&bits)
        .map(|(a, b)| aml::Equal::new(a, b))
        .collect();
    let check: Vec<aml::Notify> = slot_paths
        .iter()
        .map(|p| aml::Notify::new(p, &1u8))
        .collect();
    let eject: Vec<aml::Notify> = slot_paths
        .iter()
        .map(|p| aml::Notify::new(p, &3u8))
        .collect();
    let ifs: Vec<aml::If> = (0..bits.len())
        .flat_map(|k| {
            [
                aml::If::new(&up_set[k], vec![&check[k]]),
                aml::If::new(&down_set[k], vec![&eject[k]]),
            ]
        })
        .collect();
    let mut pcnt_body: Vec<&dyn Aml> = vec![&read_up, &read_down];
    pcnt_body.extend(ifs.iter().map(|i| i as &dyn Aml));
    let pcnt = aml::Method::new("PCNT".into(), 0, true, pcnt_body);
    let mut children: Vec<&dyn Aml> = vec![&hid, &adr, &seg, &uid, &bbn, &crs, &region, &fields];
    children.extend(slots.iter().map(|d| d as &dyn Aml));
    children.push(&pcnt);
    aml::Device::new("_SB_.PCI0".into(), children).to_aml_bytes(body);
}

fn dsdt_body(virtio: &[MmioDevice], pci: Option<&PciSpec<'_>>, vmgenid: bool) -> Vec<u8> {
    let mut body = Vec::new();
    if let Some(spec) = pci {
        pci_host_bridge(spec, &mut body);
    }
    // COM1: the 8250 PNP driver finds the console here.
    aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(0x3f8, 0x3f8, 1, 8),
                    &aml::Interrupt::new(true, true, false, false, crate::devices::serial::IRQ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut body);

    for (i, d) in virtio.iter().enumerate() {
        aml::Device::new(
            format!("_SB_.V{i:03X}").as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &"LNRO0005"),
                &aml::Name::new("_UID".into(), &(i as u32)),
                &aml::Name::new("_CCA".into(), &aml::ONE),
                &aml::Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![
                        &aml::Memory32Fixed::new(true, d.base as u32, d.size as u32),
                        &aml::Interrupt::new(true, true, false, false, d.irq),
                    ]),
                ),
            ],
        )
        .to_aml_bytes(&mut body);
    }

    // The VM generation ID (Linux's vmgenid driver binds to VMGENCTR): ADDR
    // is where its 16 bytes are; the GED's _EVT notifies it when they change.
    if vmgenid {
        let addr = layout::VMGENID_ADDR;
        aml::Device::new(
            "_SB_.VGEN".into(),
            vec![
                &aml::Name::new("_HID".into(), &"VMGENCTR"),
                &aml::Name::new("_CID".into(), &"VM_Gen_Counter"),
                &aml::Name::new("_DDN".into(), &"VM_Gen_Counter"),
                &aml::Name::new(
                    "ADDR".into(),
                    &aml::Package::new(vec![&(addr as u32), &((addr >> 32) as u32)]),
                ),
            ],
        )
        .to_aml_bytes(&mut body);
    }

    // Power button: the Generic Event Device's interrupt runs _EVT, which reads
    // (and so clears) the pending events and notifies the button (and the
    // generation ID's device).
    let button = u32::from(pm::EVENT_POWER_BUTTON);
    let genid = u32::from(pm::EVENT_VMGENID);
    let local0 = aml::Local(0);
    let (pwrb, vgen, gdat) = (
        aml::Path::new("\\_SB_.PWRB"),
        aml::Path::new("\\_SB_.VGEN"),
        aml::Path::new("GDAT"),
    );
    let (button_bit, genid_bit) = (
        aml::And::new(&aml::ZERO, &local0, &button),
        aml::And::new(&aml::ZERO, &local0, &genid),
    );
    let (button_set, genid_set) = (
        aml::Equal::new(&button_bit, &button),
        aml::Equal::new(&genid_bit, &genid),
    );
    let (notify_pwrb, notify_vgen) = (
        aml::Notify::new(&pwrb, &0x80u8),
        aml::Notify::new(&vgen, &0x80u8),
    );
    let notify_button = aml::If::new(&button_set, vec![&notify_pwrb]);
    let notify_genid = aml::If::new(&genid_set, vec![&notify_vgen]);
    let store = aml::Store::new(&local0, &gdat);
    let hotplug = u32::from(pm::EVENT_PCI_HOTPLUG);
    let hotplug_bit = aml::And::new(&aml::ZERO, &local0, &hotplug);
    let hotplug_set = aml::Equal::new(&hotplug_bit, &hotplug);
    let pcnt = aml::MethodCall::new("\\_SB_.PCI0.PCNT".into(), vec![]);
    let run_pcnt = aml::If::new(&hotplug_set, vec![&pcnt]);
    let mut evt: Vec<&dyn Aml> = vec![&store, &notify_button];
    if vmgenid {
        evt.push(&notify_genid);
    }
    if pci.is_some() {
        evt.push(&run_pcnt);
    }
    aml::Device::new(
        "_SB_.GED_".into(),
        vec![
            &aml::Name::new("_HID".into(), &"ACPI0013"),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::Interrupt::new(
                    true,
                    true,
                    false,
                    false,
                    pm::GED_IRQ,
                )]),
            ),
            &aml::OpRegion::new(
                "GDST".into(),
                aml::OpRegionSpace::SystemIO,
                &u32::from(pm::GED_EVENT),
                &1u32,
            ),
            &aml::Field::new(
                "GDST".into(),
                aml::FieldAccessType::Byte,
                aml::FieldLockRule::NoLock,
                aml::FieldUpdateRule::Preserve,
                vec![aml::FieldEntry::Named(*b"GDAT", 8)],
            ),
            &aml::Method::new("_EVT".into(), 1, true, evt),
        ],
    )
    .to_aml_bytes(&mut body);
    aml::Device::new(
        "_SB_.PWRB".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
        ],
    )
    .to_aml_bytes(&mut body);

    // S5 (soft off): SLP_TYP for the sleep control register.
    let s5 = pm::S5_SLP_TYP;
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&s5, &s5, &aml::ZERO, &aml::ZERO]),
    )
    .to_aml_bytes(&mut body);
    body
}

fn sdt(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let mut t = Sdt::new(*signature, 36, revision, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.append_slice(body);
    t.update_checksum();
    t.as_slice().to_vec()
}

fn align(addr: u64) -> u64 {
    (addr + 15) & !15
}

/// MADT flag: the machine also has dual 8259 PICs (an OS that does not use
/// the IOAPIC, e.g. Linux with `noapic`, programs and uses them).
const MADT_PCAT_COMPAT: u32 = 1;
/// MADT interrupt source override flags: active high, level-triggered.
const MPS_LEVEL_HIGH: u16 = 0b1101;

/// The MADT: the local APICs, the IOAPIC at GSI 0; for a full-ACPI
/// machine ([`Platform::PcCompatible`]) also the 8259s and the SCI's override.
fn madt(cpus: u8, platform: Platform) -> Vec<u8> {
    let full = platform == Platform::PcCompatible;
    let mut body = Vec::new();
    body.extend_from_slice(&(layout::LAPIC_ADDR as u32).to_le_bytes());
    let flags = if full { MADT_PCAT_COMPAT } else { 0 };
    body.extend_from_slice(&flags.to_le_bytes());
    for id in 0..cpus {
        body.extend(bytes(&ProcessorLocalApic::new(
            id,
            id,
            EnabledStatus::Enabled,
        )));
    }
    body.extend(bytes(&IoApic::new(cpus, layout::IOAPIC_ADDR as u32, 0)));
    if !full {
        return sdt(b"APIC", 4, &body);
    }
    // Interrupt source override (type 2, 10 bytes): ISA bus, the SCI's line
    // to the same GSI, level-triggered active high (ACPI's default for the
    // SCI is active low, which would read an idle line as raised).
    let sci = pm::SCI_IRQ;
    body.extend_from_slice(&[2, 10, 0, sci as u8]);
    body.extend_from_slice(&sci.to_le_bytes());
    body.extend_from_slice(&MPS_LEVEL_HIGH.to_le_bytes());
    sdt(b"APIC", 4, &body)
}

/// Which ACPI machine the tables describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    /// Hardware-reduced (as Firecracker's and Cloud Hypervisor's): no 8259s
    /// for the OS, no fixed PM blocks. What every boot gets unless the
    /// kernel is told not to use the IOAPIC.
    Reduced,
    /// A full FADT (PM1 event and control blocks, the SCI, a FACS) and a
    /// PC-AT compatible MADT: Linux takes a hardware-reduced machine to have
    /// no 8259 PICs, so a kernel booted with `noapic` (firecracker-containerd's
    /// arguments) would have nothing to take the ISA interrupts and crash on
    /// the first one. Given to command lines with `noapic`.
    PcCompatible,
}

impl Platform {
    /// The platform for a kernel command line.
    pub fn for_cmdline(cmdline: &str) -> Platform {
        if cmdline.split_whitespace().any(|w| w == "noapic") {
            Platform::PcCompatible
        } else {
            Platform::Reduced
        }
    }
}

/// The FADT (no SMI command port: always in ACPI mode).
fn fadt(dsdt_addr: u64, facs_addr: Option<u64>) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton) // no fixed power button: it is the GED's device
        .flag(Flags::SlpButton);
    match facs_addr {
        Some(facs) => {
            fadt = fadt.firmware_ctrl_64(facs);
            fadt.sci_int = (pm::SCI_IRQ as u16).into();
            fadt.pm1a_evt_blk = u32::from(pm::PM1A_EVT).into();
            fadt.pm1_evt_len = pm::PM1_EVT_LEN;
            fadt.x_pm1a_evt_blk = io_block(pm::PM1A_EVT, pm::PM1_EVT_LEN);
            fadt.pm1a_cnt_blk = u32::from(pm::PM1A_CNT).into();
            fadt.pm1_cnt_len = pm::PM1_CNT_LEN;
            fadt.x_pm1a_cnt_blk = io_block(pm::PM1A_CNT, pm::PM1_CNT_LEN);
        }
        None => fadt = fadt.flag(Flags::HwReducedAcpi),
    }
    fadt.reset_reg = io_gas(pm::RESET);
    fadt.reset_value = pm::RESET_VALUE;
    fadt.sleep_control_reg = io_gas(pm::SLEEP_CONTROL);
    fadt.sleep_status_reg = io_gas(pm::SLEEP_STATUS);
    // "VGA not present", "CMOS RTC not present": nothing for the guest to
    // probe; no 8042 either (its reset command still works).
    fadt.iapc_boot_arch = (1u16 << 2 | 1 << 5).into();
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"SNAPVMM\0").into();
    bytes(&fadt.finalize())
}

fn io_block(port: u16, len: u8) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        len * 8,
        0,
        AccessSize::Undefined,
        u64::from(port),
    )
}

/// Builds the tables for `cpus` vCPUs and the given virtio-mmio devices, laid
/// out from [`layout::ACPI_START`].
pub fn build(
    cpus: u8,
    virtio: &[MmioDevice],
    pci: Option<&PciSpec<'_>>,
    vmgenid: bool,
    platform: Platform,
) -> Result<Tables, BootError> {
    let rsdp_addr = layout::ACPI_START;
    let xsdt_addr = align(rsdp_addr + Rsdp::len() as u64);
    // The XSDT has two entries (FADT, MADT).
    let fadt_addr = align(xsdt_addr + 36 + 2 * 8);
    let dsdt_addr = align(fadt_addr + acpi_tables::fadt::FADT::len() as u64);
    let dsdt = sdt(b"DSDT", 2, &dsdt_body(virtio, pci, vmgenid));
    let madt_addr = align(dsdt_addr + dsdt.len() as u64);
    let madt = madt(cpus, platform);
    // The FACS (full ACPI only) must be 64-byte aligned.
    let facs_addr = (madt_addr + madt.len() as u64 + 63) & !63;
    let facs = match platform {
        Platform::PcCompatible => bytes(&acpi_tables::facs::FACS::new()),
        Platform::Reduced => Vec::new(),
    };
    let fadt = fadt(dsdt_addr, (!facs.is_empty()).then_some(facs_addr));

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = bytes(&xsdt);
    let rsdp = bytes(&Rsdp::new(OEM_ID, xsdt_addr));

    let end = facs_addr + facs.len() as u64;
    if end > layout::ACPI_END {
        return Err(BootError::Acpi(format!(
            "tables need {} bytes, {} reserved",
            end - layout::ACPI_START,
            layout::ACPI_END - layout::ACPI_START
        )));
    }
    debug_assert_eq!(xsdt_addr + xsdt.len() as u64, xsdt_addr + 36 + 16);
    Ok(Tables {
        blobs: vec![
            (rsdp_addr, rsdp),
            (xsdt_addr, xsdt),
            (fadt_addr, fadt),
            (dsdt_addr, dsdt),
            (madt_addr, madt),
        ]
        .into_iter()
        .chain((!facs.is_empty()).then_some((facs_addr, facs)))
        .collect(),
    })
}

/// Builds the tables and writes them into guest memory; returns the RSDP address.
pub fn write(
    mem: &GuestMemoryMmap,
    cpus: u8,
    virtio: &[MmioDevice],
    pci: Option<&PciSpec<'_>>,
    vmgenid: bool,
    platform: Platform,
) -> Result<u64, BootError> {
    let t = build(cpus, virtio, pci, vmgenid, platform)?;
    for (addr, blob) in &t.blobs {
        mem.write_slice(blob, GuestAddress(*addr))
            .map_err(|e| BootError::GuestMemory(e.to_string()))?;
    }
    Ok(t.rsdp())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn table(t: &Tables, addr: u64) -> &[u8] {
        &t.blobs.iter().find(|(a, _)| *a == addr).expect("table").1
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn dev(i: usize) -> MmioDevice {
        MmioDevice {
            base: 0xd000_0000 + 0x1000 * i as u64,
            size: 0x1000,
            irq: 5 + i as u32,
        }
    }

    /// Follows the pointers a guest follows: RSDP -> XSDT -> FADT -> DSDT, XSDT -> MADT,
    /// checking each signature, length and checksum on the way.
    #[test]
    fn a_guest_can_walk_the_tables() {
        let t = build(4, &[dev(0), dev(1)], None, true, Platform::PcCompatible).unwrap();
        let rsdp = table(&t, t.rsdp());
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum");
        assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
        assert_eq!(rsdp[15], 2, "ACPI 2.0+ RSDP");
        let xsdt = table(&t, u64_at(rsdp, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        assert_eq!(u32_at(xsdt, 4) as usize, xsdt.len());
        assert_eq!(sum(xsdt), 0);
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(xsdt, o))
            .collect();
        assert_eq!(entries.len(), 2);
        let fadt = table(&t, entries[0]);
        assert_eq!(&fadt[..4], b"FACP");
        assert_eq!(u32_at(fadt, 4) as usize, fadt.len());
        assert_eq!(sum(fadt), 0);
        let flags = u32_at(fadt, 112);
        assert_eq!(
            flags & Flags::HwReducedAcpi as u32,
            0,
            "a full ACPI machine: the 8259s exist for a noapic kernel"
        );
        assert_ne!(flags & Flags::ResetRegSup as u32, 0);
        // SCI_INT (46), SMI_CMD (48: none), PM1a_EVT_BLK (56), PM1a_CNT_BLK
        // (64), PM1_EVT_LEN (88), PM1_CNT_LEN (89).
        assert_eq!(u16::from_le_bytes([fadt[46], fadt[47]]) as u32, pm::SCI_IRQ);
        // Its own line: no device shares it.
        for i in 0..crate::devices::virtio::MAX_DEVICES {
            assert_ne!(crate::devices::virtio::irq(i), pm::SCI_IRQ);
        }
        assert_ne!(crate::devices::serial::IRQ, pm::SCI_IRQ);
        assert_ne!(pm::GED_IRQ, pm::SCI_IRQ);
        assert_eq!(u32_at(fadt, 48), 0);
        assert_eq!(u32_at(fadt, 56), u32::from(pm::PM1A_EVT));
        assert_eq!(u32_at(fadt, 64), u32::from(pm::PM1A_CNT));
        assert_eq!((fadt[88], fadt[89]), (4, 2));
        // X_FIRMWARE_CTRL (132): the FACS, 64-byte aligned.
        let facs_addr = u64_at(fadt, 132);
        assert_eq!(facs_addr % 64, 0);
        let facs = table(&t, facs_addr);
        assert_eq!(&facs[..4], b"FACS");
        assert_eq!(u32_at(facs, 4) as usize, facs.len());
        // X_DSDT at offset 140.
        let dsdt = table(&t, u64_at(fadt, 140));
        assert_eq!(&dsdt[..4], b"DSDT");
        assert_eq!(u32_at(dsdt, 4) as usize, dsdt.len());
        assert_eq!(sum(dsdt), 0);
        let madt = table(&t, entries[1]);
        assert_eq!(&madt[..4], b"APIC");
        assert_eq!(u32_at(madt, 4) as usize, madt.len());
        assert_eq!(sum(madt), 0);
        assert_eq!(u32_at(madt, 36) as u64, layout::LAPIC_ADDR);
        assert_eq!(u32_at(madt, 40), 1, "PCAT_COMPAT");
        // Structures: 4 local APICs (type 0), the IOAPIC (type 1), the SCI's
        // override (type 2).
        let (mut off, mut lapics, mut ioapics, mut isos) = (44, Vec::new(), 0, Vec::new());
        while off < madt.len() {
            match madt[off] {
                0 => lapics.push(madt[off + 3]),
                1 => {
                    ioapics += 1;
                    assert_eq!(u32_at(madt, off + 4) as u64, layout::IOAPIC_ADDR);
                }
                2 => isos.push((
                    madt[off + 3],
                    u32_at(madt, off + 4),
                    u16::from_le_bytes([madt[off + 8], madt[off + 9]]),
                )),
                other => panic!("unexpected MADT structure {other}"),
            }
            off += madt[off + 1] as usize;
        }
        assert_eq!(off, madt.len());
        assert_eq!(lapics, vec![0, 1, 2, 3]);
        assert_eq!(ioapics, 1);
        let sci = pm::SCI_IRQ;
        assert_eq!(
            isos,
            vec![(sci as u8, sci, 0b1101)],
            "SCI level, active high"
        );
        let end = t
            .blobs
            .iter()
            .map(|(a, b)| a + b.len() as u64)
            .max()
            .unwrap();
        assert!(end <= layout::ACPI_END);
    }

    /// Without `noapic` the machine is hardware-reduced, as before: no PM1
    /// blocks, no FACS, no 8259s in the MADT.
    #[test]
    fn reduced_unless_the_kernel_is_told_noapic() {
        assert_eq!(
            Platform::for_cmdline("console=ttyS0 noapic panic=1"),
            Platform::PcCompatible
        );
        assert_eq!(
            Platform::for_cmdline("console=ttyS0 xnoapic"),
            Platform::Reduced
        );
        let t = build(2, &[dev(0)], None, true, Platform::Reduced).unwrap();
        let rsdp = table(&t, t.rsdp());
        let xsdt = table(&t, u64_at(rsdp, 24));
        let fadt = table(&t, u64_at(xsdt, 36));
        assert_ne!(u32_at(fadt, 112) & Flags::HwReducedAcpi as u32, 0);
        assert_eq!(u64_at(fadt, 132), 0, "no FACS");
        assert_eq!(u32_at(fadt, 56), 0, "no PM1 blocks");
        let madt = table(&t, u64_at(xsdt, 44));
        assert_eq!(u32_at(madt, 40), 0, "no 8259s");
        assert_eq!(t.blobs.len(), 5);
    }

    #[test]
    fn dsdt_describes_every_virtio_device_and_power_control() {
        let devs: Vec<_> = (0..8).map(dev).collect();
        let body = dsdt_body(&devs, None, true);
        let count = |pat: &[u8]| body.windows(pat.len()).filter(|w| *w == pat).count();
        assert_eq!(count(b"LNRO0005"), 8);
        for (i, d) in devs.iter().enumerate() {
            // Memory32Fixed descriptor: 0x86, length 9, read-write, base, size.
            let mut m = vec![0x86, 9, 0, 1];
            m.extend_from_slice(&(d.base as u32).to_le_bytes());
            m.extend_from_slice(&(d.size as u32).to_le_bytes());
            assert_eq!(count(&m), 1, "window of device {i}");
            assert_eq!(count(format!("V{i:03X}").as_bytes()), 1);
        }
        assert_eq!(count(b"ACPI0013"), 1, "generic event device");
        assert_eq!(count(b"_EVT"), 1);
        assert_eq!(count(b"_S5_"), 1);
        assert_eq!(count(b"PWRB"), 2, "the button and the notify target");
        assert_eq!(count(b"VMGENCTR"), 1, "the generation ID's device");
        assert_eq!(count(b"VGEN"), 2, "the device and the notify target");
        let without = dsdt_body(&devs, None, false);
        assert!(!without.windows(4).any(|w| w == b"VGEN"), "--vmgenid off");
        assert!(build(1, &devs, None, true, Platform::Reduced).is_ok());
    }

    /// On virtio-pci: the host bridge, a slot with `_EJ0` for each device
    /// that re-plugs (and none for the others), `PCNT` over the hotplug
    /// registers, and the GED running it.
    #[test]
    fn dsdt_describes_the_slots_that_re_plug() {
        let spec = PciSpec { replug: &[3, 4] };
        let body = dsdt_body(&[], Some(&spec), true);
        if let Ok(out) = std::env::var("SNAPVMM_DUMP_DSDT") {
            std::fs::write(out, sdt(b"DSDT", 2, &body)).unwrap();
        }
        let count = |pat: &[u8]| body.windows(pat.len()).filter(|w| *w == pat).count();
        assert_eq!(count(b"PNP0A03"), 0, "an EISA id is packed, not text");
        assert_eq!(
            count(b"PCI0"),
            4,
            "the bridge, two _EJ0s' PCEJ and the GED's PCNT call"
        );
        assert_eq!(count(b"SL03"), 3, "the device and its two notifies");
        assert_eq!(count(b"SL04"), 3);
        assert_eq!(count(b"SL02"), 0);
        assert_eq!(count(b"_EJ0"), 2);
        assert_eq!(count(b"PCNT"), 2, "the method and its call");
        assert_eq!(count(b"PCHP"), 2, "the region and its fields");
        // The region: OperationRegion(PCHP, SystemIO, 0xae00, 12).
        let mut region = b"PCHP".to_vec();
        region.extend([0x01, 0x0b, 0x00, 0xae, 0x0a, 12]);
        assert_eq!(count(&region), 1);
        let mmio_only = dsdt_body(&[], None, true);
        assert!(!mmio_only.windows(4).any(|w| w == b"PCNT"));
    }
}
