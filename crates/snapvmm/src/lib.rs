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
pub mod net;
pub mod qmp_client;
pub mod sigbus;
pub mod snapshot;

pub use control::run;

/// An error and its causes, one after the other (`a: b: c`), leaving out a
/// cause whose text the message already holds (library errors often say
/// their cause in their own message too).
pub fn describe(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !out.contains(&c) {
            out.push_str(": ");
            out.push_str(&c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn describe_says_each_cause_once() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let lib = livesnap::SnapError::Io {
            context: "open /x".into(),
            source: io,
        };
        let e = anyhow::Error::new(lib).context("cannot restore from /x");
        let text = super::describe(&e);
        assert_eq!(text.matches("entity not found").count(), 1, "{text}");
        assert!(
            text.starts_with("cannot restore from /x: open /x: "),
            "{text}"
        );
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(super::describe(&e), "outer: inner");
    }
}
