//! Flow events from the kernel: the ring buffer, and the rate limit the
//! programs apply before writing to it.

use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use mesh_common::{FlowEvent, config, maps};

use super::{Datapath, DatapathError, map_error};

impl Datapath {
    /// Sets the kernel's flow event limit: `per_second` sustained, `burst`
    /// at once. Events past it are counted as lost.
    pub fn set_event_rate(&mut self, per_second: u32, burst: u32) -> Result<(), DatapathError> {
        let interval =
            (Duration::from_secs(1).as_nanos() as u64 / u64::from(per_second.max(1))).max(1);
        self.set_config(config::EVENT_INTERVAL, interval)?;
        self.set_config(
            config::EVENT_TOLERANCE,
            interval * u64::from(burst.max(1) - 1),
        )
    }

    /// Takes the ring buffer out of the datapath, for a reader of its own.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, DatapathError> {
        let map = self
            .ebpf
            .take_map(maps::EVENTS)
            .ok_or(DatapathError::MissingMap(maps::EVENTS))?;
        RingBuf::try_from(map).map_err(map_error(maps::EVENTS))
    }
}

/// Reads one event from a ring buffer item; `None` if it is too short.
pub fn parse_event(bytes: &[u8]) -> Option<FlowEvent> {
    (bytes.len() >= size_of::<FlowEvent>())
        // SAFETY: FlowEvent is plain old data and the length is checked.
        .then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<FlowEvent>()) })
}
