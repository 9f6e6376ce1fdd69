//! The flow log: flow events from the kernel, named and written as JSON
//! lines (a file, or stdout), and `mesh-agent flows`, which reads them.

use std::{
    io::{self, BufRead as _, Seek as _, Write as _},
    net::{IpAddr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use mesh_common::{FlowEvent, Reason};
use serde::{Deserialize, Serialize};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use tokio::io::unix::AsyncFd;

use crate::{
    datapath::{Clock, parse_event},
    metrics::Metrics,
};

/// One line of the flow log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    pub time: String,
    pub verdict: String,
    pub reason: String,
    pub source: Option<String>,
    pub service: Option<String>,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
    pub proto: String,
}

/// Where the flow log goes: a file appended to, or stdout for `-`.
pub fn open_sink(path: &Path) -> io::Result<Box<dyn io::Write + Send>> {
    if path == Path::new("-") {
        return Ok(Box::new(io::stdout()));
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    Ok(Box::new(file))
}

/// Reads the ring buffer as events arrive and writes them, named, to `sink`.
pub async fn write_flow_log(
    ring: RingBuf<MapData>,
    metrics: Arc<Metrics>,
    mut sink: Box<dyn io::Write + Send>,
) -> io::Result<()> {
    // SAFETY: the ring buffer owns its map descriptor for as long as the
    // AsyncFd owns the ring buffer, and always reports that same one.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|err| io::Error::other(err.to_string()))?;
    loop {
        let mut ready = ring.readable_mut().await?;
        let clock = Clock::now().map_err(io::Error::other)?;
        let mut lines = Vec::new();
        {
            let names = metrics.names.lock().unwrap_or_else(|e| e.into_inner());
            let ring = ready.get_inner_mut();
            while let Some(item) = ring.next() {
                if let Some(event) = parse_event(&item) {
                    let record = record(&event, &clock, &names);
                    serde_json::to_writer(&mut lines, &record)?;
                    lines.push(b'\n');
                }
            }
        }
        sink.write_all(&lines)?;
        sink.flush()?;
        ready.clear_ready();
    }
}

fn record(event: &FlowEvent, clock: &Clock, names: &crate::metrics::Names) -> FlowRecord {
    let ago = Duration::from_nanos(clock.boot_ns.saturating_sub(event.time_ns));
    let time = OffsetDateTime::from(clock.wall - ago)
        .format(&Rfc3339)
        .unwrap_or_default();
    let reason = Reason::from_u8(event.reason).unwrap_or(Reason::Malformed);
    FlowRecord {
        time,
        verdict: if reason.allows() { "allow" } else { "deny" }.to_owned(),
        reason: reason.name().to_owned(),
        source: names.identities.get(&event.identity).cloned(),
        service: names.services.get(&event.service).cloned(),
        src: address(event.src),
        sport: event.sport,
        dst: address(event.dst),
        dport: event.dport,
        proto: match event.proto {
            1 => "icmp".to_owned(),
            6 => "tcp".to_owned(),
            17 => "udp".to_owned(),
            58 => "icmpv6".to_owned(),
            other => other.to_string(),
        },
    }
}

/// The maps' 16-byte form back to IPv4 or IPv6.
fn address(bytes: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(bytes);
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}

/// What `mesh-agent flows` shows.
#[derive(Default)]
pub struct FlowFilter {
    pub verdict: Option<String>,
    pub source: Option<String>,
    pub service: Option<String>,
}

impl FlowFilter {
    fn admits(&self, record: &FlowRecord) -> bool {
        self.verdict.as_ref().is_none_or(|v| *v == record.verdict)
            && self
                .source
                .as_ref()
                .is_none_or(|s| record.source.as_ref() == Some(s))
            && self
                .service
                .as_ref()
                .is_none_or(|s| record.service.as_ref() == Some(s))
    }
}

/// Prints the log's matching lines to `out`; with `follow`, keeps printing
/// new ones as they are written, until the process is stopped.
pub fn show_flows(
    path: &PathBuf,
    filter: &FlowFilter,
    follow: bool,
    out: &mut impl io::Write,
) -> io::Result<()> {
    let mut file = std::fs::File::open(path)
        .map_err(|err| io::Error::new(err.kind(), format!("{}: {err}", path.display())))?;
    let mut position = 0;
    loop {
        let length = file.metadata()?.len();
        if length < position {
            // Rotated or truncated: start over.
            position = 0;
        }
        file.seek(io::SeekFrom::Start(position))?;
        let mut reader = io::BufReader::new(&file);
        let mut line = String::new();
        while reader.read_line(&mut line)? > 0 {
            if !line.ends_with('\n') {
                // A line still being written: read it whole next time.
                break;
            }
            position += line.len() as u64;
            if serde_json::from_str::<FlowRecord>(&line).is_ok_and(|record| filter.admits(&record))
            {
                out.write_all(line.as_bytes())?;
            }
            line.clear();
        }
        out.flush()?;
        if !follow {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
