//! What identifies a version of a file without reading it: the admin token
//! file ([`crate::auth`]) and the TLS files ([`crate::tls`]) are re-read
//! when their stamp changes.

use std::{path::Path, time::SystemTime};

/// A file's modification time, length and inode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    ino: u64,
}

/// The stamp of `path`, or `None` if it cannot be read. Follows symlinks:
/// a Kubernetes Secret volume swaps a `..data` link, so the target's inode
/// changes at each rotation, even when the new file has the same size and
/// modification time.
pub(crate) fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        ino: m.ino(),
    })
}
