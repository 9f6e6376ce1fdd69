//! Watching the policy file: its folder, for the file being written, created
//! or renamed into place (editors and config management replace files
//! rather than writing them in place).
//!
//! A Kubernetes ConfigMap mounted as a folder changes differently: the
//! policy file is a symlink through `..data`, and the kubelet updates the
//! files by renaming a new `..data` symlink into place. That rename is a
//! change to the policy too.

use std::{
    ffi::{OsStr, OsString},
    io,
    path::Path,
};

use futures_util::StreamExt as _;
use inotify::{EventMask, EventStream, Inotify, WatchMask};

/// The symlink that the kubelet renames into a ConfigMap's or a Secret's
/// folder to update the files in it all at once.
const KUBELET_DATA: &str = "..data";

/// How the policy file changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Renamed into place: complete.
    Whole,
    /// Created or written in place: more writes may follow.
    Written,
}

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

    /// Waits for the next change to the policy file. `Whole` when a file
    /// was renamed into place, which is atomic: the new content is all there.
    pub async fn next(&mut self) -> io::Result<Change> {
        while let Some(event) = self.events.next().await {
            let event = event?;
            let name = event.name.as_deref();
            if name == Some(self.name.as_os_str()) || name == Some(OsStr::new(KUBELET_DATA)) {
                return Ok(if event.mask.contains(EventMask::MOVED_TO) {
                    Change::Whole
                } else {
                    Change::Written
                });
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

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::symlink, time::Duration};

    use super::*;

    /// Waits up to a second for the watch to report a change.
    async fn changed(watch: &mut PolicyWatch) -> Option<Change> {
        tokio::time::timeout(Duration::from_secs(1), watch.next())
            .await
            .ok()
            .and_then(Result::ok)
    }

    /// A ConfigMap update as the kubelet's atomic writer makes it: the new
    /// files in a new timestamped folder, then a `..data_tmp` symlink to it
    /// renamed over `..data`; `policy.toml` itself never changes.
    #[tokio::test]
    async fn a_configmap_update_is_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir(root.join("..2026_01_01_00_00_00.1")).unwrap();
        fs::write(root.join("..2026_01_01_00_00_00.1/policy.toml"), "old").unwrap();
        symlink("..2026_01_01_00_00_00.1", root.join("..data")).unwrap();
        symlink("..data/policy.toml", root.join("policy.toml")).unwrap();
        let mut watch = PolicyWatch::new(&root.join("policy.toml")).unwrap();

        fs::create_dir(root.join("..2026_01_01_00_01_00.2")).unwrap();
        fs::write(root.join("..2026_01_01_00_01_00.2/policy.toml"), "new").unwrap();
        symlink("..2026_01_01_00_01_00.2", root.join("..data_tmp")).unwrap();
        fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
        assert_eq!(
            changed(&mut watch).await,
            Some(Change::Whole),
            "the rename of ..data went unseen"
        );
        assert_eq!(fs::read_to_string(root.join("policy.toml")).unwrap(), "new");
    }

    #[tokio::test]
    async fn other_files_in_the_folder_are_no_change() {
        let dir = tempfile::tempdir().unwrap();
        let mut watch = PolicyWatch::new(&dir.path().join("policy.toml")).unwrap();
        fs::write(dir.path().join("notes.txt"), "x").unwrap();
        assert_eq!(changed(&mut watch).await, None);
        fs::write(dir.path().join("policy.toml"), "x").unwrap();
        assert_eq!(changed(&mut watch).await, Some(Change::Written));
    }

    #[tokio::test]
    async fn a_file_renamed_into_place_is_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut watch = PolicyWatch::new(&dir.path().join("policy.toml")).unwrap();
        fs::write(dir.path().join(".policy.toml.new"), "x").unwrap();
        fs::rename(
            dir.path().join(".policy.toml.new"),
            dir.path().join("policy.toml"),
        )
        .unwrap();
        assert_eq!(changed(&mut watch).await, Some(Change::Whole));
    }
}
