//! JobStatus over the real server: backfill, reembed, purge and reindex
//! against real data, watched and cancelled over gRPC (in-process job store;
//! the Redis store's cross-replica behaviour is in jobs_redis.rs).
use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};
use datastorage::{
    config::{ExtraModelSettings, Settings},
    embedding::{EmbeddingError, EmbeddingProvider},
    proto::v1::{self as pb, job_status_client::JobStatusClient},
};
use tonic::{transport::Channel, Code};

use crate::helpers::{local_model, model_dir, remediation_event, spawn_app_with, violated_fields, write, TestApp};

pub const SECOND_MODEL: &str = "minilm-copy";

/// The local model, with an off switch standing for an unreachable provider.
pub struct Switchable {
    pub up: AtomicBool,
}

#[async_trait]
impl EmbeddingProvider for Switchable {
    fn model_name(&self) -> &str {
        "all-MiniLM-L6-v2"
    }
    fn dimensions(&self) -> usize {
        local_model().dimensions()
    }
    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbeddingError> {
        if self.up.load(Ordering::SeqCst) {
            local_model().embed(texts).await
        } else {
            Err(EmbeddingError::Unavailable("switched off by the test".into()))
        }
    }
}

/// Jobs in small batches; the supervisor only when a test wants it.
fn job_settings(s: &mut Settings) {
    s.jobs.batch_size = 2;
    s.jobs.supervisor_interval_ms = 3_600_000;
}

fn with_second_model(s: &mut Settings) {
    job_settings(s);
    s.embedding.extra_models = vec![ExtraModelSettings {
        name: SECOND_MODEL.into(),
        model_dir: model_dir(),
    }];
}

pub async fn jobs_client(app: &TestApp) -> JobStatusClient<Channel> {
    JobStatusClient::new(app.channel().await)
}

pub fn start(spec: pb::start_job_request::Spec) -> pb::StartJobRequest {
    pb::StartJobRequest {
        spec: Some(spec),
        request_id: String::new(),
    }
}

/// Every update of the job until the stream ends.
pub async fn watch_to_end(client: &mut JobStatusClient<Channel>, id: &str) -> Vec<pb::Job> {
    let mut stream = client
        .watch_job(pb::WatchJobRequest { id: id.into() })
        .await
        .expect("watch")
        .into_inner();
    let mut updates = Vec::new();
    while let Some(job) = tokio::time::timeout(Duration::from_secs(60), stream.message())
        .await
        .expect("the job ends within a minute")
        .expect("stream")
    {
        updates.push(job);
    }
    updates
}

fn state(job: &pb::Job) -> pb::JobState {
    pb::JobState::try_from(job.state).unwrap()
}

async fn write_events(app: &TestApp, count: usize, ago_secs: i64) -> Vec<String> {
    let mut client = app.audit_client().await;
    let mut ids = Vec::new();
    for i in 0..count {
        let mut event = remediation_event(&format!("rr-job-{ago_secs}-{i}"));
        event.occurred_at = Some(prost_types::Timestamp {
            seconds: (Utc::now() - TimeDelta::seconds(ago_secs)).timestamp(),
            nanos: 0,
        });
        if let Some(pb::audit_event::Payload::Remediation(r)) = &mut event.payload {
            r.message = format!("pod {i} of checkout crash-looping after deploy {ago_secs}");
        }
        ids.push(
            client
                .write_audit(write(event))
                .await
                .expect("write")
                .into_inner()
                .event_id,
        );
    }
    ids
}

async fn scalar(app: &TestApp, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(&app.db)
        .await
        .unwrap()
}

