//! The mesh node agent as a library: the binary and the integration tests
//! drive the same code.

pub mod agent;
pub mod capture;
pub mod control;
pub mod datapath;
pub mod exec;
pub mod identity;
pub mod metrics;
pub mod node;
pub mod policy;
pub mod reference;
pub mod replay;
mod state_file;
