//! Black-box tests: each starts the real server on port 0 against a fresh
//! database in the project's PostgreSQL and talks gRPC to it.
mod audit_write;
mod embedding_cache;
mod health;
mod helpers;
mod incident_plans;
mod incident_query;
mod integrity;
mod job_store;
mod jobs;
mod jobs_redis;
mod outage;
mod reflection;
mod vector_search;
