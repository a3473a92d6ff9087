//! The plan of an incremental capture: its parent, the chunks it holds, and
//! the header that records both.

use crate::error::Result;
use crate::format::image::{Header, ImageId, IncrHeader, IncrSection};

/// What an incremental capture records: its parent and the chunks it holds.
pub(crate) struct IncrPlan {
    pub parent: ImageId,
    pub parent_path: String,
    pub map: Vec<u8>,
}

impl IncrPlan {
    pub(crate) fn section(&self) -> IncrSection {
        IncrSection {
            map: self.map.clone(),
            parent_path: self.parent_path.clone(),
        }
    }

    /// The header of the image, its incremental section encoded, and the
    /// section's checksum filled in.
    pub(crate) fn header(&self, ranges: &[(u64, u64)], dev: &[u8]) -> Result<(Header, Vec<u8>)> {
        let section = self.section().encode();
        let mut header = Header::layout_with(
            ranges,
            dev.len() as u64,
            Some((self.parent, section.len() as u64)),
        )?;
        header.dev_crc = crc32fast::hash(dev);
        if let Some(IncrHeader { crc, .. }) = header.incr.as_mut() {
            *crc = crc32fast::hash(&section);
        }
        Ok((header, section))
    }
}
