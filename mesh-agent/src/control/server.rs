//! Serving the control socket. Each connection's request goes to the
//! agent's main loop, which owns everything a request may change, and the
//! answer comes back the same way.

use std::{
    fs,
    io::{self, ErrorKind},
    os::unix::fs::{FileTypeExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
    task::JoinHandle,
};

use super::{ControlError, MAX_REQUEST, Request, Response};

/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Who is asking, as the kernel vouches for it (`SO_PEERCRED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub pid: u32,
    pub uid: u32,
}

/// A request waiting for the main loop's answer.
pub struct Pending {
    pub request: Request,
    pub peer: Peer,
    reply: oneshot::Sender<Response>,
}

impl Pending {
    pub fn answer(self, response: Response) {
        // A client that hung up has no use for the answer.
        let _ = self.reply.send(response);
    }
}

pub struct ControlServer {
    path: PathBuf,
    requests: mpsc::Receiver<Pending>,
    accepting: JoinHandle<()>,
}

impl ControlServer {
    /// Listens on `path`, mode 0600. A socket left by an agent that died is
    /// replaced; one that an agent still serves is an error.
    pub fn bind(path: &Path) -> Result<Self, ControlError> {
        let socket_error = |source| ControlError::Socket {
            path: path.to_owned(),
            source,
        };
        match fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(socket_error(io::Error::new(
                    ErrorKind::AlreadyExists,
                    "exists and is no socket",
                )));
            }
            Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => return Err(ControlError::InUse(path.to_owned())),
                Err(_) => fs::remove_file(path).map_err(socket_error)?,
            },
            Err(err) if err.kind() == ErrorKind::NotFound => {}
            Err(err) => return Err(socket_error(err)),
        }
        let listener = UnixListener::bind(path).map_err(socket_error)?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(socket_error)?;
        // The socket's owner: this process.
        let owner = nix::unistd::geteuid().as_raw();
        let (sender, requests) = mpsc::channel(64);
        let accepting = tokio::spawn(accept(listener, owner, sender));
        Ok(Self {
            path: path.to_owned(),
            requests,
            accepting,
        })
    }

    /// The next request, once a client has sent it.
    pub async fn next(&mut self) -> Option<Pending> {
        self.requests.recv().await
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.accepting.abort();
        let _ = fs::remove_file(&self.path);
    }
}

async fn accept(listener: UnixListener, owner: u32, requests: mpsc::Sender<Pending>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let requests = requests.clone();
        tokio::spawn(async move {
            if let Err(err) = serve(stream, owner, requests).await {
                tracing::debug!(error = %err, "control connection");
            }
        });
    }
}

/// One connection: credentials, one request, one answer.
async fn serve(
    mut stream: UnixStream,
    owner: u32,
    requests: mpsc::Sender<Pending>,
) -> io::Result<()> {
    let cred = stream.peer_cred()?;
    // A peer outside the agent's PID namespace shows as pid 0, which would
    // name the agent itself to cgroup.procs: such a peer is unknown.
    let pid = cred
        .pid()
        .and_then(|pid| u32::try_from(pid).ok())
        .filter(|&pid| pid != 0);
    let response = match pid {
        _ if cred.uid() != 0 && cred.uid() != owner => Response::refused(
            "permission",
            format!("uid {} may not use the agent's socket", cred.uid()),
        ),
        None => Response::refused("permission", "the peer's process is unknown"),
        Some(pid) => {
            let peer = Peer {
                pid,
                uid: cred.uid(),
            };
            match read_request(&mut stream).await {
                Ok(request) => {
                    let (reply, answer) = oneshot::channel();
                    let pending = Pending {
                        request,
                        peer,
                        reply,
                    };
                    if requests.send(pending).await.is_err() {
                        return Ok(());
                    }
                    answer
                        .await
                        .unwrap_or_else(|_| Response::refused("stopping", "the agent is stopping"))
                }
                Err(message) => Response::refused("malformed", message),
            }
        }
    };
    let mut line = serde_json::to_vec(&response).map_err(io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line).await
}

async fn read_request(stream: &mut UnixStream) -> Result<Request, String> {
    let mut line = String::new();
    let mut reader = BufReader::new(stream).take(MAX_REQUEST as u64);
    match tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line)).await {
        Err(_) => return Err("no request in time".to_owned()),
        Ok(Err(err)) => return Err(format!("reading the request: {err}")),
        Ok(Ok(_)) => {}
    }
    serde_json::from_str(&line).map_err(|err| format!("not a request: {err}"))
}
