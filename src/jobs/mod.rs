//! Long-running jobs: where their records live while and after they run.
pub mod memory;
pub mod redis;
pub mod runner;
pub mod store;

pub use self::{
    memory::MemoryJobStore,
    redis::RedisJobStore,
    store::{
        JobChanges, JobCursor, JobFailure, JobListFilter, JobRecord, JobSpec, JobState, JobStore, JobStoreError,
        LockToken, FINISHED_JOB_TTL, REQUEST_ID_TTL,
    },
};
