use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{convert, render};
use crate::{
    error::CoreError,
    proto::v1::{self as pb, vector_search_server::VectorSearch},
    search::SearchService,
};

pub struct VectorSearchService {
    search: Arc<SearchService>,
}

impl VectorSearchService {
    pub fn new(search: Arc<SearchService>) -> Self {
        VectorSearchService { search }
    }
}

#[tonic::async_trait]
impl VectorSearch for VectorSearchService {
    async fn search_similar(
        &self,
        request: Request<pb::SearchSimilarRequest>,
    ) -> Result<Response<pb::SearchSimilarResponse>, Status> {
        let request = convert::search_request(request.into_inner()).map_err(CoreError::InvalidInput)?;
        let (model, hits) = self.search.search(request).await?;
        Ok(Response::new(pb::SearchSimilarResponse {
            hits: hits.into_iter().map(render::search_hit).collect(),
            model,
        }))
    }
}
