//! llmapi-launch: starts serving processes.
//!
//! Resolves the configuration (`llmapi_common::args`), finds the model (or writes the built-in
//! demo model), reads where this process sits in a Slurm or MPI job (`placement`), and runs
//! the serve command; obtains the job secret that authenticates the job's internal calls
//! (`secret`, `munge`); writes built-in checkpoints. Not for: HTTP handling (the router's) or
//! tensors (the worker's).

pub mod cluster;
pub mod group;
pub mod kernels;
pub mod make_model;
pub mod munge;
pub mod placement;
pub mod register;
pub mod restart;
pub mod secret;
pub mod serve;
