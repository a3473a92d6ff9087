//! snapvmm's machine: a KVM micro-VM (guest RAM, in-kernel irqchip and PIT,
//! legacy devices, one thread per vCPU) that boots PVH ELF kernels (such as the
//! reference guest) and Linux bzImages.

pub mod boot;
pub mod devices;
pub mod kvm;
pub mod layout;
pub mod machine;
pub mod memory;
pub mod snapshot;
pub mod vcpu_thread;

pub use machine::{DiskConfig, EventSink, Machine, MachineConfig, MachineEvent, Start};
pub use snapshot::{MachineState, PendingState};

/// Errors from building or operating the machine.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Kvm(#[from] kvm::KvmError),
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Io(std::io::Error),
    #[error(transparent)]
    State(#[from] snapshot::StateError),
}
