//! The image format and its two carriers: the file (`image`, read back
//! through a `source`, written through a `sink`), chains of incremental
//! images, the stream form for pipes and sockets, and the records of a live
//! migration's wire (`wire`).

pub mod chain;
pub(crate) mod image;
pub(crate) mod record;
pub(crate) mod sink;
pub(crate) mod source;
pub mod stream;
pub(crate) mod temp;
pub(crate) mod wire;
