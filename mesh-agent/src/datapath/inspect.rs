//! What a pinned datapath looks like from outside, for `mesh-agent status`:
//! read from the pins alone, with no programs loaded.

use aya::maps::{Array, Map, MapData, MapType, PerCpuArray, PerCpuHashMap};
use mesh_common::{config, maps};
use serde::Serialize;

use super::{
    Counters, DatapathError, Hook, Pins, map_error, pin::ALL_MAPS, sys, traffic::sum_counters,
};

/// How full one map is; `entries` is `None` for arrays, which are always
/// full.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MapFill {
    pub name: &'static str,
    pub entries: Option<u64>,
    pub capacity: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Inspection {
    /// The live state word: `epoch << 1 | generation`.
    pub state: u64,
    pub maps: Vec<MapFill>,
    /// Pinned links: interface and hook.
    pub links: Vec<(String, &'static str)>,
    #[serde(skip)]
    pub counters: Counters,
    /// Flow events the kernel dropped: over the rate limit or a full ring.
    pub events_lost: u64,
}

/// Reads the pins under `pins`; an error if there are none.
pub fn inspect(pins: &Pins) -> Result<Inspection, DatapathError> {
    let state = {
        let data = open(pins, maps::CONFIG)?;
        let map = Map::from_map_data(data).map_err(map_error(maps::CONFIG))?;
        let config: Array<MapData, u64> = Array::try_from(map).map_err(map_error(maps::CONFIG))?;
        config
            .get(&config::STATE, 0)
            .map_err(map_error(maps::CONFIG))?
    };
    let mut fills = Vec::new();
    // The programs' own scratch space and event plumbing are no business
    // of an operator's fill levels.
    for name in ALL_MAPS.into_iter().filter(|&name| {
        ![
            maps::SCRATCH,
            maps::LAST_VERDICT,
            maps::EVENTS,
            maps::EVENT_BUCKET,
            maps::EVENTS_LOST,
        ]
        .contains(&name)
    }) {
        let data = open(pins, name)?;
        let info = data.info().map_err(map_error(name))?;
        let is_array = matches!(info.map_type(), Ok(MapType::Array | MapType::PerCpuArray));
        let entries = if is_array {
            None
        } else {
            let limit = u64::from(info.max_entries()) * 2;
            let count =
                sys::count_keys(std::os::fd::AsFd::as_fd(data.fd()), info.key_size(), limit)
                    .map_err(|source| DatapathError::Pin {
                        path: pins.map_path(name),
                        source,
                    })?;
            Some(count)
        };
        fills.push(MapFill {
            name,
            entries,
            capacity: info.max_entries(),
        });
    }
    let events_lost = {
        let map = Map::from_map_data(open(pins, maps::EVENTS_LOST)?)
            .map_err(map_error(maps::EVENTS_LOST))?;
        let lost: PerCpuArray<MapData, u64> =
            PerCpuArray::try_from(map).map_err(map_error(maps::EVENTS_LOST))?;
        lost.get(&0, 0)
            .map_err(map_error(maps::EVENTS_LOST))?
            .iter()
            .sum()
    };
    let counters = {
        let map =
            Map::from_map_data(open(pins, maps::COUNTERS)?).map_err(map_error(maps::COUNTERS))?;
        sum_counters(PerCpuHashMap::try_from(map).map_err(map_error(maps::COUNTERS))?)?
    };
    let links = pins
        .links()?
        .into_iter()
        .map(|(interface, hook, _): (String, Hook, _)| (interface, hook.name()))
        .collect();
    Ok(Inspection {
        state,
        maps: fills,
        links,
        counters,
        events_lost,
    })
}

fn open(pins: &Pins, name: &'static str) -> Result<MapData, DatapathError> {
    MapData::from_pin(pins.map_path(name)).map_err(map_error(name))
}
