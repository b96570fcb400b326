//! Transport: gRPC services. Each handler parses protobuf into domain types
//! (`convert`), calls the core, and renders the result (`render`); nothing
//! else lives here.
pub mod audit_write;
pub mod codec;
pub mod convert;
#[cfg(test)]
mod fuzz;
pub mod incident_query;
pub mod job_status;
pub mod middleware;
pub mod render;
pub mod status;
pub mod vector_search;
