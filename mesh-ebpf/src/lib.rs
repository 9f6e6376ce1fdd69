#![no_std]
// The programs are in the `mesh` binary target; this library exists so that
// mesh-agent can name the crate as a build dependency.
