//! The command-line client: subcommands that talk gRPC to a running server.
//!
//! Nothing here runs inside the server. `main.rs` hands a parsed subcommand to
//! its `run`, which prints the outcome and returns the exit status; failures
//! are one line on stderr (`error: UNAVAILABLE: …`), never a debug dump.
//!
//! - [`jobs`]: `datastorage jobs start|get|list|cancel|watch`.
//! - [`audit`]: `datastorage audit export|verify-export|keygen`.
//! - `client`: the connection (`--addr`, `--token`) and the error a command reports.
//! - `render`: how a job looks, as a table for people and as JSON for machines.
pub mod audit;
mod client;
pub mod jobs;
mod render;
