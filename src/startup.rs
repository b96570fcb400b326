//! Builds the whole application from settings and returns a handle with the
//! bound ports, so tests can start it on port 0 exactly as production does.
use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::{server::TcpIncoming, Identity, ServerTlsConfig};
use tonic_health::ServingStatus;

use crate::{
    audit::AuditService,
    auth::{self, Authenticator},
    config::Settings,
    embedding::{
        self, cache::SharedEmbeddingCache, local::LocalMiniLm, redis_cache::RedisEmbeddingCache, Embedder,
        EmbeddingProvider,
    },
    grpc::{
        audit_write::AuditWriteService,
        incident_query::IncidentQueryService,
        job_status::JobStatusService,
        middleware::{Gate, Observe},
        vector_search::VectorSearchService,
    },
    health::{self, Readiness},
    integrity::{chain::ChainHasher, IntegrityService},
    jobs::{runner::JobService, JobStore, MemoryJobStore, RedisJobStore},
    models::{Models, RunnableModel},
    outage::OutageQueue,
    pagination::PageTokens,
    proto::{
        self,
        v1::{
            audit_write_server::AuditWriteServer, incident_query_server::IncidentQueryServer,
            job_status_server::JobStatusServer, vector_search_server::VectorSearchServer,
        },
    },
    query::IncidentQueries,
    ratelimit::{self, RateLimiter},
    search::SearchService,
    storage::{self, Storage},
};

pub struct Application {
    grpc_listener: TcpListener,
    http_listener: TcpListener,
    settings: Settings,
    storage: Storage,
    audit: Arc<AuditService>,
    queries: Arc<IncidentQueries>,
    integrity: Arc<IntegrityService>,
    search: Arc<SearchService>,
    jobs: Arc<JobService>,
    outage_queue: Option<Arc<OutageQueue>>,
    authenticator: Arc<dyn Authenticator>,
    rate_limiter: Option<Arc<dyn RateLimiter>>,
}

