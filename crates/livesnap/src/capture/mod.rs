//! Captures: the runtime every capture shares, stop-and-copy, the fork
//! capture, the write-protect engine and its capture, and the plan of an
//! incremental image.

pub(crate) mod fork;
pub(crate) mod plan;
pub(crate) mod runtime;
pub(crate) mod stopped;
pub mod wp;
pub(crate) mod wp_engine;
pub(crate) mod wp_options;
pub(crate) mod wp_pool;
pub(crate) mod wp_state;
