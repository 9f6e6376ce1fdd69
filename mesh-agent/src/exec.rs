//! `mesh-agent exec`: runs a command bound to the identity a token proves.
//! The agent checks the token and moves this process into the binding's
//! cgroup; the command, started after that, inherits it, and so does every
//! process it starts. This process stays beside the command: it hands the
//! agent the token file's new content whenever the file changes (a token
//! about to expire is replaced by writing its successor there), passes
//! SIGTERM and SIGHUP on, and exits as the command does.

use std::{
    ffi::OsString,
    io,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicI32, Ordering},
    time::{Duration, Instant},
};

use nix::sys::signal::{self, SigHandler, Signal};

use crate::control::{self, Bound, ControlError, Request, Response};

/// How often the command is checked on, and signals passed on.
const TICK: Duration = Duration::from_millis(100);
/// How often the token file is read for a new token.
const TOKEN_CHECK: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("reading the token {}", path.display())]
    Token {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("the agent refused ({reason}): {message}")]
    Refused { reason: String, message: String },
    #[error("the agent answered {0:?}, not a binding")]
    Unexpected(Box<Response>),
    #[error("starting {}", program.to_string_lossy())]
    Spawn {
        program: OsString,
        #[source]
        source: io::Error,
    },
    #[error("waiting for the command")]
    Wait(#[source] io::Error),
}

/// The last signal to pass on to the command; 0 for none.
static PENDING_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn remember(signal: libc::c_int) {
    PENDING_SIGNAL.store(signal, Ordering::Relaxed);
}

/// Binds this process, runs `command` and returns its exit code (128 +
/// the signal's number if a signal ended it).
pub fn exec(socket: &Path, token_file: &Path, command: &[OsString]) -> Result<i32, ExecError> {
    let mut token = read_token(token_file)?;
    let bound = ask(
        socket,
        Request::Bind {
            token: token.clone(),
        },
    )?;
    let (program, args) = command.split_first().ok_or_else(|| ExecError::Spawn {
        program: OsString::new(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "no command"),
    })?;
    let mut child =
        Command::new(program)
            .args(args)
            .spawn()
            .map_err(|source| ExecError::Spawn {
                program: program.clone(),
                source,
            })?;
    // After the spawn: an ignored signal would be ignored by the command
    // too. The terminal sends SIGINT and SIGQUIT to both already.
    // SAFETY: the handler only stores into an atomic.
    unsafe {
        for passed in [Signal::SIGTERM, Signal::SIGHUP] {
            let _ = signal::signal(passed, SigHandler::Handler(remember));
        }
        for ignored in [Signal::SIGINT, Signal::SIGQUIT] {
            let _ = signal::signal(ignored, SigHandler::SigIgn);
        }
    }
    let mut checked = Instant::now();
    loop {
        if let Some(status) = child.try_wait().map_err(ExecError::Wait)? {
            use std::os::unix::process::ExitStatusExt as _;
            return Ok(status
                .code()
                .or_else(|| status.signal().map(|signal| 128 + signal))
                .unwrap_or(1));
        }
        let pending = PENDING_SIGNAL.swap(0, Ordering::Relaxed);
        if pending != 0 {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(child.id() as libc::pid_t, pending) };
        }
        if checked.elapsed() >= TOKEN_CHECK {
            checked = Instant::now();
            refresh(socket, token_file, &bound, &mut token);
        }
        std::thread::sleep(TICK);
    }
}

/// Hands the agent the token file's content if it changed. A failure is
/// reported and tried again at the next change: the binding keeps its
/// token until it expires.
fn refresh(socket: &Path, token_file: &Path, bound: &Bound, token: &mut String) {
    let Ok(fresh) = read_token(token_file) else {
        return;
    };
    if fresh == *token {
        return;
    }
    *token = fresh;
    let request = Request::Refresh {
        cgroup: bound.cgroup.clone(),
        token: token.clone(),
    };
    if let Err(err) = ask(socket, request) {
        eprintln!("mesh-agent exec: refreshing the token: {err}");
    }
}

fn ask(socket: &Path, request: Request) -> Result<Bound, ExecError> {
    match control::request(socket, &request)? {
        Response::Bound(bound) => Ok(bound),
        Response::Refused { reason, message } => Err(ExecError::Refused { reason, message }),
        other => Err(ExecError::Unexpected(Box::new(other))),
    }
}

fn read_token(path: &Path) -> Result<String, ExecError> {
    std::fs::read_to_string(path)
        .map(|text| text.trim().to_owned())
        .map_err(|source| ExecError::Token {
            path: path.to_owned(),
            source,
        })
}
