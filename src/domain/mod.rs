//! Domain types: what a request means once it has passed every rule of the
//! contract. They are built only by parsing (`grpc::convert`), so the storage
//! core never sees protobuf types or unchecked strings.
mod audit_event;
mod incident;
mod integrity;
mod search;
mod violations;

pub use audit_event::*;
pub use incident::*;
pub use integrity::*;
pub use search::*;
pub use violations::{FieldViolation, Violations};
