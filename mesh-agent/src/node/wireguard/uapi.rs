//! Userspace WireGuard: `boringtun-cli`, started by the agent and
//! configured over WireGuard's cross-platform UAPI ("key=value" lines).
//!
//! The UAPI runs over a socket pair the agent hands to boringtun
//! (`--uapi-fd`) rather than a socket in /var/run/wireguard: nothing else
//! can configure the tunnel, two agents in different network namespaces
//! cannot collide on a path, and when the agent goes, however it goes,
//! boringtun sees the socket close and exits — with the interface, so the
//! blackhole route takes over.

use std::{os::fd::AsRawFd as _, path::Path, process::Stdio, time::Duration};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::UnixStream,
    process::{Child, Command},
};

use super::WireGuardError;

/// The descriptor number boringtun finds its end of the socket pair at.
const UAPI_FD: i32 = 3;

/// A UAPI exchange that takes longer means the implementation is stuck.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);

/// Far beyond what `get` returns for thousands of peers; bounds a runaway.
const MAX_RESPONSE_LINES: usize = 1_000_000;

pub struct Userspace {
    uapi: BufReader<UnixStream>,
    _child: Child,
}

impl Userspace {
    /// Starts `program` (boringtun-cli) making interface `name`.
    pub async fn spawn(program: &Path, name: &str) -> Result<Self, WireGuardError> {
        let spawn_error = |source| WireGuardError::Spawn {
            program: program.to_owned(),
            source,
        };
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(spawn_error)?;
        let theirs_fd = theirs.as_raw_fd();
        let mut command = Command::new(program);
        command
            .args(["--foreground", "--disable-drop-privileges"])
            .args(["--uapi-fd", &UAPI_FD.to_string(), name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true);
        // SAFETY: dup2 and prctl are async-signal-safe; `theirs` outlives
        // the spawn, so its descriptor is open when the child runs this.
        unsafe {
            command.pre_exec(move || {
                // dup2 clears close-on-exec on the copy; a descriptor
                // that already has the number needs it cleared by hand.
                let moved = if theirs_fd == UAPI_FD {
                    libc::fcntl(UAPI_FD, libc::F_SETFD, 0)
                } else {
                    libc::dup2(theirs_fd, UAPI_FD)
                };
                if moved < 0 || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().map_err(spawn_error)?;
        drop(theirs);
        ours.set_nonblocking(true).map_err(spawn_error)?;
        let uapi = UnixStream::from_std(ours).map_err(spawn_error)?;
        let mut userspace = Self {
            uapi: BufReader::new(uapi),
            _child: child,
        };
        // The first answer comes once the interface exists.
        userspace.get().await?;
        Ok(userspace)
    }

    /// The device's state, as `key=value` pairs in order.
    pub async fn get(&mut self) -> Result<Vec<(String, String)>, WireGuardError> {
        // boringtun reads one command per line from a UAPI descriptor, so
        // the blank line the protocol allows after `get=1` is left out.
        self.exchange("get=1\n").await
    }

    /// Sends a `set` with `body` (lines ending in `\n`).
    pub async fn set(&mut self, body: &str) -> Result<(), WireGuardError> {
        self.exchange(&format!("set=1\n{body}\n")).await.map(drop)
    }

    async fn exchange(&mut self, request: &str) -> Result<Vec<(String, String)>, WireGuardError> {
        let exchange = async {
            self.uapi.get_mut().write_all(request.as_bytes()).await?;
            let mut pairs = Vec::new();
            let mut line = String::new();
            loop {
                line.clear();
                if self.uapi.read_line(&mut line).await? == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the userspace WireGuard closed its UAPI",
                    ));
                }
                let line = line.trim_end_matches('\n');
                if line.is_empty() {
                    return Ok(pairs);
                }
                if pairs.len() >= MAX_RESPONSE_LINES {
                    return Err(std::io::Error::other("endless UAPI response"));
                }
                if let Some((key, value)) = line.split_once('=') {
                    pairs.push((key.to_owned(), value.to_owned()));
                }
            }
        };
        let pairs = tokio::time::timeout(EXCHANGE_TIMEOUT, exchange)
            .await
            .map_err(|_| WireGuardError::Uapi("no answer within 5 s".into()))?
            .map_err(|err| WireGuardError::Uapi(err.to_string()))?;
        match pairs.last() {
            Some((key, errno)) if key == "errno" && errno == "0" => Ok(pairs),
            Some((key, errno)) if key == "errno" => Err(WireGuardError::Uapi(format!(
                "the request failed with errno {errno}"
            ))),
            _ => Err(WireGuardError::Uapi("an answer without errno".into())),
        }
    }
}
