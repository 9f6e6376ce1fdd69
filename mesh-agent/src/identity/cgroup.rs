//! cgroup v2 as process bindings use it: the agent's root folder, one
//! cgroup per binding below it, moving a process in, and noticing when its
//! last process has gone.

use std::{
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// `statfs` magic of cgroup v2 (`CGROUP2_SUPER_MAGIC`).
const CGROUP2_MAGIC: i64 = 0x6367_7270;

/// The folder below a cgroup v2 mount that the agent manages by default.
const DEFAULT_ROOT: &str = "mesh";

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "no cgroup v2 file system is mounted; mount one (mount -t cgroup2 none /sys/fs/cgroup)"
    )]
    NoCgroup2,
    #[error("{} is not on a cgroup v2 file system", .0.display())]
    NotCgroup2(PathBuf),
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CgroupError {
    let path = path.to_owned();
    move |source| CgroupError::Io { what, path, source }
}

/// `mesh` below the first cgroup v2 mount: `/sys/fs/cgroup/mesh` on a
/// unified hierarchy, `/sys/fs/cgroup/unified/mesh` on a hybrid one.
pub fn default_root() -> Result<PathBuf, CgroupError> {
    let path = Path::new("/proc/self/mountinfo");
    let mounts = fs::read_to_string(path).map_err(io_error("reading", path))?;
    mounts
        .lines()
        .find_map(|line| {
            // Fields up to " - " are the mount's; the file system type follows.
            let (mount, fs) = line.split_once(" - ")?;
            (fs.split_whitespace().next()? == "cgroup2").then_some(())?;
            mount.split_whitespace().nth(4).map(PathBuf::from)
        })
        .map(|mount| mount.join(DEFAULT_ROOT))
        .ok_or(CgroupError::NoCgroup2)
}

fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|stat| stat.filesystem_type().0 == CGROUP2_MAGIC)
}

/// One cgroup v2 folder and its id: the id the kernel programs see, which
/// is the folder's inode number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup {
    path: PathBuf,
    id: u64,
}

impl Cgroup {
    /// Opens the cgroup at `path`, made first if missing (the agent's root).
    pub fn ensure(path: &Path) -> Result<Self, CgroupError> {
        fs::create_dir_all(path).map_err(io_error("creating", path))?;
        if !is_cgroup2(path) {
            return Err(CgroupError::NotCgroup2(path.to_owned()));
        }
        Self::open(path)
    }

    /// An existing cgroup.
    pub fn open(path: &Path) -> Result<Self, CgroupError> {
        let meta = fs::metadata(path).map_err(io_error("opening", path))?;
        Ok(Self {
            path: path.to_owned(),
            id: meta.ino(),
        })
    }

    /// Makes the child cgroup `name`; an error if it exists.
    pub fn create_child(&self, name: &str) -> Result<Self, CgroupError> {
        let path = self.path.join(name);
        fs::create_dir(&path).map_err(io_error("creating", &path))?;
        Self::open(&path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The root of the hierarchy the cgroup is in: its topmost ancestor
    /// on the same cgroup v2 file system.
    pub fn hierarchy_root(&self) -> Result<PathBuf, CgroupError> {
        let path = fs::canonicalize(&self.path).map_err(io_error("resolving", &self.path))?;
        let mut root = path.as_path();
        while let Some(parent) = root.parent()
            && is_cgroup2(parent)
        {
            root = parent;
        }
        Ok(root.to_owned())
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// The file whose changes tell that the cgroup emptied.
    pub fn events_path(&self) -> PathBuf {
        self.path.join("cgroup.events")
    }

    /// Moves process `pid` (all its threads) into the cgroup.
    pub fn add_process(&self, pid: u32) -> Result<(), CgroupError> {
        let procs = self.path.join("cgroup.procs");
        fs::write(&procs, format!("{pid}\n")).map_err(io_error("moving a process into", &procs))
    }

    /// Whether a process is in the cgroup or below it.
    pub fn populated(&self) -> Result<bool, CgroupError> {
        let events = self.events_path();
        let text = fs::read_to_string(&events).map_err(io_error("reading", &events))?;
        Ok(text.lines().any(|line| line == "populated 1"))
    }

    /// Whether process `pid` is in this very cgroup.
    pub fn holds(&self, pid: u32) -> bool {
        let Ok(text) = fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
            return false;
        };
        // "0::/mesh/name": the path below the cgroup v2 mount.
        text.lines()
            .filter_map(|line| line.strip_prefix("0::/"))
            .any(|path| !path.is_empty() && self.path.ends_with(path))
    }

    /// Removes the cgroup, which must be empty; one already gone is fine.
    pub fn remove(&self) -> Result<(), CgroupError> {
        match fs::remove_dir(&self.path) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => {
                Err(io_error("removing", &self.path)(err))
            }
            _ => Ok(()),
        }
    }
}

/// Tells when watched cgroups may have emptied: the kernel reports
/// `cgroup.events` modified whenever `populated` changes.
pub struct EmptiedWatch {
    events: inotify::EventStream<Vec<u8>>,
}

impl EmptiedWatch {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            events: inotify::Inotify::init()?.into_event_stream(vec![0; 4096])?,
        })
    }

    pub fn watch(&self, cgroup: &Cgroup) -> Result<(), CgroupError> {
        let events = cgroup.events_path();
        self.events
            .watches()
            .add(&events, inotify::WatchMask::MODIFY)
            .map(drop)
            .map_err(io_error("watching", &events))
    }

    /// Waits until some watched cgroup's `populated` may have changed.
    pub async fn changed(&mut self) -> io::Result<()> {
        use futures_util::StreamExt as _;
        match self.events.next().await {
            Some(event) => event.map(drop),
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "inotify stream ended",
            )),
        }
    }
}
