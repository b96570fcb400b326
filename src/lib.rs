//! datastorage: the platform's audit trail over gRPC.
//!
//! Each audit write is validated, embedded, and committed to PostgreSQL with
//! its incident projection and pgvector embedding in one transaction.
//!
//! # Layout
//! - [`grpc`]: transport. Services parse protobuf into [`domain`] types
//!   (`grpc::convert`) and map [`error::CoreError`] to `Status` in one place
//!   (`grpc::status`); `grpc::middleware` admits (auth, scopes, rate limit,
//!   load shedding, deadlines) and observes (spans, metrics) every call.
//! - [`auth`]: JWT verification and the scope each RPC needs.
//! - [`ratelimit`]: per-caller token buckets, local or shared through Redis.
//! - [`metrics`]: the Prometheus recorder and state gauges; [`telemetry`]: logs and OTLP traces.
//! - [`domain`]: validated values; the only way in is parsing.
//! - [`audit`]: the write use case (embedding and failure policy before the transaction).
//! - [`storage`]: PostgreSQL; owns the transaction boundary.
//! - [`embedding`]: providers (local candle model, OpenAI-compatible HTTP), micro-batching, cache.
//! - [`integrity`]: hash chains, legal holds, signed export, PII redaction.
//! - [`jobs`]: job records, cancellation flags and locks, in Redis or in-process.
//! - [`outage`]: the Redis-stream queue that keeps writes during a PostgreSQL outage.
//! - [`startup`]: builds the application and returns the bound ports.
//! - [`cli`]: the `datastorage jobs …` client of a running server.
pub mod audit;
pub mod auth;
pub mod cli;
pub mod config;
pub mod domain;
pub mod embedding;
pub mod error;
pub mod grpc;
pub mod health;
pub mod indexer;
pub mod integrity;
pub mod jobs;
pub mod metrics;
pub mod models;
pub mod outage;
pub mod pagination;
pub mod proto;
pub mod query;
pub mod ratelimit;
pub mod search;
pub mod startup;
pub mod storage;
pub mod telemetry;
