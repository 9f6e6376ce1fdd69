//! The directory store: one file per node, `NAME.json` (its revocations in
//! `revocations/NAME.json`, its bindings in `bindings/NAME.json`, the
//! admin's revocation of it in `revoked-nodes/NAME.json`), written by
//! renaming a finished file into place and watched with inotify — one
//! machine, a shared filesystem, or a folder kept in step by GitOps.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use futures_util::StreamExt as _;
use inotify::{Inotify, WatchMask};

use super::{Entry, MAX_ENTRIES, NodeName, Section, StoreError, StoreWatch};

#[derive(Debug, Clone)]
pub struct DirectoryStore {
    dir: PathBuf,
}

const SUFFIX: &str = ".json";

impl DirectoryStore {
    /// Opens the store at `dir`, making its folders if they are missing.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let store = Self {
            dir: dir.to_owned(),
        };
        for section in Section::ALL {
            let folder = store.folder(section);
            fs::create_dir_all(&folder).map_err(error("create", &folder))?;
        }
        Ok(store)
    }

    /// Writes `NAME.json` in `section`'s folder, replacing the node's
    /// previous entry at once: readers see the old or the new file, never
    /// half of one.
    pub fn publish(
        &self,
        section: Section,
        name: &NodeName,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        let folder = self.folder(section);
        let path = folder.join(format!("{name}{SUFFIX}"));
        let fresh = folder.join(format!(".{name}{SUFFIX}.new"));
        fs::write(&fresh, bytes).map_err(error("write", &fresh))?;
        fs::rename(&fresh, &path).map_err(error("replace", &path))
    }

    /// Records in the top folder, the rest in a folder of their own.
    fn folder(&self, section: Section) -> PathBuf {
        match section {
            Section::Nodes => self.dir.clone(),
            other => self.dir.join(other.name()),
        }
    }

    /// Every entry: the files named `*.json` (hidden files are work in
    /// progress). A file too long for its section is read as its first
    /// bytes, so that it is rejected, not skipped unseen.
    pub fn read(&self, section: Section) -> Result<Vec<Entry>, StoreError> {
        let folder = self.folder(section);
        let mut entries = Vec::new();
        for dirent in fs::read_dir(&folder).map_err(error("list", &folder))? {
            let dirent = dirent.map_err(error("list", &folder))?;
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
                    store: folder.display().to_string(),
                    limit: MAX_ENTRIES,
                });
            }
            let path = dirent.path();
            let bytes = match read_bounded(&path, section.max_len()) {
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

    /// Watches the folders for entries being written, renamed or removed.
    pub fn watch(&self) -> Result<StoreWatch, StoreError> {
        watch_dirs(&Section::ALL.map(|section| self.folder(section)))
    }
}

/// Watches `dirs` for files being written, renamed or removed, and for the
/// folders themselves going.
pub fn watch_dirs(dirs: &[PathBuf]) -> Result<StoreWatch, StoreError> {
    let inotify = Inotify::init().map_err(error("watch", &dirs[0]))?;
    for dir in dirs {
        inotify
            .watches()
            .add(
                dir,
                WatchMask::CLOSE_WRITE
                    | WatchMask::MOVED_TO
                    | WatchMask::MOVED_FROM
                    | WatchMask::DELETE
                    | WatchMask::DELETE_SELF
                    | WatchMask::MOVE_SELF,
            )
            .map_err(error("watch", dir))?;
    }
    let events = inotify
        .into_event_stream(vec![0; 4096])
        .map_err(error("watch", &dirs[0]))?;
    Ok(StoreWatch::new(events.map(|event| event.map(drop)).boxed()))
}

fn read_bounded(path: &Path, max_len: usize) -> io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    fs::File::open(path)?
        .take(max_len as u64 + 1)
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
        store.publish(Section::Nodes, &name, b"one").unwrap();
        store.publish(Section::Nodes, &name, b"two").unwrap();
        store
            .publish(Section::Revocations, &name, b"three")
            .unwrap();
        fs::write(dir.path().join(".half.json"), "{").unwrap();
        fs::write(dir.path().join("notes.txt"), "").unwrap();
        let entry = |bytes: &[u8]| {
            vec![Entry {
                name: "node-a".into(),
                bytes: bytes.to_vec(),
            }]
        };
        assert_eq!(store.read(Section::Nodes).unwrap(), entry(b"two"));
        assert_eq!(store.read(Section::Revocations).unwrap(), entry(b"three"));
    }
}