#[tokio::test]
async fn backfill_embeds_deferred_events_and_watch_streams_its_progress() {
    let provider = Arc::new(Switchable {
        up: AtomicBool::new(false),
    });
    let app = spawn_app_with(job_settings, provider.clone()).await;
    write_events(&app, 7, 60).await;
    assert_eq!(
        app.count("pending_embeddings").await,
        7,
        "the provider was down: every embedding deferred"
    );
    provider.up.store(true, Ordering::SeqCst);

    let mut jobs = jobs_client(&app).await;
    let job = jobs
        .start_job(start(pb::start_job_request::Spec::BackfillEmbeddings(
            pb::BackfillEmbeddingsJob {},
        )))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.r#type, "backfill_embeddings");
    let updates = watch_to_end(&mut jobs, &job.id).await;

    let last = updates.last().unwrap();
    assert_eq!(state(last), pb::JobState::Succeeded, "{last:?}");
    assert_eq!((last.done, last.total, last.progress_percent), (7, 7, 100));
    assert_eq!(
        last.result.as_ref().unwrap().fields["embedded"],
        prost_types::Value::from(7.0)
    );
    assert!(last.finished_at.is_some() && last.expires_at.is_some());
    let done: Vec<i64> = updates.iter().map(|j| j.done).collect();
    assert!(
        done.windows(2).all(|w| w[0] <= w[1]),
        "progress never goes back: {done:?}"
    );
    assert!(
        updates
            .iter()
            .any(|j| state(j) == pb::JobState::Running && j.done > 0 && j.done < 7),
        "intermediate progress is streamed: {done:?}"
    );
    assert!(
        updates[..updates.len() - 1].iter().all(|j| !is_terminal(j)),
        "one terminal update, last"
    );

    assert_eq!(app.count("pending_embeddings").await, 0);
    assert_eq!(app.count("stored_embeddings").await, 7);
    assert_eq!(
        scalar(&app, "SELECT count(*) FROM audit_events WHERE embedding_state = 1").await,
        7,
        "deferred events now say their embedding was generated"
    );
}

fn is_terminal(job: &pb::Job) -> bool {
    matches!(
        state(job),
        pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Cancelled
    )
}

#[tokio::test]
async fn deferred_events_are_backfilled_automatically_once_the_provider_answers() {
    let provider = Arc::new(Switchable {
        up: AtomicBool::new(false),
    });
    let app = spawn_app_with(
        |s| {
            job_settings(s);
            s.jobs.supervisor_interval_ms = 100;
        },
        provider.clone(),
    )
    .await;
    write_events(&app, 3, 60).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        app.count("pending_embeddings").await,
        3,
        "nothing to do while the provider is down"
    );

    provider.up.store(true, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while app.count("pending_embeddings").await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the automatic backfill did not run"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let listed = jobs_client(&app)
        .await
        .list_jobs(pb::ListJobsRequest {
            states: vec![],
            r#type: "backfill_embeddings".into(),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed.jobs.len(),
        1,
        "at most one automatic backfill: {:?}",
        listed.jobs
    );
    assert_eq!(listed.jobs[0].created_by, "datastorage");
}

#[tokio::test]
async fn reembed_switches_search_to_the_new_model_only_when_it_is_complete() {
    let app = spawn_app_with(with_second_model, local_model()).await;
    write_events(&app, 9, 60).await;
    let mut search = app.search_client().await;
    let query = || pb::SearchSimilarRequest {
        query: Some(pb::search_similar_request::Query::Text(
            "checkout pods crash looping".into(),
        )),
        top_k: 5,
        ..Default::default()
    };
    let before = search.search_similar(query()).await.unwrap().into_inner();
    assert_eq!(before.model, "all-MiniLM-L6-v2");

    let mut jobs = jobs_client(&app).await;
    let job = jobs
        .start_job(start(pb::start_job_request::Spec::Reembed(pb::ReembedJob {
            model: SECOND_MODEL.into(),
        })))
        .await
        .unwrap()
        .into_inner();
    let updates = watch_to_end(&mut jobs, &job.id).await;
    let last = updates.last().unwrap();
    assert_eq!(state(last), pb::JobState::Succeeded, "{last:?}");
    assert_eq!(last.done, 9);
    for update in &updates[..updates.len() - 1] {
        // While the job runs, the old model stays active.
        assert_ne!(state(update), pb::JobState::Succeeded);
    }

    let after = search.search_similar(query()).await.unwrap().into_inner();
    assert_eq!(
        after.model, SECOND_MODEL,
        "searches use the new model once it is complete"
    );
    assert_eq!(after.hits.len(), 5);
    assert_eq!(
        before.hits.iter().map(|h| &h.event_id).collect::<Vec<_>>(),
        after.hits.iter().map(|h| &h.event_id).collect::<Vec<_>>(),
        "the same weights rank the same way"
    );
    // New writes embed with the active model.
    write_events(&app, 1, 30).await;
    assert_eq!(
        scalar(
            &app,
            "SELECT count(*) FROM stored_embeddings emb JOIN embedding_models m ON m.id = emb.model_id \
             WHERE m.name = 'minilm-copy'"
        )
        .await,
        10
    );
}

#[tokio::test]
async fn a_cancelled_job_stops_at_its_next_batch() {
    let app = spawn_app_with(
        |s| {
            with_second_model(s);
            s.jobs.batch_size = 1;
        },
        local_model(),
    )
    .await;
    write_events(&app, 40, 60).await;
    let mut jobs = jobs_client(&app).await;
    let job = jobs
        .start_job(start(pb::start_job_request::Spec::Reembed(pb::ReembedJob {
            model: SECOND_MODEL.into(),
        })))
        .await
        .unwrap()
        .into_inner();
    jobs.cancel_job(pb::CancelJobRequest { id: job.id.clone() })
        .await
        .expect("cancel a running job");
    let last = watch_to_end(&mut jobs, &job.id).await.pop().unwrap();
    assert_eq!(state(&last), pb::JobState::Cancelled, "{last:?}");
    assert!(last.done < 40, "stopped early: {last:?}");

    let again = jobs
        .cancel_job(pb::CancelJobRequest { id: job.id.clone() })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
    let active: String = sqlx::query_scalar("SELECT name FROM embedding_models WHERE active")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(active, "all-MiniLM-L6-v2", "a cancelled reembed switches nothing");
}

async fn write_at(app: &TestApp, rrid: &str, at: DateTime<Utc>, execution: bool) {
    let mut event = remediation_event(rrid);
    event.occurred_at = Some(prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: 0,
    });
    if execution {
        event.payload = Some(pb::audit_event::Payload::Execution(pb::ExecutionAudit {
            action_type: "restart_pod".into(),
            target: Some(pb::ResourceRef {
                kind: "Deployment".into(),
                name: "api".into(),
                namespace: "payments".into(),
            }),
            status: pb::ExecutionStatus::Succeeded as i32,
            duration: Some(prost_types::Duration { seconds: 3, nanos: 0 }),
            ..Default::default()
        }));
    }
    app.audit_client().await.write_audit(write(event)).await.expect("write");
}

