//! Error types: [`QmpError`] for server setup, [`CommandError`] for the
//! `{"error": {"class": ..., "desc": ...}}` replies of QMP commands.

use std::fmt;
use std::io;
use std::path::PathBuf;

use serde::Serialize;

/// Errors raised while setting up or running the QMP server itself.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The `--qmp` style address could not be parsed.
    #[error("invalid QMP address '{addr}': {reason}")]
    InvalidAddress {
        /// The address as given by the user.
        addr: String,
        /// Why it was refused.
        reason: String,
    },
    /// A live QMP server already listens on the requested unix socket.
    #[error("QMP socket {} is in use by another process", path.display())]
    SocketInUse {
        /// Path of the socket.
        path: PathBuf,
    },
    /// Something that is not a socket exists at the requested path.
    #[error("QMP socket path {} exists and is not a socket; refusing to replace it", path.display())]
    NotASocket {
        /// Path of the offending file.
        path: PathBuf,
    },
    /// Binding the listening socket failed.
    #[error("cannot listen on QMP address {addr}: {source}")]
    Bind {
        /// The address we tried to bind.
        addr: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Any other I/O error.
    #[error("QMP I/O error: {0}")]
    Io(#[from] io::Error),
}

/// The QAPI error classes a command can fail with (QEMU's `QapiErrorClass`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum ErrorClass {
    /// Catch-all class used for most errors.
    GenericError,
    /// The requested command does not exist (or is not available yet).
    CommandNotFound,
    /// A device exists but is not active.
    DeviceNotActive,
    /// The requested device does not exist.
    DeviceNotFound,
    /// KVM lacks a capability needed by the command.
    KVMMissingCap,
}

impl ErrorClass {
    /// The class name as written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed command: serialised as `{"class": CLASS, "desc": TEXT}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{class}: {desc}")]
pub struct CommandError {
    /// The QAPI error class.
    pub class: ErrorClass,
    /// Human readable description (QEMU never ends it with a period).
    pub desc: String,
}

impl CommandError {
    /// Builds an error of any class.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        CommandError {
            class,
            desc: desc.into(),
        }
    }

    /// A `GenericError`, the class of almost every QEMU error.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::GenericError, desc)
    }

    /// A `CommandNotFound` error.
    pub fn command_not_found(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::CommandNotFound, desc)
    }
}
