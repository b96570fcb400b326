//! Layered configuration: defaults, then an optional TOML file, then
//! `DATASTORAGE_*` environment variables with `__` between levels
//! (`DATASTORAGE_DATABASE__URL`). Validated once at start-up.
use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, time::Duration};

use figment::{
    providers::{Env, Format, Serialized, Toml},
    Figment,
};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use crate::embedding::openai::OpenAiSettings;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub grpc: GrpcSettings,
    pub http: HttpSettings,
    pub database: DatabaseSettings,
    pub embedding: EmbeddingSettings,
    pub query: QuerySettings,
    pub search: SearchSettings,
    pub vector_index: VectorIndexSettings,
    pub redis: RedisSettings,
    pub jobs: JobSettings,
    pub integrity: IntegritySettings,
    pub retention: RetentionSettings,
    pub outage_queue: OutageQueueSettings,
    pub auth: AuthSettings,
    pub rate_limit: RateLimitSettings,
    pub shutdown: ShutdownSettings,
    pub log: LogSettings,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcSettings {
    pub host: IpAddr,
    /// 0 binds an ephemeral port (tests).
    pub port: u16,
    /// Largest request or response message. A 1000-event batch of maximal events
    /// stays below the default; larger is refused with RESOURCE_EXHAUSTED.
    pub max_message_bytes: usize,
    /// Unary calls without a shorter `grpc-timeout` of their own end with
    /// DEADLINE_EXCEEDED after this long. Streams (WatchJob, export) are bound
    /// by the caller's deadline only.
    pub default_timeout_ms: u64,
    /// Calls in flight at once; more are shed with UNAVAILABLE at once rather
    /// than queued, so a saturated replica fails fast and clients retry elsewhere.
    pub max_concurrent_requests: usize,
    /// Serve gRPC over TLS. Kubernetes' native gRPC probes cannot speak TLS:
    /// probe the HTTP `/readyz` then.
    pub tls: Option<TlsSettings>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

/// Who may call what. Tokens are JWTs in `authorization: Bearer …`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// Serve without authentication: every caller is `anonymous` with every
    /// scope. For a developer's machine only; the server refuses to start
    /// with no key source unless this is set.
    pub disabled: bool,
    /// Required `iss` claim (for Kubernetes service-account tokens, the
    /// cluster's issuer, e.g. `https://kubernetes.default.svc.cluster.local`).
    pub issuer: String,
    /// Accepted `aud` values; a token must name at least one.
    pub audiences: Vec<String>,
    /// Clock skew tolerated on `exp` and `nbf`.
    pub leeway_secs: u64,
    /// Shared secret for HS256 tokens (at least 32 bytes).
    #[serde(serialize_with = "serialize_optional_secret")]
    pub hs256_secret: Option<SecretString>,
    /// Public keys for asymmetric tokens, each pinned to one algorithm.
    pub public_keys: Vec<PublicKeySettings>,
    /// JWKS document of the issuer (Kubernetes: `<issuer>/openid/v1/jwks`).
    pub jwks_url: Option<String>,
    /// PEM CA bundle that signs the JWKS server's certificate, when it is not
    /// publicly trusted (the Kubernetes API server's CA).
    pub jwks_ca_file: Option<PathBuf>,
    /// A bearer token sent with the JWKS request, read anew for each fetch
    /// (Kubernetes: the pod's projected service-account token, which rotates).
    pub jwks_bearer_token_file: Option<PathBuf>,
    /// How long fetched JWKS keys are used before they are fetched again.
    pub jwks_refresh_secs: u64,
    /// A token with an unknown `kid` fetches the JWKS again, at most this often,
    /// so forged kids cannot make the server hammer the issuer.
    pub jwks_min_refresh_secs: u64,
    /// Scopes granted to a subject whatever its token's `scope` claim says
    /// (service-account tokens carry none), e.g.
    /// `"system:serviceaccount:kubernaut-system:gateway-sa" = ["audit:write"]`.
    pub subject_scopes: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PublicKeySettings {
    /// Matched against the token header's `kid`; a key without one serves
    /// tokens without a `kid`.
    pub kid: Option<String>,
    /// The only algorithm this key verifies: RS256, RS384, RS512, PS256,
    /// PS384, PS512, ES256 or ES384.
    pub algorithm: String,
    pub pem_file: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSettings {
    pub enabled: bool,
    /// Sustained calls per second per caller, for scopes without their own rate.
    pub requests_per_second: u32,
    /// Calls a caller may make at once after being idle.
    pub burst: u32,
    /// Per-scope rates (`"search:read" = { requests_per_second = 20, burst = 40 }`);
    /// a call counts against the scope it needs.
    pub scopes: BTreeMap<String, RateSettings>,
    /// Count calls in Redis so the limit holds across replicas (needs
    /// `redis.url`); while Redis is unreachable each replica limits alone.
    pub shared: bool,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateSettings {
    pub requests_per_second: u32,
    pub burst: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownSettings {
    /// After SIGTERM, health reports NOT_SERVING but calls are still served
    /// this long: about one readiness-probe period, so Kubernetes stops
    /// routing before the listener closes.
    pub drain_delay_ms: u64,
    /// Then in-flight calls get this long to finish; open streams are ended
    /// (UNAVAILABLE, so clients reconnect elsewhere) and the rest is dropped.
    pub grace_period_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    pub host: IpAddr,
    /// Serves `/healthz` and `/readyz`.
    pub port: u16,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    #[serde(serialize_with = "serialize_secret")]
    pub url: SecretString,
    /// A streaming replica of `url`. IncidentQuery and VectorSearch read from
    /// it (falling back to the primary while it is unreachable); writes, jobs,
    /// chain verification and exports use the primary. Reads may lag the
    /// primary by the replication delay.
    #[serde(serialize_with = "serialize_optional_secret")]
    pub read_replica_url: Option<SecretString>,
    /// Connections per pool (the primary's, and the replica's when set).
    pub max_connections: u32,
    /// How long a call waits for a pooled connection before answering UNAVAILABLE.
    pub acquire_timeout_ms: u64,
    /// How often readiness probes PostgreSQL; health follows within this period.
    pub health_check_interval_ms: u64,
    /// Run pending migrations when `serve` starts.
    pub migrate_on_start: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// all-MiniLM-L6-v2 on candle, loaded from `model_dir`.
    Local,
    /// An OpenAI-compatible `/v1/embeddings` endpoint.
    Openai,
}

/// What a write does when its embedding cannot be generated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FailurePolicy {
    /// Commit the event with a pending-embedding marker; a backfill completes it.
    Defer,
    /// Write nothing and answer UNAVAILABLE.
    Reject,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingSettings {
    pub provider: ProviderKind,
    /// Directory holding model.safetensors, config.json and tokenizer.json.
    pub model_dir: PathBuf,
    /// Name the local model is registered under in the database.
    pub model_name: String,
    pub failure_policy: FailurePolicy,
    /// Texts from concurrent writes are gathered into one model call of at most this many.
    pub batch_max_size: usize,
    /// How long the first text of a batch waits for company.
    pub batch_window_ms: u64,
    /// Entries of the in-process embedding cache.
    pub cache_capacity: u64,
    pub openai: OpenAiSettings,
    /// Further local models (all-MiniLM-compatible weights) a `reembed` job
    /// can embed every event with and then make active.
    pub extra_models: Vec<ExtraModelSettings>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExtraModelSettings {
    /// The name the model is registered and searched under.
    pub name: String,
    pub model_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QuerySettings {
    /// HMAC key that signs page tokens; at least 32 bytes. Replicas behind one
    /// address must share it. Unset: a random key per process, so tokens do
    /// not survive a restart or cross replicas.
    #[serde(serialize_with = "serialize_optional_secret")]
    pub page_token_key: Option<SecretString>,
    /// How long a listing's page tokens stay valid after its first page.
    pub page_token_ttl_secs: u64,
}

/// pgvector's `hnsw.iterative_scan`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IterativeScan {
    Off,
    StrictOrder,
    RelaxedOrder,
}

impl IterativeScan {
    pub fn as_sql(self) -> &'static str {
        match self {
            IterativeScan::Off => "off",
            IterativeScan::StrictOrder => "strict_order",
            IterativeScan::RelaxedOrder => "relaxed_order",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SearchSettings {
    /// HNSW candidate list size per scan (`hnsw.ef_search`): recall vs latency.
    /// Each monthly partition has its own graph; 200 keeps recall@10 above
    /// 0.95 at 100k events where 100 fell to 0.945 (`make bench`, search).
    pub ef_search: u32,
    /// Keep scanning the index while filters reject candidates (`hnsw.iterative_scan`).
    pub iterative_scan: IterativeScan,
    /// Upper bound on index tuples one iterative scan visits (`hnsw.max_scan_tuples`).
    pub max_scan_tuples: u32,
    /// When a filter matches at most this many events, they are compared
    /// exactly instead of walking the index.
    pub exact_scan_threshold: u32,
    /// Reciprocal rank fusion constant of hybrid search.
    pub rrf_k: u32,
    /// Candidates each ranking contributes to hybrid fusion (at least top_k).
    pub hybrid_candidates: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    /// `redis://host:port[/db]`. Unset: jobs live in-process (one replica) and
    /// there is no shared embedding cache.
    #[serde(serialize_with = "serialize_optional_secret")]
    pub url: Option<SecretString>,
    /// Prefix of every key and channel, so several deployments can share a Redis.
    pub key_prefix: String,
    /// How long one Redis command may take before it counts as unreachable.
    pub command_timeout_ms: u64,
    /// Lifetime of a shared (L2) embedding cache entry.
    pub embedding_cache_ttl_secs: u64,
}

/// pgvector's own HNSW defaults (`m`, `ef_construction`): the graph a model
/// gets unless `vector_index.hnsw_*` say otherwise.
pub const DEFAULT_HNSW_GRAPH: (u32, u32) = (16, 64);

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VectorIndexSettings {
    /// New embeddings wait in the unindexed fresh segment, searched exactly,
    /// and the indexer moves them into the HNSW index in batches: ingest is
    /// no longer capped by HNSW inserts (docs/performance.md). False: each
    /// write inserts into the HNSW index in its own transaction.
    pub deferred: bool,
    /// Run the indexer in this replica. Every replica may: they share the
    /// work. Off, fresh embeddings wait for a replica that runs it.
    pub indexer: bool,
    /// Indexer tasks in this replica. Each moves its own batch (`SKIP
    /// LOCKED`), so a second one uses the other core while a large graph
    /// makes every insert slow (docs/performance.md).
    pub workers: u32,
    /// Embeddings the indexer moves per transaction.
    pub batch_size: u32,
    /// Neighbours per node of a newly registered model's HNSW graph
    /// (pgvector's `m`). An existing model's index keeps the graph it was
    /// built with. More raises recall on data whose neighbours are hard to
    /// tell apart, and costs every search and index insert
    /// (docs/performance.md).
    pub hnsw_m: u32,
    /// Candidate list size while building that graph (`ef_construction`).
    pub hnsw_ef_construction: u32,
    /// How long the indexer sleeps when the fresh segment is empty.
    pub idle_poll_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JobSettings {
    /// Events a job processes per batch (and per progress update).
    pub batch_size: u32,
    /// A replica holds a running job's lock for this long and renews it every
    /// third of it; a crashed replica's jobs are taken over after it lapses.
    pub lock_ttl_ms: u64,
    /// How often a replica looks for deferred embeddings to backfill and for
    /// jobs a crashed replica left unfinished.
    pub supervisor_interval_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IntegritySettings {
    /// HMAC-SHA-256 key for new chain links, at least 32 bytes. Unset: links
    /// are plain SHA-256, which detects edits but not an attacker who rewrites
    /// the hashes too. Keep it outside the database.
    #[serde(serialize_with = "serialize_optional_secret")]
    pub chain_key: Option<SecretString>,
    /// Recorded with every HMAC link, so a rotated key can be told apart.
    pub chain_key_id: String,
    /// VerifyAuditChain and export refuse chains longer than this (FAILED_PRECONDITION).
    pub max_chain_events: u64,
    /// Ed25519 private key (PKCS#8 PEM, `datastorage audit keygen`) that signs
    /// exports. Unset: ExportAuditEvents is FAILED_PRECONDITION.
    pub export_signing_key: Option<PathBuf>,
    /// Names the signing key in every export summary.
    pub export_key_id: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSettings {
    /// No purge removes an event younger than this, unless a policy below
    /// covers its category.
    pub default_min_age_days: u32,
    /// Per-category floors: the most specific matching policy applies.
    pub policies: Vec<RetentionPolicySettings>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionPolicySettings {
    /// `remediation`, `ai_analysis`, `workflow`, `execution` or `custom`.
    pub kind: crate::domain::AuditKind,
    /// Custom events only: the `event_type` this policy covers.
    #[serde(default)]
    pub event_type: Option<String>,
    /// Events of this category are kept at least this long.
    pub min_age_days: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutageQueueSettings {
    /// While PostgreSQL is unreachable, accept writes into a Redis stream and
    /// answer WRITE_STATE_QUEUED (needs `redis.url`). Off: UNAVAILABLE.
    pub enabled: bool,
    /// Deliveries of one queued write before it moves to the dead-letter stream.
    pub max_attempts: u32,
    /// A queued write delivered to a replica but not applied within this long
    /// is claimed by another (or retried by the same one).
    pub claim_idle_ms: u64,
    /// Longest pause between replay attempts while PostgreSQL stays down.
    pub max_backoff_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// `json` for machines, `pretty` for people.
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

/// Kubernetes gives every pod `<SERVICE>_SERVICE_HOST`, `<SERVICE>_PORT…`
/// variables for each Service in its namespace; a Service named
/// `datastorage` makes them look like our settings. No setting is called
/// `service` or `port` at the top level, so these names are never ours.
fn is_kubernetes_service_link(key: &str) -> bool {
    key.starts_with("service_") || key == "port" || key.starts_with("port_")
}

/// Settings serialise only to seed figment with the defaults, so the secret must
/// survive; `Debug` (what logs would show) stays redacted by `SecretString`.
pub(crate) fn serialize_secret<S: serde::Serializer>(secret: &SecretString, s: S) -> Result<S::Ok, S::Error> {
    use secrecy::ExposeSecret;
    s.serialize_str(secret.expose_secret())
}

pub(crate) fn serialize_optional_secret<S: serde::Serializer>(
    secret: &Option<SecretString>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match secret {
        Some(secret) => serialize_secret(secret, s),
        None => s.serialize_none(),
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            grpc: GrpcSettings {
                host: [0, 0, 0, 0].into(),
                port: 8080,
                max_message_bytes: 16 * 1024 * 1024,
                default_timeout_ms: 30_000,
                max_concurrent_requests: 512,
                tls: None,
            },
            http: HttpSettings {
                host: [0, 0, 0, 0].into(),
                port: 9090,
            },
            database: DatabaseSettings {
                url: SecretString::from("postgres://datastorage:datastorage@127.0.0.1:55432/datastorage"),
                read_replica_url: None,
                max_connections: 20,
                acquire_timeout_ms: 2_000,
                health_check_interval_ms: 2_000,
                migrate_on_start: true,
            },
            embedding: EmbeddingSettings {
                provider: ProviderKind::Local,
                model_dir: PathBuf::from(".cache/models/all-MiniLM-L6-v2"),
                model_name: "all-MiniLM-L6-v2".to_owned(),
                failure_policy: FailurePolicy::Defer,
                batch_max_size: 32,
                batch_window_ms: 2,
                cache_capacity: 100_000,
                openai: OpenAiSettings::default(),
                extra_models: Vec::new(),
            },
            query: QuerySettings {
                page_token_key: None,
                page_token_ttl_secs: 3600,
            },
            search: SearchSettings {
                ef_search: 200,
                iterative_scan: IterativeScan::RelaxedOrder,
                max_scan_tuples: 20_000,
                exact_scan_threshold: 2_000,
                rrf_k: 60,
                hybrid_candidates: 100,
            },
            vector_index: VectorIndexSettings {
                deferred: true,
                indexer: true,
                workers: 2,
                batch_size: 500,
                hnsw_m: DEFAULT_HNSW_GRAPH.0,
                hnsw_ef_construction: DEFAULT_HNSW_GRAPH.1,
                idle_poll_ms: 100,
            },
            redis: RedisSettings {
                url: None,
                key_prefix: "datastorage".to_owned(),
                command_timeout_ms: 500,
                embedding_cache_ttl_secs: 300,
            },
            jobs: JobSettings {
                batch_size: 256,
                lock_ttl_ms: 15_000,
                supervisor_interval_ms: 10_000,
            },
            integrity: IntegritySettings {
                chain_key: None,
                chain_key_id: "default".to_owned(),
                max_chain_events: 100_000,
                export_signing_key: None,
                export_key_id: "default".to_owned(),
            },
            retention: RetentionSettings {
                default_min_age_days: 0,
                policies: Vec::new(),
            },
            outage_queue: OutageQueueSettings {
                enabled: false,
                max_attempts: 5,
                claim_idle_ms: 30_000,
                max_backoff_ms: 5_000,
            },
            auth: AuthSettings {
                disabled: false,
                issuer: String::new(),
                audiences: vec!["datastorage".to_owned()],
                leeway_secs: 30,
                hs256_secret: None,
                public_keys: Vec::new(),
                jwks_url: None,
                jwks_ca_file: None,
                jwks_bearer_token_file: None,
                jwks_refresh_secs: 300,
                jwks_min_refresh_secs: 10,
                subject_scopes: BTreeMap::new(),
            },
            rate_limit: RateLimitSettings {
                enabled: true,
                requests_per_second: 100,
                burst: 200,
                scopes: BTreeMap::new(),
                shared: false,
            },
            shutdown: ShutdownSettings {
                drain_delay_ms: 5_000,
                // With the drain delay and closing the pools, within Kubernetes'
                // default 30 s terminationGracePeriodSeconds.
                grace_period_ms: 15_000,
            },
            log: LogSettings {
                format: LogFormat::Json,
            },
        }
    }
}

impl Settings {
    /// Defaults, then `file` if given, then `DATASTORAGE_*` env vars; then validated.
    pub fn load(file: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let settings = Self::layered(file)?;
        settings.validate()?;
        Ok(settings)
    }

    /// What `datastorage migrate` needs: the layered settings with only the
    /// database checked, so a migration job runs without the model or keys.
    pub fn load_for_migrations(file: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let settings = Self::layered(file)?;
        settings.validate_database()?;
        Ok(settings)
    }

    fn layered(file: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(file) = file {
            anyhow::ensure!(file.exists(), "configuration file {} does not exist", file.display());
            figment = figment.merge(Toml::file(file));
        }
        // Unknown DATASTORAGE_* variables are refused (a typo must not be silently
        // ignored), except the CLI's own and those the tests and benchmarks read.
        figment = figment.merge(
            Env::prefixed("DATASTORAGE_")
                .filter(|key| {
                    let key = key.as_str().to_ascii_lowercase();
                    !matches!(key.as_str(), "config" | "addr" | "token")
                        && !key.starts_with("test_")
                        && !key.starts_with("bench_")
                        && !is_kubernetes_service_link(&key)
                })
                .split("__"),
        );
        figment
            .extract()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.grpc.max_message_bytes >= 64 * 1024,
            "grpc.max_message_bytes must be at least 65536"
        );
        self.validate_database()?;
        self.validate_rest()
    }

    fn validate_database(&self) -> anyhow::Result<()> {
        use anyhow::ensure;
        use secrecy::ExposeSecret;
        ensure!(
            self.database.url.expose_secret().starts_with("postgres://")
                || self.database.url.expose_secret().starts_with("postgresql://"),
            "database.url must be a postgres:// URL"
        );
        if let Some(url) = &self.database.read_replica_url {
            ensure!(
                url.expose_secret().starts_with("postgres://") || url.expose_secret().starts_with("postgresql://"),
                "database.read_replica_url must be a postgres:// URL"
            );
        }
        ensure!(
            self.database.max_connections >= 1,
            "database.max_connections must be at least 1"
        );
        ensure!(
            self.database.acquire_timeout_ms >= 1,
            "database.acquire_timeout_ms must be positive"
        );
        ensure!(
            self.database.health_check_interval_ms >= 10,
            "database.health_check_interval_ms must be at least 10"
        );
        Ok(())
    }

    fn validate_rest(&self) -> anyhow::Result<()> {
        use anyhow::ensure;
        use secrecy::ExposeSecret;
        ensure!(
            (1..=1024).contains(&self.embedding.batch_max_size),
            "embedding.batch_max_size must be within 1..=1024"
        );
        ensure!(
            !self.embedding.model_name.is_empty(),
            "embedding.model_name must not be empty"
        );
        if let Some(key) = &self.query.page_token_key {
            ensure!(
                key.expose_secret().len() >= 32,
                "query.page_token_key must be at least 32 bytes"
            );
        }
        ensure!(
            (60..=7 * 24 * 3600).contains(&self.query.page_token_ttl_secs),
            "query.page_token_ttl_secs must be within 60..=604800"
        );
        ensure!(
            (1..=1000).contains(&self.search.ef_search),
            "search.ef_search must be within 1..=1000"
        );
        ensure!(
            self.search.max_scan_tuples >= 1,
            "search.max_scan_tuples must be at least 1"
        );
        ensure!(self.search.rrf_k >= 1, "search.rrf_k must be at least 1");
        ensure!(
            (1..=1000).contains(&self.search.hybrid_candidates),
            "search.hybrid_candidates must be within 1..=1000"
        );
        if let Some(url) = &self.redis.url {
            ensure!(
                url.expose_secret().starts_with("redis://") || url.expose_secret().starts_with("rediss://"),
                "redis.url must be a redis:// or rediss:// URL"
            );
        }
        ensure!(
            self.redis.command_timeout_ms >= 1,
            "redis.command_timeout_ms must be positive"
        );
        ensure!(
            self.redis.embedding_cache_ttl_secs >= 1,
            "redis.embedding_cache_ttl_secs must be positive"
        );
        ensure!(
            (1..=16).contains(&self.vector_index.workers),
            "vector_index.workers must be within 1..=16"
        );
        ensure!(
            (1..=10_000).contains(&self.vector_index.batch_size),
            "vector_index.batch_size must be within 1..=10000"
        );
        ensure!(
            (2..=100).contains(&self.vector_index.hnsw_m),
            "vector_index.hnsw_m must be within 2..=100"
        );
        ensure!(
            (4..=1000).contains(&self.vector_index.hnsw_ef_construction)
                && self.vector_index.hnsw_ef_construction >= 2 * self.vector_index.hnsw_m,
            "vector_index.hnsw_ef_construction must be within 4..=1000 and at least twice vector_index.hnsw_m"
        );
        ensure!(
            self.vector_index.idle_poll_ms >= 1,
            "vector_index.idle_poll_ms must be at least 1"
        );
        ensure!(
            (1..=10_000).contains(&self.jobs.batch_size),
            "jobs.batch_size must be within 1..=10000"
        );
        ensure!(self.jobs.lock_ttl_ms >= 300, "jobs.lock_ttl_ms must be at least 300");
        ensure!(
            self.jobs.supervisor_interval_ms >= 10,
            "jobs.supervisor_interval_ms must be at least 10"
        );
        if let Some(key) = &self.integrity.chain_key {
            ensure!(
                key.expose_secret().len() >= 32,
                "integrity.chain_key must be at least 32 bytes"
            );
        }
        ensure!(
            !self.integrity.chain_key_id.is_empty() && !self.integrity.export_key_id.is_empty(),
            "integrity.chain_key_id and integrity.export_key_id must not be empty"
        );
        ensure!(
            self.integrity.max_chain_events >= 1,
            "integrity.max_chain_events must be at least 1"
        );
        if let Some(path) = &self.integrity.export_signing_key {
            ensure!(
                path.is_file(),
                "integrity.export_signing_key ({}) must be a file",
                path.display()
            );
        }
        for (index, policy) in self.retention.policies.iter().enumerate() {
            ensure!(
                policy.event_type.is_none() || policy.kind == crate::domain::AuditKind::Custom,
                "retention.policies[{index}].event_type applies to kind \"custom\" only"
            );
            ensure!(
                !self.retention.policies[..index]
                    .iter()
                    .any(|p| p.kind == policy.kind && p.event_type == policy.event_type),
                "retention.policies[{index}] repeats an earlier policy's category"
            );
        }
        if self.outage_queue.enabled {
            ensure!(
                self.redis.url.is_some(),
                "outage_queue.enabled needs redis.url: the queue is a Redis stream"
            );
        }
        ensure!(
            self.outage_queue.max_attempts >= 1,
            "outage_queue.max_attempts must be at least 1"
        );
        ensure!(
            self.outage_queue.claim_idle_ms >= 100 && self.outage_queue.max_backoff_ms >= 10,
            "outage_queue.claim_idle_ms must be at least 100 and outage_queue.max_backoff_ms at least 10"
        );
        for (index, extra) in self.embedding.extra_models.iter().enumerate() {
            ensure!(
                !extra.name.is_empty() && extra.name != self.embedding.model_name,
                "embedding.extra_models[{index}].name must be set and differ from embedding.model_name"
            );
            ensure!(
                extra.model_dir.join("model.safetensors").is_file(),
                "embedding.extra_models[{index}].model_dir ({}) must contain model.safetensors",
                extra.model_dir.display()
            );
        }
        ensure!(
            self.grpc.default_timeout_ms >= 1 && self.grpc.max_concurrent_requests >= 1,
            "grpc.default_timeout_ms and grpc.max_concurrent_requests must be positive"
        );
        if let Some(tls) = &self.grpc.tls {
            ensure!(
                tls.cert_file.is_file() && tls.key_file.is_file(),
                "grpc.tls.cert_file ({}) and grpc.tls.key_file ({}) must be files",
                tls.cert_file.display(),
                tls.key_file.display()
            );
        }
        self.validate_auth()?;
        self.validate_rate_limit()?;
        match self.embedding.provider {
            ProviderKind::Local => ensure!(
                self.embedding.model_dir.join("model.safetensors").is_file()
                    && self.embedding.model_dir.join("tokenizer.json").is_file(),
                "embedding.model_dir ({}) must contain model.safetensors and tokenizer.json (run `make deps`)",
                self.embedding.model_dir.display()
            ),
            ProviderKind::Openai => self.embedding.openai.validate()?,
        }
        Ok(())
    }

    fn validate_auth(&self) -> anyhow::Result<()> {
        use anyhow::ensure;
        use secrecy::ExposeSecret;
        let auth = &self.auth;
        if auth.disabled {
            return Ok(());
        }
        ensure!(
            auth.hs256_secret.is_some() || !auth.public_keys.is_empty() || auth.jwks_url.is_some(),
            "auth needs a key source (auth.hs256_secret, auth.public_keys or auth.jwks_url), \
             or auth.disabled = true to serve without authentication"
        );
        ensure!(!auth.issuer.is_empty(), "auth.issuer must be set");
        ensure!(
            !auth.audiences.is_empty() && auth.audiences.iter().all(|a| !a.is_empty()),
            "auth.audiences must name at least one audience"
        );
        ensure!(auth.leeway_secs <= 300, "auth.leeway_secs must be at most 300");
        if let Some(secret) = &auth.hs256_secret {
            ensure!(
                secret.expose_secret().len() >= 32,
                "auth.hs256_secret must be at least 32 bytes"
            );
        }
        for (index, key) in auth.public_keys.iter().enumerate() {
            ensure!(
                crate::auth::token::asymmetric_algorithm(&key.algorithm).is_some(),
                "auth.public_keys[{index}].algorithm must be one of RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384"
            );
            ensure!(
                key.pem_file.is_file(),
                "auth.public_keys[{index}].pem_file ({}) must be a file",
                key.pem_file.display()
            );
        }
        if let Some(url) = &auth.jwks_url {
            // Whoever can answer the JWKS request can mint tokens: plain HTTP
            // only to this host.
            let loopback = ["http://127.0.0.1", "http://localhost", "http://[::1]"]
                .iter()
                .any(|prefix| url.starts_with(prefix));
            ensure!(
                url.starts_with("https://") || loopback,
                "auth.jwks_url must be an https:// URL (plain http:// only to a loopback address)"
            );
        }
        ensure!(
            (1..=auth.jwks_refresh_secs).contains(&auth.jwks_min_refresh_secs),
            "auth.jwks_min_refresh_secs must be at least 1 and at most auth.jwks_refresh_secs"
        );
        for (subject, scopes) in &auth.subject_scopes {
            for scope in scopes {
                ensure!(
                    crate::auth::Scope::parse(scope).is_some(),
                    "auth.subject_scopes.{subject:?} names an unknown scope {scope:?}"
                );
            }
        }
        Ok(())
    }

    fn validate_rate_limit(&self) -> anyhow::Result<()> {
        use anyhow::ensure;
        let limits = &self.rate_limit;
        let rates = std::iter::once(("rate_limit".to_owned(), limits.requests_per_second, limits.burst)).chain(
            limits.scopes.iter().map(|(scope, rate)| {
                (
                    format!("rate_limit.scopes.{scope:?}"),
                    rate.requests_per_second,
                    rate.burst,
                )
            }),
        );
        for (name, per_second, burst) in rates {
            ensure!(
                per_second >= 1 && burst >= 1,
                "{name}: requests_per_second and burst must be at least 1"
            );
        }
        for scope in limits.scopes.keys() {
            ensure!(
                crate::auth::Scope::parse(scope).is_some(),
                "rate_limit.scopes names an unknown scope {scope:?}"
            );
        }
        if limits.shared {
            ensure!(
                self.redis.url.is_some(),
                "rate_limit.shared needs redis.url: the shared counters live in Redis"
            );
        }
        Ok(())
    }

    pub fn page_token_ttl(&self) -> Duration {
        Duration::from_secs(self.query.page_token_ttl_secs)
    }

    pub fn health_check_interval(&self) -> Duration {
        Duration::from_millis(self.database.health_check_interval_ms)
    }
}

#[cfg(test)]
// figment's Jail closures must return figment::Error, which is large by design.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn defaults_refuse_to_serve_without_authentication() {
        let mut settings = Settings::default();
        settings.embedding.provider = ProviderKind::Openai;
        settings.embedding.openai.base_url = "http://127.0.0.1:1".into();
        settings.embedding.openai.model = "text-embedding-3-small".into();
        settings.embedding.openai.dimensions = 384;
        let error = settings.validate().unwrap_err().to_string();
        assert!(error.contains("auth.disabled"), "{error}");
        settings.auth.hs256_secret = Some(SecretString::from("s".repeat(32)));
        settings.auth.issuer = "https://issuer.example".into();
        settings.validate().expect("a key source and an issuer are enough");
    }

    #[test]
    fn defaults_are_valid_apart_from_the_model_directory() {
        let mut settings = Settings::default();
        settings.auth.disabled = true;
        settings.embedding.provider = ProviderKind::Openai;
        settings.embedding.openai.base_url = "http://127.0.0.1:1".into();
        settings.embedding.openai.model = "text-embedding-3-small".into();
        settings.embedding.openai.dimensions = 384;
        settings.validate().expect("defaults validate");
    }

    #[test]
    fn env_vars_override_nested_settings_and_errors_name_the_setting() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("DATASTORAGE_GRPC__PORT", "7000");
            jail.set_env("DATASTORAGE_AUTH__DISABLED", "true");
            jail.set_env("DATASTORAGE_EMBEDDING__PROVIDER", "openai");
            jail.set_env("DATASTORAGE_EMBEDDING__OPENAI__BASE_URL", "http://127.0.0.1:9");
            jail.set_env("DATASTORAGE_EMBEDDING__OPENAI__MODEL", "m");
            jail.set_env("DATASTORAGE_EMBEDDING__OPENAI__DIMENSIONS", "8");
            jail.set_env("DATASTORAGE_CONFIG", "read by the CLI, not here");
            jail.set_env("DATASTORAGE_TEST_DATABASE_URL", "read by the tests");
            let settings = Settings::load(None).expect("loads");
            assert_eq!(settings.grpc.port, 7000);

            jail.set_env("DATASTORAGE_DATABASE__MAX_CONNECTIONS", "lots");
            let error = Settings::load(None).unwrap_err().to_string();
            assert!(error.to_lowercase().contains("database.max_connections"), "{error}");
            Ok(())
        });
    }

    #[test]
    fn migrations_need_only_the_database_settings() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("DATASTORAGE_EMBEDDING__MODEL_DIR", "/nonexistent");
            Settings::load(None).expect_err("serving needs the model and an auth choice");
            let settings = Settings::load_for_migrations(None).expect("migrating needs neither");
            assert!(settings.auth.hs256_secret.is_none());
            jail.set_env("DATASTORAGE_DATABASE__URL", "mysql://nope");
            let error = Settings::load_for_migrations(None).unwrap_err().to_string();
            assert!(error.contains("database.url"), "{error}");
            Ok(())
        });
    }

    #[test]
    fn kubernetes_service_links_are_not_mistaken_for_settings() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("DATASTORAGE_AUTH__DISABLED", "true");
            jail.set_env("DATASTORAGE_SERVICE_HOST", "10.0.0.12");
            jail.set_env("DATASTORAGE_SERVICE_PORT_GRPC", "8080");
            jail.set_env("DATASTORAGE_PORT", "tcp://10.0.0.12:8080");
            jail.set_env("DATASTORAGE_PORT_8080_TCP_PROTO", "tcp");
            jail.set_env("DATASTORAGE_EMBEDDING__PROVIDER", "openai");
            jail.set_env("DATASTORAGE_EMBEDDING__OPENAI__BASE_URL", "http://127.0.0.1:9");
            jail.set_env("DATASTORAGE_EMBEDDING__OPENAI__MODEL", "m");
            jail.set_env("DATASTORAGE_EMBEDDING__OPENAI__DIMENSIONS", "8");
            Settings::load(None).expect("service links are ignored");
            Ok(())
        });
    }

    #[test]
    fn a_misspelt_setting_is_refused() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("DATASTORAGE_GRPC__PROT", "7001");
            jail.set_env("DATASTORAGE_AUTH__DISABLED", "true");
            let error = Settings::load(None).unwrap_err().to_string();
            assert!(error.to_lowercase().contains("prot"), "{error}");
            Ok(())
        });
    }
}
