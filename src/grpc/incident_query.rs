use std::sync::Arc;

use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use super::{convert, render};
use crate::{
    error::CoreError,
    integrity::IntegrityService,
    proto::v1::{self as pb, incident_query_server::IncidentQuery},
    query::IncidentQueries,
};

pub struct IncidentQueryService {
    queries: Arc<IncidentQueries>,
    integrity: Arc<IntegrityService>,
}

impl IncidentQueryService {
    pub fn new(queries: Arc<IncidentQueries>, integrity: Arc<IntegrityService>) -> Self {
        IncidentQueryService { queries, integrity }
    }
}

#[tonic::async_trait]
impl IncidentQuery for IncidentQueryService {
    async fn list_incidents(
        &self,
        request: Request<pb::ListIncidentsRequest>,
    ) -> Result<Response<pb::ListIncidentsResponse>, Status> {
        let list = convert::list_incidents(request.into_inner()).map_err(CoreError::InvalidInput)?;
        let page = self
            .queries
            .list_incidents(&list.filter, list.order, list.page_size, &list.page_token)
            .await?;
        Ok(Response::new(pb::ListIncidentsResponse {
            incidents: page.items.into_iter().map(render::incident).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    async fn get_incident(&self, request: Request<pb::GetIncidentRequest>) -> Result<Response<pb::Incident>, Status> {
        let key = convert::incident_key(request.into_inner()).map_err(CoreError::InvalidInput)?;
        let incident = self.queries.get_incident(&key).await?;
        Ok(Response::new(render::incident(incident)))
    }

    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        let list = convert::list_audit_events(request.into_inner()).map_err(CoreError::InvalidInput)?;
        let page = self
            .queries
            .list_audit_events(&list.query, list.page_size, &list.page_token)
            .await?;
        Ok(Response::new(pb::ListAuditEventsResponse {
            events: page.items.into_iter().map(render::stored_event).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    async fn get_action_stats(
        &self,
        request: Request<pb::GetActionStatsRequest>,
    ) -> Result<Response<pb::GetActionStatsResponse>, Status> {
        let filter = convert::action_stats_filter(request.into_inner()).map_err(CoreError::InvalidInput)?;
        let stats = self.queries.action_stats(&filter).await?;
        Ok(Response::new(pb::GetActionStatsResponse {
            stats: stats.into_iter().map(render::action_stats).collect(),
        }))
    }

    async fn verify_audit_chain(
        &self,
        request: Request<pb::VerifyAuditChainRequest>,
    ) -> Result<Response<pb::VerifyAuditChainResponse>, Status> {
        let correlation_id = convert::verify_chain_request(request.into_inner()).map_err(CoreError::InvalidInput)?;
        let report = self.integrity.verify_chain(&correlation_id).await?;
        Ok(Response::new(render::chain_report(report)))
    }

    async fn list_legal_holds(
        &self,
        request: Request<pb::ListLegalHoldsRequest>,
    ) -> Result<Response<pb::ListLegalHoldsResponse>, Status> {
        let pb::ListLegalHoldsRequest { page_size, page_token } = request.into_inner();
        let page_size = convert::list_holds_page_size(page_size).map_err(CoreError::InvalidInput)?;
        let page = self.integrity.list_holds(page_size, &page_token).await?;
        Ok(Response::new(pb::ListLegalHoldsResponse {
            holds: page.items.into_iter().map(render::legal_hold).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    type ExportAuditEventsStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ExportAuditEventsResponse, Status>> + Send>>;

    async fn export_audit_events(
        &self,
        request: Request<pb::ExportAuditEventsRequest>,
    ) -> Result<Response<Self::ExportAuditEventsStream>, Status> {
        let export = convert::export_request(request.into_inner()).map_err(CoreError::InvalidInput)?;
        let items = self.integrity.export(export).await?;
        let stream = tokio_stream::wrappers::ReceiverStream::new(items)
            .map(|item| item.map(render::export_item).map_err(Status::from));
        Ok(Response::new(Box::pin(stream)))
    }
}
