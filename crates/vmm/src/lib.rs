//! snapvmm's machine: a KVM micro-VM (guest RAM, in-kernel irqchip and PIT,
//! legacy devices, one thread per vCPU) that boots PVH ELF kernels (such as the
//! reference guest) and Linux bzImages.

pub mod boot;
pub mod devices;
pub mod kvm;
pub mod layout;
pub mod machine;
pub mod memory;
pub mod paging;
pub mod sched;
pub mod snapshot;
pub mod vcpu_thread;

pub use machine::{
    DiskConfig, EventSink, Machine, MachineConfig, MachineEvent, NetConfig, PreparedVm, Start,
    VsockConfig,
};
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
    /// The machine's configuration (RAM size, vCPU count, CPUID) cannot be used.
    #[error("{0}")]
    Config(String),
    /// A vCPU thread did not start.
    #[error("a vCPU thread did not start")]
    VcpuStart,
    /// A vCPU thread did not stop within the pause timeout.
    #[error("a vCPU thread did not acknowledge the pause")]
    PauseTimeout,
    /// The disks cannot be taken: another thread still holds the device buses.
    #[error("the disks are still in use by another thread")]
    DisksInUse,
    /// Saving machine state needs a paused machine.
    #[error("machine state can only be saved while paused")]
    NotPaused,
    /// The snapshot asks for CPU features this host's KVM cannot give.
    #[error("the snapshot's vCPU {vcpu} uses CPU features this host's KVM cannot give ({missing}): restore it on a CPU that has them")]
    CpuFeatures { vcpu: u8, missing: String },
    #[error("{0}")]
    Io(std::io::Error),
    #[error(transparent)]
    State(#[from] snapshot::StateError),
}
