//! Restore: filling fresh guest RAM from an image or a remote source on
//! demand (userfaultfd missing mode) and in the background.

pub mod fill;
