//! The one place that talks to KVM (through kvm-ioctls): the VM, its vCPUs,
//! and the CPUID the guest sees.

pub mod cpuid;
pub mod vcpu;
pub mod vm;

use std::path::PathBuf;

/// Errors from KVM.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("{path} does not exist: this host has no KVM (load the kvm_intel or kvm_amd module, or run on a host with virtualization enabled)")]
    DeviceMissing { path: PathBuf },
    #[error("permission denied opening {path}: run as root or add your user to the group that owns it (e.g. `sudo usermod -aG kvm $USER`, then log in again)")]
    DeviceAccess { path: PathBuf },
    #[error("cannot open {path}: {source}")]
    DeviceOpen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a usable KVM device: {what}")]
    NotKvm { path: PathBuf, what: String },
    #[error("KVM lacks a capability snapvmm needs: {0}")]
    MissingCap(&'static str),
    #[error("KVM {op} failed: {source}")]
    Ioctl {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
}

/// Wraps a kvm-ioctls error with the name of the operation.
pub(crate) fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError::Ioctl { op, source }
}
