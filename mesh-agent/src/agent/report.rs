//! `mesh-agent status` and `mesh-agent teardown`: what an agent left on a
//! node, and removing it.

use std::{fmt, path::Path};

use serde::Serialize;

use mesh_common::{identity, service};

use super::{AgentError, AgentLock, AgentStatus, Binding, read_bindings};
use crate::{
    datapath::{self, Inspection, Pins},
    identity::revocations::{self, Revoked},
    policy::{self, Capacities},
};

/// The agent's own account (if it ever ran with this state folder) and what
/// the pins show.
#[derive(Debug, Serialize)]
pub struct Report {
    pub running: bool,
    pub agent: Option<AgentStatus>,
    pub datapath: Option<Inspection>,
    /// Packets and bytes by source, service and reason since the datapath
    /// was first loaded.
    pub counters: Vec<CounterLine>,
    /// Processes bound to identities, and revoked identities.
    pub bindings: Vec<Binding>,
    pub revoked: Revoked,
}

#[derive(Debug, Serialize)]
pub struct CounterLine {
    pub source: String,
    pub service: String,
    pub verdict: &'static str,
    pub reason: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

pub fn status(state_dir: &Path, bpffs: &Path) -> Report {
    let agent = AgentStatus::read(state_dir).ok();
    let running = agent
        .as_ref()
        .and_then(|status| status.pid)
        .is_some_and(|pid| {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
        });
    let datapath = datapath::inspect(&Pins::new(bpffs)).ok();
    let counters = datapath
        .as_ref()
        .map(|inspection| counter_lines(inspection, agent.as_ref()))
        .unwrap_or_default();
    Report {
        running,
        agent,
        datapath,
        counters,
        bindings: read_bindings(state_dir).unwrap_or_default(),
        revoked: revocations::read(state_dir).unwrap_or_default(),
    }
}

/// Names the counters' tags and ids through the agent's policy file. Tags
/// are a function of the names alone, so any version of the file that still
/// has an identity names it rightly; the rest show as numbers.
fn counter_lines(inspection: &Inspection, agent: Option<&AgentStatus>) -> Vec<CounterLine> {
    let compiled = agent
        .and_then(|agent| policy::load(&agent.policy).ok())
        .and_then(|policy| policy::compile(&policy, &Capacities::default()).ok());
    let source = |tag: u32| match compiled.as_ref().and_then(|c| c.identities.get(&tag)) {
        Some(id) => id.to_string(),
        None if tag == identity::UNKNOWN => "unknown".to_owned(),
        None => format!("identity {tag}"),
    };
    let service = |id: u32| match compiled.as_ref().and_then(|c| c.services.get(&id)) {
        Some(name) => name.clone(),
        None if id == service::NONE => "unknown".to_owned(),
        None => format!("service {id}"),
    };
    inspection
        .counters
        .iter()
        .map(|(&(tag, id, reason), &(packets, bytes))| CounterLine {
            source: source(tag),
            service: service(id),
            verdict: if reason.allows() { "allow" } else { "deny" },
            reason: reason.name(),
            packets,
            bytes,
        })
        .collect()
}

/// Detaches and unpins everything under `bpffs`, once no agent runs there,
/// and forgets the agent's status.
pub fn teardown(state_dir: &Path, bpffs: &Path) -> Result<(), AgentError> {
    if !bpffs.exists() {
        return Ok(());
    }
    let lock = AgentLock::take(bpffs)?;
    // The shield's pins are below the datapath's folder.
    crate::node::unpin_shield(bpffs).map_err(|err| AgentError::Mesh(err.into()))?;
    datapath::unpin_all(&Pins::new(bpffs))?;
    drop(lock);
    let status = AgentStatus::path(state_dir);
    match std::fs::remove_file(&status) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(AgentError::Io {
            what: "removing",
            path: status,
            source: err,
        }),
        _ => Ok(()),
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.agent, self.running) {
            (Some(agent), true) => {
                writeln!(f, "agent: running (pid {})", agent.pid.unwrap_or_default())?
            }
            (Some(_), false) => writeln!(f, "agent: not running")?,
            (None, _) => writeln!(f, "agent: never ran with this state folder")?,
        }
        if let Some(agent) = &self.agent {
            writeln!(f, "policy: {}", agent.policy.display())?;
            match &agent.applied {
                Some(applied) => writeln!(
                    f,
                    "  applied {}: {} (reloads since start: {})",
                    applied.at, applied.summary, applied.reloads
                )?,
                None => writeln!(f, "  never applied")?,
            }
            if !agent.rejected.is_empty() {
                writeln!(f, "  rejected, the applied policy keeps enforcing:")?;
                for line in &agent.rejected {
                    writeln!(f, "    {line}")?;
                }
            }
        }
        for binding in &self.bindings {
            let state = binding.ended.as_deref().unwrap_or("in force");
            writeln!(
                f,
                "bound: {} pid {} in {} from {} ({state}, token expires {})",
                binding.identity,
                binding.pid,
                binding.cgroup.display(),
                binding
                    .addresses
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                time::OffsetDateTime::from_unix_timestamp(binding.expires as i64)
                    .ok()
                    .and_then(|at| at
                        .format(&time::format_description::well_known::Rfc3339)
                        .ok())
                    .unwrap_or_else(|| binding.expires.to_string())
            )?;
        }
        for (id, revocation) in &self.revoked {
            let reason = revocation.reason.as_deref().unwrap_or("no reason given");
            writeln!(f, "revoked: {id} since {} ({reason})", revocation.at)?;
        }
        let Some(datapath) = &self.datapath else {
            return writeln!(f, "datapath: nothing pinned");
        };
        writeln!(
            f,
            "datapath: policy generation {} (epoch {})",
            datapath.state & 1,
            datapath.state >> 1
        )?;
        if datapath.links.is_empty() {
            writeln!(f, "  attached nowhere")?;
        }
        for (interface, hook) in &datapath.links {
            writeln!(f, "  attached: {interface} {hook}")?;
        }
        for map in &datapath.maps {
            match map.entries {
                Some(entries) => writeln!(
                    f,
                    "  {:<18} {entries:>8} / {:<8} ({:.1}%)",
                    map.name,
                    map.capacity,
                    entries as f64 * 100.0 / f64::from(map.capacity.max(1))
                )?,
                None => writeln!(f, "  {:<18} {:>8}   array", map.name, map.capacity)?,
            }
        }
        if !self.counters.is_empty() {
            writeln!(f, "counters:")?;
        }
        for line in &self.counters {
            writeln!(
                f,
                "  {} -> {}: {} {} {} packets, {} bytes",
                line.source, line.service, line.verdict, line.reason, line.packets, line.bytes
            )?;
        }
        Ok(())
    }
}
