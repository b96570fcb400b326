//! The scope each RPC needs, in one table. Health and reflection are open so
//! that probes and grpcurl work without a token.
use super::Scope;

/// How a method may be called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No token needed.
    Open,
    Requires(Scope),
}

/// What the gate needs to know about a method before the handler runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MethodPolicy {
    pub service: &'static str,
    pub method: &'static str,
    pub access: Access,
    /// The server streams its response: only the caller's deadline bounds it,
    /// and it is counted as `server_stream` in metrics.
    pub streaming: bool,
}

impl MethodPolicy {
    pub fn grpc_type(&self) -> &'static str {
        if self.streaming {
            "server_stream"
        } else {
            "unary"
        }
    }
}

const fn rpc(service: &'static str, method: &'static str, access: Access, streaming: bool) -> MethodPolicy {
    MethodPolicy {
        service,
        method,
        access,
        streaming,
    }
}

use Access::{Open, Requires};
use Scope::*;

const AUDIT_WRITE: &str = "datastorage.v1.AuditWrite";
const INCIDENT_QUERY: &str = "datastorage.v1.IncidentQuery";
const VECTOR_SEARCH: &str = "datastorage.v1.VectorSearch";
const JOB_STATUS: &str = "datastorage.v1.JobStatus";
const HEALTH: &str = "grpc.health.v1.Health";
const REFLECTION_V1: &str = "grpc.reflection.v1.ServerReflection";
const REFLECTION_V1ALPHA: &str = "grpc.reflection.v1alpha.ServerReflection";

pub const METHODS: &[MethodPolicy] = &[
    rpc(AUDIT_WRITE, "WriteAudit", Requires(AuditWrite), false),
    rpc(AUDIT_WRITE, "BatchWriteAudit", Requires(AuditWrite), false),
    rpc(AUDIT_WRITE, "PlaceLegalHold", Requires(AuditAdmin), false),
    rpc(AUDIT_WRITE, "ReleaseLegalHold", Requires(AuditAdmin), false),
    rpc(INCIDENT_QUERY, "ListIncidents", Requires(IncidentsRead), false),
    rpc(INCIDENT_QUERY, "GetIncident", Requires(IncidentsRead), false),
    rpc(INCIDENT_QUERY, "ListAuditEvents", Requires(IncidentsRead), false),
    rpc(INCIDENT_QUERY, "GetActionStats", Requires(IncidentsRead), false),
    rpc(INCIDENT_QUERY, "VerifyAuditChain", Requires(IncidentsRead), false),
    // Holds name correlation ids under legal review: admins only.
    rpc(INCIDENT_QUERY, "ListLegalHolds", Requires(AuditAdmin), false),
    rpc(INCIDENT_QUERY, "ExportAuditEvents", Requires(AuditExport), true),
    rpc(VECTOR_SEARCH, "SearchSimilar", Requires(SearchRead), false),
    rpc(JOB_STATUS, "StartJob", Requires(JobsAdmin), false),
    rpc(JOB_STATUS, "GetJob", Requires(JobsRead), false),
    rpc(JOB_STATUS, "ListJobs", Requires(JobsRead), false),
    rpc(JOB_STATUS, "CancelJob", Requires(JobsAdmin), false),
    rpc(JOB_STATUS, "WatchJob", Requires(JobsRead), true),
    rpc(HEALTH, "Check", Open, false),
    rpc(HEALTH, "Watch", Open, true),
    rpc(REFLECTION_V1, "ServerReflectionInfo", Open, true),
    rpc(REFLECTION_V1ALPHA, "ServerReflectionInfo", Open, true),
];

/// The policy of `/package.Service/Method`; `None` for a method not in the table.
pub fn for_path(path: &str) -> Option<&'static MethodPolicy> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    METHODS.iter().find(|m| m.service == service && m.method == method)
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    /// Every RPC the contract defines has a row: a new RPC without one would
    /// be refused, and this names it first.
    #[test]
    fn every_served_method_has_a_policy() {
        let descriptors =
            prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET).expect("descriptor set decodes");
        let mut seen = 0;
        for file in descriptors.file.iter().filter(|f| f.package() == "datastorage.v1") {
            for service in &file.service {
                for method in &service.method {
                    let path = format!("/datastorage.v1.{}/{}", service.name(), method.name());
                    let policy = for_path(&path).unwrap_or_else(|| panic!("{path} has no policy"));
                    assert_eq!(policy.streaming, method.server_streaming(), "{path}");
                    assert!(matches!(policy.access, Access::Requires(_)), "{path} must need a scope");
                    seen += 1;
                }
            }
        }
        assert_eq!(
            seen,
            METHODS.iter().filter(|m| m.service.starts_with("datastorage.")).count()
        );
    }

    #[test]
    fn probes_and_reflection_are_open_and_unknown_paths_have_no_policy() {
        assert_eq!(for_path("/grpc.health.v1.Health/Check").unwrap().access, Access::Open);
        assert_eq!(
            for_path("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
                .unwrap()
                .access,
            Access::Open
        );
        assert!(for_path("/datastorage.v1.AuditWrite/DropEverything").is_none());
        assert!(for_path("not a path").is_none());
    }
}