impl Application {
    /// Loads the configured embedding provider, then builds.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let provider = embedding::provider_from_settings(&settings.embedding)?;
        Self::build_with_provider(settings, provider).await
    }

    /// Builds with a given provider (tests share one loaded model across servers).
    pub async fn build_with_provider(settings: Settings, provider: Arc<dyn EmbeddingProvider>) -> anyhow::Result<Self> {
        crate::metrics::prometheus();
        let authenticator = auth::authenticator_from_settings(&settings.auth).context("configuring authentication")?;
        let rate_limiter = ratelimit::from_settings(&settings.rate_limit, &settings.redis)
            .await
            .context("configuring rate limits")?;
        let storage = Storage::new(storage::pool(&settings.database, &settings.search)?)
            .with_read_replica(storage::replica_pool(&settings.database, &settings.search)?)
            .with_chain_hasher(ChainHasher::new(&settings.integrity))
            .with_deferred_indexing(settings.vector_index.deferred)
            .with_hnsw_graph(settings.vector_index.hnsw_m, settings.vector_index.hnsw_ef_construction);
        if settings.database.migrate_on_start {
            storage::MIGRATOR
                .run(storage.pool())
                .await
                .context("running migrations")?;
        }
        let shared_cache: Option<Arc<dyn SharedEmbeddingCache>> = match &settings.redis.url {
            Some(_) => Some(Arc::new(
                RedisEmbeddingCache::connect(&settings.redis)
                    .await
                    .context("configuring the Redis embedding cache")?,
            )),
            None => None,
        };
        let runnable = |provider: Arc<dyn EmbeddingProvider>, kind: &str| {
            let (storage, settings, shared_cache) = (&storage, &settings, shared_cache.clone());
            let kind = kind.to_owned();
            async move {
                let handle = storage
                    .register_model(provider.model_name(), provider.dimensions(), &kind)
                    .await
                    .with_context(|| format!("registering the embedding model {}", provider.model_name()))?;
                let embedder = Embedder::new(provider, &settings.embedding).with_shared_cache(shared_cache);
                anyhow::Ok(RunnableModel {
                    handle,
                    embedder: Arc::new(embedder),
                })
            }
        };
        let provider_kind = format!("{:?}", settings.embedding.provider).to_lowercase();
        let default_model = runnable(provider, &provider_kind).await?;
        let mut extra_models = Vec::new();
        for extra in &settings.embedding.extra_models {
            let provider: Arc<dyn EmbeddingProvider> = Arc::new(
                LocalMiniLm::load(&extra.model_dir, &extra.name)
                    .with_context(|| format!("loading the embedding model {}", extra.name))?,
            );
            extra_models.push(runnable(provider, "local").await?);
        }
        let models = Arc::new(Models::new(default_model, extra_models));
        if let Some(active) = storage.active_model().await? {
            models.follow_active(&active);
        }
        let search = Arc::new(SearchService::new(
            storage.clone(),
            models.clone(),
            settings.search.clone(),
        ));
        let outage_queue = if settings.outage_queue.enabled {
            Some(Arc::new(
                OutageQueue::connect(&settings.redis, &settings.outage_queue)
                    .await
                    .context("configuring the outage queue")?,
            ))
        } else {
            None
        };
        let audit = Arc::new(AuditService::new(
            storage.clone(),
            models.clone(),
            settings.embedding.failure_policy,
            outage_queue.clone(),
        ));
        let job_store: Arc<dyn JobStore> = match &settings.redis.url {
            Some(_) => Arc::new(
                RedisJobStore::connect(&settings.redis)
                    .await
                    .context("configuring the Redis job store")?,
            ),
            None => Arc::new(MemoryJobStore::new()),
        };
        let jobs = JobService::new(
            job_store,
            storage.clone(),
            models,
            settings.jobs.clone(),
            settings.retention.clone(),
        );

        let tokens = PageTokens::new(settings.query.page_token_key.as_ref(), settings.page_token_ttl())?;
        let integrity = Arc::new(
            IntegrityService::new(storage.clone(), &settings.integrity, tokens.clone())
                .context("configuring audit integrity")?,
        );
        let queries = Arc::new(IncidentQueries::new(storage.clone(), tokens));

        let grpc_listener = TcpListener::bind(SocketAddr::new(settings.grpc.host, settings.grpc.port))
            .await
            .with_context(|| format!("binding the gRPC port {}", settings.grpc.port))?;
        let http_listener = TcpListener::bind(SocketAddr::new(settings.http.host, settings.http.port))
            .await
            .with_context(|| format!("binding the HTTP port {}", settings.http.port))?;
        Ok(Application {
            grpc_listener,
            http_listener,
            settings,
            storage,
            audit,
            queries,
            integrity,
            search,
            jobs,
            outage_queue,
            authenticator,
            rate_limiter,
        })
    }

    pub fn port(&self) -> u16 {
        self.grpc_listener.local_addr().expect("bound listener").port()
    }

    pub fn http_port(&self) -> u16 {
        self.http_listener.local_addr().expect("bound listener").port()
    }

    /// Serves until `shutdown` resolves, then stops in the order Kubernetes
    /// needs: health NOT_SERVING first while calls are still served for
    /// `shutdown.drain_delay_ms` (endpoints update, traffic moves away), then
    /// the listener closes, watch streams end, and in-flight calls get
    /// `shutdown.grace_period_ms` before whatever is left is dropped (a
    /// client holding a stream open must not keep the process alive).
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let (reporter, health_service) = tonic_health::server::health_reporter();
        health::set_all(&reporter, ServingStatus::NotServing).await;
        let readiness = Readiness::default();
        let mut monitor = tokio::spawn(health::monitor(
            self.storage.clone(),
            self.outage_queue.clone(),
            reporter.clone(),
            readiness.clone(),
            self.settings.health_check_interval(),
        ));
        let http = tokio::spawn(health::serve_http(self.http_listener, readiness.clone()));
        let pruning = tokio::spawn(prune_sort_history(self.storage.clone(), self.settings.page_token_ttl()));
        let sampling = tokio::spawn(crate::metrics::sample_state(
            self.storage.clone(),
            self.jobs.clone(),
            Duration::from_secs(5),
        ));
        let replica_monitor = tokio::spawn(
            self.storage
                .clone()
                .monitor_replica(self.settings.health_check_interval()),
        );
        let supervisor = tokio::spawn(self.jobs.clone().supervise());
        // Runs even with deferred indexing off: it drains what an earlier
        // configuration left in the fresh segment.
        let indexer_workers = if self.settings.vector_index.indexer {
            self.settings.vector_index.workers
        } else {
            0
        };
        let indexers: Vec<_> = (0..indexer_workers)
            .map(|_| {
                tokio::spawn(crate::indexer::run(
                    self.storage.clone(),
                    self.settings.vector_index.clone(),
                ))
            })
            .collect();
        let replay = self
            .outage_queue
            .clone()
            .map(|queue| tokio::spawn(queue.replay(self.audit.clone())));

        let reflection_v1 = reflection_builder().build_v1()?;
        let reflection_v1alpha = reflection_builder().build_v1alpha()?;
        let streams_end = CancellationToken::new();
        let max = self.settings.grpc.max_message_bytes;
        let audit_write = AuditWriteServer::new(AuditWriteService::new(self.audit, self.integrity.clone()))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
        let incident_query = IncidentQueryServer::new(IncidentQueryService::new(self.queries, self.integrity))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
        let vector_search = VectorSearchServer::new(VectorSearchService::new(self.search))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
        let job_status = JobStatusServer::new(JobStatusService::new(self.jobs, streams_end.clone()))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);

        let grpc = &self.settings.grpc;
        let gate = Gate::new(
            self.authenticator,
            self.rate_limiter,
            grpc.max_concurrent_requests,
            Duration::from_millis(grpc.default_timeout_ms),
        );
        let mut server = tonic::transport::Server::builder();
        if let Some(tls) = &grpc.tls {
            let identity = Identity::from_pem(
                std::fs::read(&tls.cert_file).context("reading grpc.tls.cert_file")?,
                std::fs::read(&tls.key_file).context("reading grpc.tls.key_file")?,
            );
            server = server
                .tls_config(ServerTlsConfig::new().identity(identity))
                .context("configuring TLS")?;
        }
        let address = self.grpc_listener.local_addr()?;
        tracing::info!(%address, tls = grpc.tls.is_some(), "gRPC listening");
        // Without TCP_NODELAY, Nagle's algorithm holds small responses back
        // until the client's delayed ACK: tens of milliseconds per call.
        let incoming = TcpIncoming::from(self.grpc_listener).with_nodelay(Some(true));
        let stop_accepting = CancellationToken::new();
        let serving = server
            .layer(tower::ServiceBuilder::new().layer(Observe).layer(gate).into_inner())
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(audit_write)
            .add_service(incident_query)
            .add_service(vector_search)
            .add_service(job_status)
            .serve_with_incoming_shutdown(incoming, stop_accepting.clone().cancelled_owned());
        tokio::pin!(serving);

        let served = tokio::select! {
            served = &mut serving => Some(served),
            () = shutdown => None,
        };
        let result = match served {
            Some(served) => served.context("gRPC server failed"),
            None => {
                let stopping = &self.settings.shutdown;
                readiness.shut_down();
                monitor.abort();
                // Wait until it has stopped: one mid-update could set SERVING after this.
                let _ = (&mut monitor).await;
                health::set_all(&reporter, ServingStatus::NotServing).await;
                let drain_delay = Duration::from_millis(stopping.drain_delay_ms);
                tracing::info!(
                    ?drain_delay,
                    "shutting down: NOT_SERVING; still serving while traffic moves away"
                );
                let drained = tokio::select! {
                    served = &mut serving => Some(served),
                    () = tokio::time::sleep(drain_delay) => None,
                };
                match drained {
                    Some(served) => served.context("gRPC server failed"),
                    None => {
                        stop_accepting.cancel();
                        streams_end.cancel();
                        let grace = Duration::from_millis(stopping.grace_period_ms);
                        match tokio::time::timeout(grace, &mut serving).await {
                            Ok(served) => served.context("gRPC server failed"),
                            Err(_) => {
                                tracing::warn!(?grace, "calls still open after the grace period are dropped");
                                Ok(())
                            }
                        }
                    }
                }
            }
        };
        monitor.abort();
        http.abort();
        pruning.abort();
        sampling.abort();
        replica_monitor.abort();
        supervisor.abort();
        for indexer in indexers {
            indexer.abort();
        }
        if let Some(replay) = replay {
            replay.abort();
        }
        if tokio::time::timeout(Duration::from_secs(5), self.storage.pool().close())
            .await
            .is_err()
        {
            tracing::warn!("closing the database pool timed out");
        }
        tracing::info!("stopped");
        result
    }
}

/// Listings keep the sort keys incidents had when their first page was
/// served, for as long as page tokens live; older history is dropped.
async fn prune_sort_history(storage: Storage, token_ttl: std::time::Duration) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(300));
    loop {
        every.tick().await;
        match storage.prune_incident_sort_history(token_ttl).await {
            Ok(0) => {}
            Ok(deleted) => tracing::debug!(deleted, "pruned incident sort history"),
            Err(error) => tracing::warn!(%error, "pruning incident sort history failed"),
        }
    }
}

/// Reflection serves the contract with its google/protobuf and google/rpc
/// imports and grpc.health, so grpcurl resolves every type with no proto files.
fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// SIGTERM (Kubernetes) or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        if let Ok(mut signal) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            signal.recv().await;
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}
