//! Asking the running agent.

use std::{
    io::{self, BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use super::{ControlError, Request, Response};

/// How long the agent may take to answer.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Sends one request over the socket at `path` and returns the answer.
pub fn request(path: &Path, request: &Request) -> Result<Response, ControlError> {
    let socket_error = |source| ControlError::Socket {
        path: path.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(path).map_err(socket_error)?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .map_err(socket_error)?;
    let mut line =
        serde_json::to_vec(request).map_err(|err| ControlError::Protocol(err.to_string()))?;
    line.push(b'\n');
    // The agent answers a peer it does not serve at once and hangs up
    // without reading the request; its answer is still there to read.
    match stream.write_all(&line) {
        Err(err) if err.kind() == io::ErrorKind::BrokenPipe => {}
        written => written.map_err(socket_error)?,
    }
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .map_err(socket_error)?;
    serde_json::from_str(&answer).map_err(|err| ControlError::Protocol(err.to_string()))
}
