//! `policy replay`: every packet of a capture, in order, through the real
//! programs in the running kernel (BPF_PROG_TEST_RUN) as ingress on a mesh
//! interface, with maps built from the policy and a fresh flow table.
//!
//! Time: packet N is judged at `now + (its timestamp − the first packet's)`,
//! so rate limits, timeouts and expiries act as they would have during the
//! capture. A packet without a timestamp, or one earlier than the one before
//! it, is judged at the previous packet's time.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use mesh_common::{Reason, identity, service};
use serde::Serialize;

use crate::{
    capture::{self, CaptureError, Frame},
    datapath::{Clock, Datapath, DatapathError, Entry},
    policy::{self, Capacities, CompileError, Compiled, LoadError},
};

/// The boot-clock instant that stands for `now`: far enough from zero for
/// every timeout's arithmetic, and the same on every run.
const REPLAY_EPOCH_NS: u64 = 1 << 40;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Policy(#[from] LoadError),
    #[error("{}: {source}", path.display())]
    Compile {
        path: PathBuf,
        #[source]
        source: CompileError,
    },
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error("running packet {packet}")]
    Run {
        packet: usize,
        #[source]
        source: DatapathError,
    },
    #[error(transparent)]
    Datapath(#[from] DatapathError),
}

/// One line of replay output, as the spec words it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReplayVerdict {
    pub packet: usize,
    pub verdict: &'static str,
    pub reason: &'static str,
    pub source: Option<String>,
    pub service: Option<String>,
}

/// Replays `capture` against `policy_path` as of `now`. Returns every
/// verdict, or an error before anything is judged (bad policy, unreadable
/// capture) or when the kernel refuses a run: never a partial result.
pub fn replay(
    policy_path: &Path,
    capture_path: &Path,
    now: SystemTime,
) -> Result<Vec<ReplayVerdict>, ReplayError> {
    Replayer::new(policy_path)?.replay(capture_path, now)
}

/// A policy compiled and loaded into a private copy of the programs, ready
/// to replay captures one after the other, each with a fresh flow table.
pub struct Replayer {
    datapath: Datapath,
    compiled: Compiled,
}

impl Replayer {
    pub fn new(policy_path: &Path) -> Result<Self, ReplayError> {
        let policy = policy::load(policy_path)?;
        let compiled = policy::compile(&policy, &Capacities::default()).map_err(|source| {
            ReplayError::Compile {
                path: policy_path.to_owned(),
                source,
            }
        })?;
        Ok(Self {
            datapath: Datapath::load()?,
            compiled,
        })
    }

    pub fn replay(
        &mut self,
        capture_path: &Path,
        now: SystemTime,
    ) -> Result<Vec<ReplayVerdict>, ReplayError> {
        let packets = capture::read_capture(capture_path)?;
        let datapath = &mut self.datapath;
        datapath.forget_traffic()?;
        let clock = Clock {
            wall: now,
            boot_ns: REPLAY_EPOCH_NS,
        };
        datapath.install(&self.compiled.entries, &clock)?;

        let first = packets.iter().find_map(|p| p.timestamp);
        let mut at = REPLAY_EPOCH_NS;
        let mut verdicts = Vec::with_capacity(packets.len());
        for packet in &packets {
            if let (Some(first), Some(ts)) = (first, packet.timestamp) {
                at = at.max(REPLAY_EPOCH_NS.saturating_add(nanos(ts.saturating_sub(first))));
            }
            let (reason, identity, service) = match &packet.frame {
                // A frame that no link could deliver to the program is malformed.
                Frame::Unrunnable(_) => (Reason::Malformed, identity::UNKNOWN, service::NONE),
                Frame::Ethernet(bytes) => {
                    datapath.set_clock(at)?;
                    let run = datapath.test_run(Entry::Xdp, bytes).map_err(|source| {
                        ReplayError::Run {
                            packet: packet.number,
                            source,
                        }
                    })?;
                    (run.reason, run.identity, run.service)
                }
            };
            verdicts.push(verdict(
                &self.compiled,
                packet.number,
                reason,
                identity,
                service,
            ));
        }
        Ok(verdicts)
    }
}

fn verdict(
    compiled: &Compiled,
    packet: usize,
    reason: Reason,
    identity: u32,
    service: u32,
) -> ReplayVerdict {
    ReplayVerdict {
        packet,
        verdict: if reason.allows() { "allow" } else { "deny" },
        reason: reason.name(),
        source: compiled.identities.get(&identity).map(|id| id.to_string()),
        service: compiled.services.get(&service).cloned(),
    }
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}
