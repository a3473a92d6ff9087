//! Protocol state of one connection, independent of any socket: bytes in,
//! reply lines out.

use std::sync::Arc;

use crate::commands::{dispatch, Context};
use crate::error::CommandError;
use crate::json::{error_line, return_line};
use crate::machine::Machine;
use crate::protocol::parse_request;
use crate::stream::{parse_message, Item, Splitter};

/// One reply line plus what the transport must do after sending it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Reply {
    /// The `\r\n`-terminated JSON line.
    pub(crate) line: String,
    /// This reply completed capabilities negotiation: events may flow.
    pub(crate) negotiated: bool,
    /// Call `Machine::quit` once the line has been written.
    pub(crate) quit: bool,
}

/// Per-connection QMP state machine.
pub(crate) struct Session {
    machine: Arc<dyn Machine>,
    splitter: Splitter,
    negotiated: bool,
    /// Descriptors received (SCM_RIGHTS) and not yet named by `getfd`.
    fds: Vec<std::os::fd::OwnedFd>,
}

impl Session {
    pub(crate) fn new(machine: Arc<dyn Machine>) -> Self {
        Session {
            machine,
            splitter: Splitter::new(),
            negotiated: false,
            fds: Vec::new(),
        }
    }

    /// Descriptors that came with the bytes fed next (the oldest are
    /// closed beyond [`crate::fds::MAX_PENDING`]).
    pub(crate) fn add_fds(&mut self, fds: Vec<std::os::fd::OwnedFd>) {
        self.fds.extend(fds);
        let extra = self.fds.len().saturating_sub(crate::fds::MAX_PENDING);
        self.fds.drain(..extra);
    }

    /// Feeds received bytes; returns the replies, in order.
    pub(crate) fn feed(&mut self, data: &[u8]) -> Vec<Reply> {
        let mut items = Vec::new();
        self.splitter.push(data, &mut items);
        items.into_iter().map(|item| self.handle(item)).collect()
    }

    /// Bytes buffered for an incomplete message.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn buffered(&self) -> usize {
        self.splitter.buffered()
    }

    fn handle(&mut self, item: Item) -> Reply {
        let value = match item {
            Item::Error(desc) => return self.plain(error_line(&CommandError::generic(desc), None)),
            Item::Message(bytes) => match parse_message(&bytes) {
                Ok(v) => v,
                Err(desc) => return self.plain(error_line(&CommandError::generic(desc), None)),
            },
        };
        let (id, request) = parse_request(value);
        let request = match request {
            Ok(r) => r,
            Err(e) => return self.plain(error_line(&e, id.as_ref())),
        };
        let was_negotiated = self.negotiated;
        let mut ctx = Context {
            machine: self.machine.as_ref(),
            negotiated: self.negotiated,
            quit_requested: false,
            fds: &mut self.fds,
        };
        let result = dispatch(&request.name, request.args, &mut ctx);
        let quit = ctx.quit_requested;
        self.negotiated = ctx.negotiated;
        let line = match &result {
            Ok(v) => return_line(v, id.as_ref()),
            Err(e) => error_line(e, id.as_ref()),
        };
        Reply {
            line,
            negotiated: self.negotiated && !was_negotiated,
            quit,
        }
    }

    fn plain(&self, line: String) -> Reply {
        Reply {
            line,
            negotiated: false,
            quit: false,
        }
    }
}
