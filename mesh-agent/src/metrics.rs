//! Prometheus metrics of a running agent, served over HTTP with its health
//! endpoints. Kernel figures (packet and byte counters, flows, map fill,
//! policy generation) are read from the pinned maps at scrape time; the
//! agent's own (reloads, apply time) are recorded as they happen.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use mesh_common::{Reason, identity, maps, service};
use prometheus::{
    Encoder as _, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

use crate::datapath::{self, Pins};

/// Label value for series beyond the cardinality cap, and for sources and
/// services without a name.
const OTHER: &str = "other";
const UNKNOWN: &str = "unknown";

/// Names of identity tags and service ids, from the applied policy.
#[derive(Default)]
pub struct Names {
    pub identities: BTreeMap<u32, String>,
    pub services: BTreeMap<u32, String>,
}

pub struct Metrics {
    registry: Registry,
    packets: IntCounterVec,
    bytes: IntCounterVec,
    flows: IntGauge,
    generation: IntGauge,
    map_entries: IntGaugeVec,
    map_capacity: IntGaugeVec,
    pub reloads: IntCounterVec,
    pub apply_seconds: Histogram,
    events_lost: IntCounter,
    /// Kernel counter totals already added to the exported counters, by
    /// exported label set: the kernel's are absolute, Prometheus's grow.
    exported: Mutex<HashMap<[String; 4], (u64, u64)>>,
    max_series: usize,
    pins: Pins,
    pub names: Mutex<Names>,
    /// Set once a policy is applied: the readiness probe's answer.
    pub ready: AtomicBool,
}

impl Metrics {
    pub fn new(bpffs: PathBuf, max_series: usize) -> prometheus::Result<Arc<Self>> {
        let registry = Registry::new();
        let labels = ["source", "service", "verdict", "reason"];
        let packets = IntCounterVec::new(
            Opts::new(
                "mesh_packets_total",
                "Packets judged, by source identity, service, verdict and reason.",
            ),
            &labels,
        )?;
        let bytes = IntCounterVec::new(
            Opts::new(
                "mesh_bytes_total",
                "Bytes judged, by source identity, service, verdict and reason.",
            ),
            &labels,
        )?;
        let flows = IntGauge::new("mesh_flows_active", "Entries in the flow table.")?;
        let generation = IntGauge::new(
            "mesh_policy_generation",
            "Policy swaps and revocations so far (the epoch).",
        )?;
        let map_entries = IntGaugeVec::new(
            Opts::new("mesh_map_entries", "Entries in each kernel map."),
            &["map"],
        )?;
        let map_capacity = IntGaugeVec::new(
            Opts::new("mesh_map_capacity", "Capacity of each kernel map."),
            &["map"],
        )?;
        let reloads = IntCounterVec::new(
            Opts::new(
                "mesh_policy_reloads_total",
                "Policy loads, by result (applied or rejected).",
            ),
            &["result"],
        )?;
        let apply_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "mesh_policy_apply_seconds",
                "Time to load, compile and install a policy.",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        )?;
        let events_lost = IntCounter::new(
            "mesh_events_lost_total",
            "Flow events the kernel dropped: over its rate limit, or the ring was full.",
        )?;
        let build = IntGaugeVec::new(
            Opts::new("mesh_build_info", "The agent's version."),
            &["version"],
        )?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        for collector in [
            Box::new(packets.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(bytes.clone()),
            Box::new(flows.clone()),
            Box::new(generation.clone()),
            Box::new(map_entries.clone()),
            Box::new(map_capacity.clone()),
            Box::new(reloads.clone()),
            Box::new(apply_seconds.clone()),
            Box::new(events_lost.clone()),
            Box::new(build),
        ] {
            registry.register(collector)?;
        }
        Ok(Arc::new(Self {
            registry,
            packets,
            bytes,
            flows,
            generation,
            map_entries,
            map_capacity,
            reloads,
            apply_seconds,
            events_lost,
            exported: Mutex::default(),
            max_series,
            pins: Pins::new(bpffs),
            names: Mutex::default(),
            ready: AtomicBool::new(false),
        }))
    }

    /// Adds metrics kept by another part of the agent (the node mesh).
    pub fn register(
        &self,
        collector: Box<dyn prometheus::core::Collector>,
    ) -> prometheus::Result<()> {
        self.registry.register(collector)
    }

    /// Reads the kernel's figures and renders every metric as text.
    pub fn render(&self) -> String {
        if let Ok(inspection) = datapath::inspect(&self.pins) {
            self.generation.set((inspection.state >> 1) as i64);
            for fill in &inspection.maps {
                self.map_capacity
                    .with_label_values(&[fill.name])
                    .set(i64::from(fill.capacity));
                if let Some(entries) = fill.entries {
                    self.map_entries
                        .with_label_values(&[fill.name])
                        .set(entries as i64);
                    if fill.name == maps::FLOWS {
                        self.flows.set(entries as i64);
                    }
                }
            }
            self.export_counters(&inspection.counters);
            // The kernel's count is absolute; the counter only grows.
            let lost = inspection
                .events_lost
                .saturating_sub(self.events_lost.get());
            self.events_lost.inc_by(lost);
        }
        let mut out = Vec::new();
        // Encoding into memory cannot fail for these metric types.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    /// Adds what the kernel counted since the last scrape. Past `max_series`
    /// distinct label sets, new ones go to source and service `other`.
    fn export_counters(&self, counters: &datapath::Counters) {
        let names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        let mut exported = self.exported.lock().unwrap_or_else(|e| e.into_inner());
        // Sum first: several kernel keys may fold into one label set.
        let mut totals: HashMap<[String; 4], (u64, u64)> = HashMap::new();
        for (&(tag, id, reason), &(packets, bytes)) in counters {
            let mut labels = labels(&names, tag, id, reason);
            if !exported.contains_key(&labels)
                && !totals.contains_key(&labels)
                && exported.len() + totals.len() >= self.max_series
            {
                labels[0] = OTHER.to_owned();
                labels[1] = OTHER.to_owned();
            }
            let total = totals.entry(labels).or_default();
            total.0 += packets;
            total.1 += bytes;
        }
        for (labels, (packets, bytes)) in totals {
            let seen = exported.entry(labels.clone()).or_default();
            let values: [&str; 4] = [&labels[0], &labels[1], &labels[2], &labels[3]];
            self.packets
                .with_label_values(&values)
                .inc_by(packets.saturating_sub(seen.0));
            self.bytes
                .with_label_values(&values)
                .inc_by(bytes.saturating_sub(seen.1));
            *seen = (seen.0.max(packets), seen.1.max(bytes));
        }
    }
}

fn labels(names: &Names, tag: u32, id: u32, reason: Reason) -> [String; 4] {
    let source = match names.identities.get(&tag) {
        Some(name) => name.clone(),
        None if tag == identity::UNKNOWN => UNKNOWN.to_owned(),
        None => format!("identity {tag}"),
    };
    let service = match names.services.get(&id) {
        Some(name) => name.clone(),
        None if id == service::NONE => UNKNOWN.to_owned(),
        None => format!("service {id}"),
    };
    let verdict = if reason.allows() { "allow" } else { "deny" };
    [
        source,
        service,
        verdict.to_owned(),
        reason.name().to_owned(),
    ]
}

/// Serves `/metrics`, `/healthz` (the agent runs) and `/readyz` (a policy
/// is applied) until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut request = [0u8; 2048];
            let Ok(n) = stream.read(&mut request).await else {
                return;
            };
            let line = String::from_utf8_lossy(&request[..n]);
            let path = line.split_whitespace().nth(1).unwrap_or("/");
            let (status, body) = match path {
                "/metrics" => ("200 OK", metrics.render()),
                "/healthz" => ("200 OK", "ok\n".to_owned()),
                "/readyz" if metrics.ready.load(Ordering::Relaxed) => {
                    ("200 OK", "ready\n".to_owned())
                }
                "/readyz" => (
                    "503 Service Unavailable",
                    "no policy applied yet\n".to_owned(),
                ),
                _ => (
                    "404 Not Found",
                    "try /metrics, /healthz or /readyz\n".to_owned(),
                ),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}

/// Binds the metrics listener, with the address in the error.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|err| {
        std::io::Error::new(
            err.kind(),
            format!("listening for metrics on {addr}: {err}"),
        )
    })
}