#[tokio::test]
async fn purge_leaves_nothing_older_than_the_cutoff_and_touches_nothing_newer() {
    let app = spawn_app_with(job_settings, local_model()).await;
    let now = Utc::now();
    let cutoff = now - TimeDelta::days(75);
    // Whole months before the cutoff, the cutoff's own month on both sides, and recent.
    let old = [
        now - TimeDelta::days(150),
        now - TimeDelta::days(120),
        cutoff - TimeDelta::hours(1),
    ];
    let kept = [
        cutoff + TimeDelta::hours(1),
        now - TimeDelta::days(10),
        now - TimeDelta::minutes(5),
    ];
    for (i, at) in old.iter().enumerate() {
        write_at(&app, &format!("rr-old-{i}"), *at, true).await;
    }
    for (i, at) in kept.iter().enumerate() {
        write_at(&app, &format!("rr-kept-{i}"), *at, true).await;
    }
    // An incident with events on both sides of the cutoff stays.
    write_at(&app, "rr-both", cutoff - TimeDelta::days(3), false).await;
    write_at(&app, "rr-both", now - TimeDelta::days(1), false).await;
    let months_before: i64 = scalar(
        &app,
        "SELECT count(*) FROM pg_inherits WHERE inhparent = 'audit_events'::regclass",
    )
    .await;

    let mut jobs = jobs_client(&app).await;
    let job = jobs
        .start_job(start(pb::start_job_request::Spec::Purge(pb::PurgeJob {
            older_than: Some(prost_types::Timestamp {
                seconds: cutoff.timestamp(),
                nanos: 0,
            }),
        })))
        .await
        .unwrap()
        .into_inner();
    let last = watch_to_end(&mut jobs, &job.id).await.pop().unwrap();
    assert_eq!(state(&last), pb::JobState::Succeeded, "{last:?}");
    assert_eq!(last.done, 4, "3 old events and the first of rr-both");

    let older: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_events WHERE occurred_at < $1")
        .bind(cutoff)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(older, 0);
    assert_eq!(app.count("audit_events").await, 4, "everything newer is untouched");
    assert_eq!(app.count("stored_embeddings").await, 4);
    let months_after: i64 = scalar(
        &app,
        "SELECT count(*) FROM pg_inherits WHERE inhparent = 'audit_events'::regclass",
    )
    .await;
    assert!(
        months_after < months_before,
        "whole months were dropped: {months_before} -> {months_after}"
    );
    let incidents: Vec<String> =
        sqlx::query_scalar("SELECT remediation_request_id FROM incidents ORDER BY remediation_request_id")
            .fetch_all(&app.db)
            .await
            .unwrap();
    assert_eq!(incidents, ["rr-both", "rr-kept-0", "rr-kept-1", "rr-kept-2"]);

    // The action rollup lost the purged executions, dropped months included.
    let stats = app
        .incident_query_client()
        .await
        .get_action_stats(pb::GetActionStatsRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .stats;
    assert_eq!(stats.len(), 1);
    assert_eq!((stats[0].total, stats[0].succeeded), (3, 3));

    // A write into a dropped month recreates it.
    write_at(&app, "rr-late", now - TimeDelta::days(150), false).await;
}

#[tokio::test]
async fn reindex_rebuilds_every_partition_of_the_model_index() {
    let app = spawn_app_with(job_settings, local_model()).await;
    write_events(&app, 2, 60).await;
    write_events(&app, 2, 60 * 86_400).await;
    let mut jobs = jobs_client(&app).await;
    let job = jobs
        .start_job(start(pb::start_job_request::Spec::Reindex(pb::ReindexJob {
            model: "all-MiniLM-L6-v2".into(),
        })))
        .await
        .unwrap()
        .into_inner();
    let last = watch_to_end(&mut jobs, &job.id).await.pop().unwrap();
    assert_eq!(state(&last), pb::JobState::Succeeded, "{last:?}");
    assert!(last.done >= 2, "one index per monthly partition: {last:?}");
    let hits = app
        .search_client()
        .await
        .search_similar(pb::SearchSimilarRequest {
            query: Some(pb::search_similar_request::Query::Text("crash looping".into())),
            top_k: 4,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .hits;
    assert_eq!(hits.len(), 4, "the rebuilt indexes serve searches");
}

#[tokio::test]
async fn job_requests_are_validated_and_starts_are_idempotent() {
    let app = spawn_app_with(job_settings, local_model()).await;
    let mut jobs = jobs_client(&app).await;

    let missing = jobs
        .get_job(pb::GetJobRequest {
            id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let bad = jobs.get_job(pb::GetJobRequest { id: "nope".into() }).await.unwrap_err();
    assert_eq!(violated_fields(&bad), ["id"]);
    let no_spec = jobs
        .start_job(pb::StartJobRequest {
            spec: None,
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&no_spec), ["spec"]);
    let unknown_model = jobs
        .start_job(start(pb::start_job_request::Spec::Reembed(pb::ReembedJob {
            model: "no-such-model".into(),
        })))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&unknown_model), ["reembed.model"]);
    let future = jobs
        .start_job(start(pb::start_job_request::Spec::Purge(pb::PurgeJob {
            older_than: Some(prost_types::Timestamp {
                seconds: (Utc::now() + TimeDelta::days(1)).timestamp(),
                nanos: 0,
            }),
        })))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&future), ["purge.older_than"]);

    let keyed = || pb::StartJobRequest {
        spec: Some(pb::start_job_request::Spec::BackfillEmbeddings(
            pb::BackfillEmbeddingsJob {},
        )),
        request_id: "nightly-backfill-1".into(),
    };
    let first = jobs.start_job(keyed()).await.unwrap().into_inner();
    let second = jobs.start_job(keyed()).await.unwrap().into_inner();
    assert_eq!(first.id, second.id, "the same request_id starts one job");
    watch_to_end(&mut jobs, &first.id).await;

    // Newest first, page by page, nothing repeated or skipped.
    let mut started = vec![first.id.clone()];
    for _ in 0..4 {
        let job = jobs
            .start_job(start(pb::start_job_request::Spec::BackfillEmbeddings(
                pb::BackfillEmbeddingsJob {},
            )))
            .await
            .unwrap()
            .into_inner();
        started.push(job.id);
    }
    started.reverse();
    let (mut listed, mut token) = (Vec::new(), String::new());
    loop {
        let page = jobs
            .list_jobs(pb::ListJobsRequest {
                states: vec![],
                r#type: String::new(),
                page_size: 2,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        listed.extend(page.jobs.into_iter().map(|j| j.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(listed, started);
    let tampered = jobs
        .list_jobs(pb::ListJobsRequest {
            states: vec![],
            r#type: String::new(),
            page_size: 2,
            page_token: "not-a-token".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&tampered), ["page_token"]);
}
