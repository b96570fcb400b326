//! Black-box tests: each starts the real server on port 0 against a fresh
//! database in the project's PostgreSQL and talks gRPC to it.
mod audit_write;
mod auth;
mod database_faults;
mod embedding_cache;
mod health;
mod helpers;
mod hostile;
mod incident_plans;
mod incident_query;
mod integrity;
mod job_store;
mod jobs;
mod jobs_redis;
mod metrics;
mod outage;
mod protection;
mod provider_faults;
mod reflection;
mod replica;
mod vector_index;
mod vector_search;
