//! Placeholder; the crate lands in a later commit.
