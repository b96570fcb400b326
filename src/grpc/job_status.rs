use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::{Request, Response, Status};

use super::{convert, middleware::caller, render};
use crate::{
    error::CoreError,
    jobs::{runner::JobService, JobCursor},
    proto::v1::{self as pb, job_status_server::JobStatus},
};

pub struct JobStatusService {
    jobs: Arc<JobService>,
    /// Cancelled when the server shuts down: open watches end then.
    shutdown: CancellationToken,
}

impl JobStatusService {
    pub fn new(jobs: Arc<JobService>, shutdown: CancellationToken) -> Self {
        JobStatusService { jobs, shutdown }
    }
}

type JobStream = Pin<Box<dyn Stream<Item = Result<pb::Job, Status>> + Send>>;

#[tonic::async_trait]
impl JobStatus for JobStatusService {
    async fn start_job(&self, request: Request<pb::StartJobRequest>) -> Result<Response<pb::Job>, Status> {
        let created_by = caller(&request)?.subject().to_owned();
        let start = convert::start_job(request.into_inner()).map_err(CoreError::InvalidInput)?;
        let job = self
            .jobs
            .start(start.spec, &created_by, start.request_id.as_deref())
            .await?;
        Ok(Response::new(render::job(job)))
    }

    async fn get_job(&self, request: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        let id = convert::job_id(&request.into_inner().id).map_err(CoreError::InvalidInput)?;
        Ok(Response::new(render::job(self.jobs.get(id).await?)))
    }

    async fn list_jobs(&self, request: Request<pb::ListJobsRequest>) -> Result<Response<pb::ListJobsResponse>, Status> {
        let list = convert::list_jobs(request.into_inner()).map_err(CoreError::InvalidInput)?;
        let mut jobs = self.jobs.list(&list.filter, list.after, list.page_size + 1).await?;
        let next_page_token = if jobs.len() > list.page_size {
            jobs.truncate(list.page_size);
            jobs.last()
                .map(|last| {
                    convert::job_page_token::render(JobCursor {
                        created_at: last.created_at,
                        id: last.id,
                    })
                })
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListJobsResponse {
            jobs: jobs.into_iter().map(render::job).collect(),
            next_page_token,
        }))
    }

    async fn cancel_job(&self, request: Request<pb::CancelJobRequest>) -> Result<Response<pb::Job>, Status> {
        let id = convert::job_id(&request.into_inner().id).map_err(CoreError::InvalidInput)?;
        Ok(Response::new(render::job(self.jobs.cancel(id).await?)))
    }

    type WatchJobStream = JobStream;

    /// The stream is driven by the client's reads: one that leaves drops it,
    /// and with it the store subscription.
    async fn watch_job(&self, request: Request<pb::WatchJobRequest>) -> Result<Response<JobStream>, Status> {
        let id = convert::job_id(&request.into_inner().id).map_err(CoreError::InvalidInput)?;
        let changes = self.jobs.watch(id).await?;
        Ok(Response::new(Box::pin(UntilShutdown {
            changes: Box::pin(changes.map(|job| Ok(render::job(job)))),
            shutdown: Box::pin(self.shutdown.clone().cancelled_owned()),
            ended: false,
        })))
    }
}

/// A watch that ends with UNAVAILABLE when the server shuts down, so the
/// client watches again through another replica instead of holding this
/// one's shutdown open.
struct UntilShutdown {
    changes: JobStream,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    ended: bool,
}

impl Stream for UntilShutdown {
    type Item = Result<pb::Job, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if self.shutdown.as_mut().poll(cx).is_ready() {
            self.ended = true;
            return Poll::Ready(Some(Err(CoreError::Unavailable {
                what: "this replica",
                source: anyhow::anyhow!("shutting down: the client should watch again"),
            }
            .into())));
        }
        self.changes.as_mut().poll_next(cx)
    }
}
