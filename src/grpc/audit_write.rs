use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{
    convert::{self, ValidationContext},
    middleware::{caller, caller_trace_id},
    render,
};
use crate::{
    audit::AuditService,
    domain::{EmbeddingState, Violations, WriteReceipt},
    error::CoreError,
    integrity::IntegrityService,
    proto::v1::{self as pb, audit_write_server::AuditWrite},
};

/// Most requests one BatchWriteAudit may carry.
pub const MAX_BATCH: usize = 1000;

pub struct AuditWriteService {
    audit: Arc<AuditService>,
    integrity: Arc<IntegrityService>,
}

impl AuditWriteService {
    pub fn new(audit: Arc<AuditService>, integrity: Arc<IntegrityService>) -> Self {
        AuditWriteService { audit, integrity }
    }

    fn context(&self) -> ValidationContext {
        ValidationContext {
            now: chrono::Utc::now(),
            embedding_dimensions: self.audit.embedding_dimensions(),
        }
    }
}

fn response(receipt: WriteReceipt) -> pb::WriteAuditResponse {
    let (incident_id, write_state) = if receipt.queued {
        (String::new(), pb::WriteState::Queued)
    } else {
        (receipt.incident_id.to_string(), pb::WriteState::Committed)
    };
    pb::WriteAuditResponse {
        event_id: receipt.event_id.to_string(),
        incident_id,
        duplicate: receipt.duplicate,
        embedding_state: embedding_state(receipt.embedding_state) as i32,
        write_state: write_state as i32,
    }
}

pub fn embedding_state(state: EmbeddingState) -> pb::EmbeddingState {
    match state {
        EmbeddingState::NotEmbedded => pb::EmbeddingState::Unspecified,
        EmbeddingState::Generated => pb::EmbeddingState::Generated,
        EmbeddingState::Cached => pb::EmbeddingState::Cached,
        EmbeddingState::Provided => pb::EmbeddingState::Provided,
        EmbeddingState::Deferred => pb::EmbeddingState::Deferred,
    }
}

#[tonic::async_trait]
impl AuditWrite for AuditWriteService {
    async fn write_audit(
        &self,
        request: Request<pb::WriteAuditRequest>,
    ) -> Result<Response<pb::WriteAuditResponse>, Status> {
        let source = caller(&request)?.subject().to_owned();
        let trace_id = caller_trace_id(&request);
        let write = tracing::info_span!("validate")
            .in_scope(|| convert::write_request("", request.into_inner(), &self.context()))
            .map_err(CoreError::InvalidInput)?;
        tracing::Span::current().record("correlation_id", write.event.correlation_id.as_str());
        let receipts = self
            .audit
            .write(&source, trace_id, vec![write], |_| "event".to_owned())
            .await?;
        let receipt = receipts.into_iter().next().expect("one receipt per write");
        Ok(Response::new(response(receipt)))
    }

    async fn batch_write_audit(
        &self,
        request: Request<pb::BatchWriteAuditRequest>,
    ) -> Result<Response<pb::BatchWriteAuditResponse>, Status> {
        let source = caller(&request)?.subject().to_owned();
        let trace_id = caller_trace_id(&request);
        let pb::BatchWriteAuditRequest { requests } = request.into_inner();
        if requests.is_empty() || requests.len() > MAX_BATCH {
            return Err(CoreError::InvalidInput(Violations::single(
                "requests",
                format!("must hold 1..={MAX_BATCH} requests, got {}", requests.len()),
            ))
            .into());
        }
        let ctx = self.context();
        let writes = tracing::info_span!("validate", requests = requests.len()).in_scope(|| {
            let mut violations = Violations::new();
            let mut writes = Vec::with_capacity(requests.len());
            for (index, request) in requests.into_iter().enumerate() {
                match convert::write_request(&format!("requests[{index}]"), request, &ctx) {
                    Ok(write) => writes.push(write),
                    Err(v) => v
                        .iter()
                        .for_each(|f| violations.add(f.field.clone(), f.description.clone())),
                }
            }
            violations.into_result(|| writes).map_err(CoreError::InvalidInput)
        })?;
        let receipts = self
            .audit
            .write(&source, trace_id, writes, |i| format!("requests[{i}].event"))
            .await?;
        Ok(Response::new(pb::BatchWriteAuditResponse {
            responses: receipts.into_iter().map(response).collect(),
        }))
    }

    async fn place_legal_hold(
        &self,
        request: Request<pb::PlaceLegalHoldRequest>,
    ) -> Result<Response<pb::LegalHold>, Status> {
        let placed_by = caller(&request)?.subject().to_owned();
        let pb::PlaceLegalHoldRequest { correlation_id, reason } = request.into_inner();
        let hold = convert::hold_request(correlation_id, reason).map_err(CoreError::InvalidInput)?;
        tracing::Span::current().record("correlation_id", hold.correlation_id.as_str());
        let placed = self
            .integrity
            .place_hold(&hold.correlation_id, &hold.reason, &placed_by)
            .await?;
        Ok(Response::new(render::legal_hold(placed)))
    }

    async fn release_legal_hold(
        &self,
        request: Request<pb::ReleaseLegalHoldRequest>,
    ) -> Result<Response<pb::LegalHold>, Status> {
        let released_by = caller(&request)?.subject().to_owned();
        let pb::ReleaseLegalHoldRequest { correlation_id, reason } = request.into_inner();
        let hold = convert::hold_request(correlation_id, reason).map_err(CoreError::InvalidInput)?;
        tracing::Span::current().record("correlation_id", hold.correlation_id.as_str());
        let released = self
            .integrity
            .release_hold(&hold.correlation_id, &hold.reason, &released_by)
            .await?;
        Ok(Response::new(render::legal_hold(released)))
    }
}
