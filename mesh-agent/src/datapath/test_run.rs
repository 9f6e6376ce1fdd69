//! Running frames through the loaded programs with BPF_PROG_TEST_RUN, and
//! reading back what the pipeline decided.

use aya::{
    maps::PerCpuArray,
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use mesh_common::{Reason, Verdict, config, maps, programs};
use nix::{
    sched::{CpuSet, sched_getaffinity, sched_setaffinity},
    unistd::Pid,
};

use super::{Datapath, DatapathError, map_error, program_error};

/// The outcome of one test run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TestVerdict {
    /// What the program returned: pass or drop.
    pub pass: bool,
    pub reason: Reason,
    pub identity: u32,
    pub service: u32,
}

/// Which entry point a frame is run through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    Xdp,
    Tc,
}

const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;

impl Datapath {
    /// Makes the programs read `boot_ns` as the time instead of the clock,
    /// or the real clock again with 0. Only for a private copy of the maps.
    pub fn set_clock(&mut self, boot_ns: u64) -> Result<(), DatapathError> {
        self.set_config(config::CLOCK_OVERRIDE, boot_ns)
    }

    /// Runs one Ethernet frame through an entry point.
    pub fn test_run(&mut self, entry: Entry, frame: &[u8]) -> Result<TestVerdict, DatapathError> {
        // The pipeline leaves its verdict in a per-CPU slot: stay on one CPU
        // from the run until the slot is read.
        let cpu = on_current_cpu()?;
        let result = self.run_on_this_cpu(entry, frame, cpu.cpu);
        cpu.restore()?;
        result
    }

    fn run_on_this_cpu(
        &mut self,
        entry: Entry,
        frame: &[u8],
        cpu: usize,
    ) -> Result<TestVerdict, DatapathError> {
        let options = TestRunOptions {
            data_in: Some(frame),
            ..Default::default()
        };
        let pass = match entry {
            Entry::Xdp => {
                let program: &Xdp = self.program(programs::XDP)?;
                program
                    .test_run(options)
                    .map_err(program_error(programs::XDP))?
                    .return_value
                    == XDP_PASS
            }
            Entry::Tc => {
                let program: &SchedClassifier = self.program(programs::TC)?;
                program
                    .test_run(options)
                    .map_err(program_error(programs::TC))?
                    .return_value
                    == TC_ACT_OK
            }
        };
        let map = self
            .ebpf
            .map(maps::LAST_VERDICT)
            .ok_or(DatapathError::MissingMap(maps::LAST_VERDICT))?;
        let slots: PerCpuArray<_, Verdict> =
            PerCpuArray::try_from(map).map_err(map_error(maps::LAST_VERDICT))?;
        let values = slots.get(&0, 0).map_err(map_error(maps::LAST_VERDICT))?;
        let verdict = values[cpu];
        Ok(TestVerdict {
            pass,
            reason: Reason::from_u8(verdict.reason).unwrap_or(Reason::Malformed),
            identity: verdict.identity,
            service: verdict.service,
        })
    }

    fn program<'a, P>(&'a self, name: &'static str) -> Result<&'a P, DatapathError>
    where
        &'a P: TryFrom<&'a aya::programs::Program, Error = aya::programs::ProgramError>,
    {
        self.ebpf
            .program(name)
            .ok_or(DatapathError::MissingProgram(name))?
            .try_into()
            .map_err(program_error(name))
    }
}

/// The calling thread pinned to the CPU it runs on, until restored.
struct Pinned {
    cpu: usize,
    previous: CpuSet,
}

fn on_current_cpu() -> Result<Pinned, DatapathError> {
    let previous = sched_getaffinity(Pid::from_raw(0)).map_err(DatapathError::Affinity)?;
    // SAFETY: no arguments, no memory.
    let cpu = unsafe { libc::sched_getcpu() };
    let cpu = usize::try_from(cpu).map_err(|_| DatapathError::Affinity(nix::Error::last()))?;
    let mut only = CpuSet::new();
    only.set(cpu).map_err(DatapathError::Affinity)?;
    sched_setaffinity(Pid::from_raw(0), &only).map_err(DatapathError::Affinity)?;
    Ok(Pinned { cpu, previous })
}

impl Pinned {
    fn restore(self) -> Result<(), DatapathError> {
        sched_setaffinity(Pid::from_raw(0), &self.previous).map_err(DatapathError::Affinity)
    }
}
