//! What the controller thread reacts to. Only `control/` sees this type:
//! lower modules report through callbacks the controller builds from it.

use std::sync::mpsc;
use std::time::Duration;

use vmm::MachineEvent;

use super::bridge::Reply;

/// Everything the controller reacts to.
#[derive(Debug)]
pub enum AppEvent {
    Machine(MachineEvent),
    Signal(i32),
    Qmp(qmp::Request, Reply),
    /// A fork capture ended (any outcome).
    CaptureDone,
    /// A stop-and-copy capture ended.
    StopCopyDone(Result<livesnap::CaptureStats, livesnap::SnapError>),
    /// A live savevm's capture ended (any outcome).
    SaveVmDone,
    /// A restore's RAM fill (`--restore-mode uffd`) ended.
    FillDone(Result<livesnap::fill::FillStats, String>),
    /// An incoming stream was read to its end (or failed).
    Incoming(Result<Box<super::incoming::Received>, String>),
    /// A live migration's pre-copy pass (source; which one) reports.
    Precopy(u64, livesnap::precopy::PrecopyEvent),
    /// A live migration's source side reports.
    PostcopySource(livesnap::postcopy::SourceEvent),
    /// A live migration's target side reports.
    PostcopyTarget(livesnap::postcopy::TargetEvent),
    /// The huge-page rebuild after a fork capture ended.
    CollapseDone(vmm::memory::CollapseStats, Duration),
    /// Bytes typed on stdin for the serial console; the reply says how many the
    /// UART took (the console thread retries the rest).
    ConsoleInput(Vec<u8>, mpsc::Sender<usize>),
}
