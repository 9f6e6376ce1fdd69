//! The directory store: one file per node, `NAME.json`, written by renaming
//! a finished file into place and watched with inotify — one machine, a
//! shared filesystem, or a folder kept in step by GitOps.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use futures_util::StreamExt as _;
use inotify::{Inotify, WatchMask};

use super::{Entry, MAX_ENTRIES, NodeName, StoreError, StoreWatch};
use crate::node::record::MAX_RECORD_LEN;

#[derive(Debug, Clone)]
pub struct DirectoryStore {
    dir: PathBuf,
}

const SUFFIX: &str = ".json";

impl DirectoryStore {
    /// Opens the store at `dir`, making the folder if it is missing.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        fs::create_dir_all(dir).map_err(error("create", dir))?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// Writes `NAME.json`, replacing the node's previous entry at once:
    /// readers see the old or the new file, never half of one.
    pub fn publish(&self, name: &NodeName, bytes: &[u8]) -> Result<(), StoreError> {
        let path = self.dir.join(format!("{name}{SUFFIX}"));
        let fresh = self.dir.join(format!(".{name}{SUFFIX}.new"));
        fs::write(&fresh, bytes).map_err(error("write", &fresh))?;
        fs::rename(&fresh, &path).map_err(error("replace", &path))
    }

    /// Every entry: the files named `*.json` (hidden files are work in
    /// progress). A file too long to be a record is read as its first
    /// bytes, so that it is rejected, not skipped unseen.
    pub fn read(&self) -> Result<Vec<Entry>, StoreError> {
        let mut entries = Vec::new();
        for dirent in fs::read_dir(&self.dir).map_err(error("list", &self.dir))? {
            let dirent = dirent.map_err(error("list", &self.dir))?;
            let file_name = dirent.file_name();
            let Some(name) = file_name
                .to_str()
                .filter(|n| !n.starts_with('.'))
                .and_then(|n| n.strip_suffix(SUFFIX))
            else {
                continue;
            };
            if entries.len() == MAX_ENTRIES {
                return Err(StoreError::TooMany {
                    store: self.dir.display().to_string(),
                    limit: MAX_ENTRIES,
                });
            }
            let path = dirent.path();
            let bytes = match read_bounded(&path) {
                Ok(bytes) => bytes,
                // Withdrawn between listing and reading.
                Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                Err(err) => return Err(error("read", &path)(err)),
            };
            entries.push(Entry {
                name: name.to_owned(),
                bytes,
            });
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }

    /// Watches the folder for records being written, renamed or removed.
    pub fn watch(&self) -> Result<StoreWatch, StoreError> {
        watch_dir(&self.dir)
    }
}

/// Watches `dir` for files being written, renamed or removed, and for the
/// folder itself going.
pub fn watch_dir(dir: &Path) -> Result<StoreWatch, StoreError> {
    let watch = || -> io::Result<StoreWatch> {
        let inotify = Inotify::init()?;
        inotify.watches().add(
            dir,
            WatchMask::CLOSE_WRITE
                | WatchMask::MOVED_TO
                | WatchMask::MOVED_FROM
                | WatchMask::DELETE
                | WatchMask::DELETE_SELF
                | WatchMask::MOVE_SELF,
        )?;
        let events = inotify.into_event_stream(vec![0; 4096])?;
        Ok(StoreWatch::new(events.map(|event| event.map(drop)).boxed()))
    };
    watch().map_err(error("watch", dir))
}

fn read_bounded(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    fs::File::open(path)?
        .take(MAX_RECORD_LEN as u64 + 1)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_owned();
    move |source| StoreError::Io { what, path, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishes_and_reads() {
        let dir = tempfile::tempdir().unwrap();
        let store = DirectoryStore::open(dir.path()).unwrap();
        let name: NodeName = "node-a".parse().unwrap();
        store.publish(&name, b"one").unwrap();
        store.publish(&name, b"two").unwrap();
        fs::write(dir.path().join(".half.json"), "{").unwrap();
        fs::write(dir.path().join("notes.txt"), "").unwrap();
        assert_eq!(
            store.read().unwrap(),
            vec![Entry {
                name: "node-a".into(),
                bytes: b"two".to_vec()
            }]
        );
    }
}
