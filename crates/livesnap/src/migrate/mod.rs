//! Live migration: the pre-copy pass, then post-copy (the source's sender,
//! the target's pages), over the records of `format::wire`.

pub mod postcopy;
pub mod precopy;
