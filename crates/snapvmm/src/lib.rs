//! snapvmm as a library: the binary (`main.rs`) only parses the command line
//! and calls [`run`] or [`demo::run`].
//!
//! Data flows one way: [`control`] owns the machine and the current snapshot
//! operation and drives [`snapshot`], which knows nothing of the controller
//! (it gets callbacks, never the controller's event type). See
//! docs/ARCHITECTURE.md for the threads and locks.

pub mod cli;
pub mod control;
pub mod demo;
pub mod disk;
pub mod jobs;
pub mod qmp_client;
pub mod sigbus;
pub mod snapshot;

pub use control::run;
