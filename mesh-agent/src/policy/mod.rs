//! The policy language, version 1: a TOML file declaring identities (who),
//! services (what) and grants (who may reach what).
//!
//! [`parse`] checks a whole file and reports every problem in it, each with
//! its line and column; a policy with any problem is rejected whole.

mod address;
mod compile;
mod error;
mod model;
mod names;
mod ports;
mod rate;
mod read;
mod resolve;
mod show;
mod spiffe;

use std::{fs, path::Path};

pub use compile::{Capacities, CompileError, Compiled, compile};
pub use error::{LoadError, PolicyError, PolicyErrors};
pub use model::{Grant, Identity, Policy, Selector, Service, Sources, Target};
pub use ports::{PortRange, PortSet, PortSpec, PortSpecError};
pub use rate::{Per, Rate, RateError};
pub use show::PolicyView;
pub use spiffe::{SpiffeId, SpiffeIdError, TrustDomain, TrustDomainError};

use error::{Diagnostics, Problem};

/// Reads and checks the policy file at `path`; errors name it as written.
pub fn load(path: &Path) -> Result<Policy, LoadError> {
    let bytes = fs::read(path).map_err(|source| LoadError::Read {
        path: path.to_owned(),
        source,
    })?;
    let file = path.display().to_string();
    match str::from_utf8(&bytes) {
        Ok(text) => Ok(parse(&file, text)?),
        Err(error) => {
            // Placed after the part that is UTF-8.
            let valid = String::from_utf8_lossy(&bytes[..error.valid_up_to()]);
            let mut diag = Diagnostics::new(&valid);
            diag.report(valid.len()..valid.len(), Problem::NotUtf8);
            Err(diag.into_errors(&file).into())
        }
    }
}

/// Checks the policy `text`; `file` names it in errors.
pub fn parse(file: &str, text: &str) -> Result<Policy, PolicyErrors> {
    let mut diag = Diagnostics::new(text);
    let policy = read::read(text, &mut diag).and_then(|draft| resolve::resolve(draft, &mut diag));
    diag.finish(file)?;
    Ok(policy.expect("a policy is missing only if an error was reported"))
}
