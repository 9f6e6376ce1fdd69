//! Watching the policy file: its folder, for the file being written, created
//! or renamed into place (editors and config management replace files
//! rather than writing them in place).

use std::{ffi::OsString, io, path::Path};

use futures_util::StreamExt as _;
use inotify::{EventStream, Inotify, WatchMask};

pub struct PolicyWatch {
    events: EventStream<Vec<u8>>,
    name: OsString,
}

impl PolicyWatch {
    pub fn new(policy: &Path) -> io::Result<Self> {
        let dir = match policy.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let name = policy
            .file_name()
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "the policy path names no file")
            })?
            .to_owned();
        let inotify = Inotify::init()?;
        inotify.watches().add(
            dir,
            WatchMask::CLOSE_WRITE | WatchMask::MOVED_TO | WatchMask::CREATE,
        )?;
        Ok(Self {
            events: inotify.into_event_stream(vec![0; 4096])?,
            name,
        })
    }

    /// Waits for the next change to the policy file.
    pub async fn next(&mut self) -> io::Result<()> {
        while let Some(event) = self.events.next().await {
            if event?.name.as_deref() == Some(self.name.as_os_str()) {
                return Ok(());
            }
        }
        Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "inotify stream ended",
        ))
    }

    /// Discards events already queued (after a burst has settled).
    pub fn drain(&mut self) {
        while let Some(Some(_)) = futures_util::FutureExt::now_or_never(self.events.next()) {}
    }
}
