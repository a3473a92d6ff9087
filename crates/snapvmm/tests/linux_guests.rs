//! Real Linux guests: Debian's stock 6.1 kernel with its own drivers, booted by
//! snapvmm through ACPI, its disks, live snapshots, savevm/loadvm, live
//! migration and snapshot streams.
//!
//! Where `/proc/cpuinfo` shows vmx or svm the scenarios run directly on this
//! host's KVM. Elsewhere (PVM hosts, whose KVM cannot run Linux) they run inside
//! a QEMU TCG VM with nested SVM, which this test boots with this very binary
//! inside (`tests/linux/outer.rs`): about 10 minutes on 2 cores. Inputs (kernel
//! and busybox packages from the Debian archive, a static test program) are
//! cached under the target directory. `docs/LINUX.md` says how to run it by hand.

mod common;
mod linux;

#[test]
fn linux_boots_with_1_vcpu_runs_a_typed_command_and_powers_off() {
    linux::check("boot-1cpu-console-poweroff");
}

#[test]
fn linux_boots_with_2_vcpus_and_obeys_system_powerdown() {
    linux::check("boot-2cpu-powerdown");
}

#[test]
fn linux_boots_with_the_kernel_arguments_of_other_vmms_guides_noapic_included() {
    linux::check_if_selected("boot-args-of-other-vmms");
}

/// A benchmark (issue 23's disk table beside QEMU), run only when named.
#[test]
fn linux_disk_throughput_figures() {
    linux::check_if_selected("disk-throughput");
}

/// A benchmark (issue 21's ping and TCP figures beside QEMU), run only when named.
#[test]
fn linux_network_throughput_figures() {
    linux::check_if_selected("network-throughput");
}

#[test]
fn linux_reboots_in_place_twice_then_snapshots_and_restores() {
    linux::check("reboot-in-place-twice-then-snapshot");
}

#[test]
fn linux_virtio_blk_on_raw_and_qcow2_with_its_own_drivers() {
    linux::check("virtio-blk-raw-qcow2");
}

#[test]
fn linux_virtio_pci_disks_with_msix_and_a_queue_per_vcpu_survive_a_snapshot_restore() {
    linux::check("virtio-pci-disks-snapshot-restore");
}

#[test]
fn linux_live_snapshot_restores_in_a_new_process_and_with_defer() {
    linux::check("live-snapshot-restore");
}

#[test]
fn linux_write_protect_snapshot_restores_in_a_new_process() {
    linux::check("write-protect-snapshot-restore");
}

#[test]
fn linux_ten_snapshots_in_a_row_then_restore_the_last() {
    linux::check("ten-snapshots-restore-last");
}

#[test]
fn linux_savevm_loadvm_gives_back_the_files_of_the_snapshot_instant() {
    linux::check("savevm-loadvm-qcow2");
}

#[test]
fn linux_talks_over_virtio_net_on_a_tap_across_a_snapshot_and_a_restore() {
    linux::check("network-tap-snapshot-restore");
}

#[test]
fn linux_clones_of_one_image_each_take_their_own_mac_on_virtio_pci() {
    linux::check("network-pci-clones-own-macs");
}

#[test]
fn linux_talks_over_vsock_both_ways_and_a_restore_resets_its_connections() {
    linux::check("vsock-host-guest-restore");
}

#[test]
fn linux_live_migrates_post_copy_and_streams_through_gzip() {
    linux::check("live-migration-and-streams");
}
