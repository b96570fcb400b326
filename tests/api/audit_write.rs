use std::sync::Arc;

use datastorage::{
    config::{FailurePolicy, ProviderKind},
    embedding::openai::{OpenAiEmbedder, OpenAiSettings},
    proto::v1::{self as pb, audit_event::Payload},
};
use tonic::Code;

use crate::helpers::*;

fn with_payload(payload: Payload) -> pb::AuditEvent {
    pb::AuditEvent {
        payload: Some(payload),
        ..remediation_event("rr-kinds")
    }
}

fn ai_analysis() -> pb::AiAnalysisAudit {
    pb::AiAnalysisAudit {
        root_cause: "memory leak in the session cache after the 2.3 rollout".into(),
        recommended_action: "scale_deployment".into(),
        confidence: 0.87,
        reasoning: "heap grows linearly with sessions".into(),
        model: "gpt-4o".into(),
    }
}

fn workflow() -> pb::WorkflowAudit {
    pb::WorkflowAudit {
        workflow_id: "wf-42".into(),
        step_name: "drain-node".into(),
        status: pb::ExecutionStatus::Succeeded as i32,
        duration: Some(prost_types::Duration { seconds: 12, nanos: 0 }),
        error_message: String::new(),
    }
}

fn execution() -> pb::ExecutionAudit {
    pb::ExecutionAudit {
        action_type: "restart_pod".into(),
        target: Some(pb::ResourceRef {
            kind: "Pod".into(),
            name: "api-7d9f".into(),
            namespace: "payments".into(),
        }),
        status: pb::ExecutionStatus::Succeeded as i32,
        duration: Some(prost_types::Duration {
            seconds: 3,
            nanos: 500_000_000,
        }),
        error_message: String::new(),
    }
}

fn custom(text: &str) -> pb::CustomAudit {
    pb::CustomAudit {
        event_type: "notification.sent".into(),
        action: "page".into(),
        outcome: "success".into(),
        data: Some(prost_types::Struct {
            fields: [(
                "channel".to_owned(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue("#oncall".into())),
                },
            )]
            .into(),
        }),
        text: text.into(),
    }
}

#[tokio::test]
async fn a_valid_event_of_each_kind_is_stored_with_its_incident_and_embedding() {
    let app = spawn_app().await;
    let mut client = app.audit_client().await;
    let events = [
        (remediation_event("rr-kinds"), pb::EmbeddingState::Generated),
        (
            with_payload(Payload::AiAnalysis(ai_analysis())),
            pb::EmbeddingState::Generated,
        ),
        (
            with_payload(Payload::Workflow(workflow())),
            pb::EmbeddingState::Generated,
        ),
        (
            with_payload(Payload::Execution(execution())),
            pb::EmbeddingState::Generated,
        ),
        (
            with_payload(Payload::Custom(custom("paged the on-call engineer"))),
            pb::EmbeddingState::Generated,
        ),
        (
            with_payload(Payload::Custom(custom(""))),
            pb::EmbeddingState::Unspecified,
        ),
    ];
    let mut incident_ids = Vec::new();
    for (event, expected_state) in events {
        let reply = client.write_audit(write(event)).await.expect("accepted").into_inner();
        assert_eq!(reply.embedding_state(), expected_state);
        assert_eq!(reply.write_state(), pb::WriteState::Committed);
        assert!(!reply.duplicate);
        uuid::Uuid::parse_str(&reply.event_id).expect("event id is a uuid");
        incident_ids.push(reply.incident_id);
    }
    incident_ids.dedup();
    assert_eq!(incident_ids.len(), 1, "one remediation request, one incident");

    assert_eq!(app.count("audit_events").await, 6);
    assert_eq!(app.count("stored_embeddings").await, 5);
    assert_eq!(app.count("pending_embeddings").await, 0);
    let (event_count, alert, root_cause, action, execution_status): (i64, String, String, String, i16) =
        sqlx::query_as(
            "SELECT event_count, alert_name, root_cause, action_type, execution_status FROM incidents \
             WHERE remediation_request_id = 'rr-kinds'",
        )
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(event_count, 6);
    assert_eq!(alert, "HighMemoryUsage");
    assert!(root_cause.starts_with("memory leak"));
    assert_eq!(action, "restart_pod");
    assert_eq!(execution_status, pb::ExecutionStatus::Succeeded as i16);
    let dims: i32 = sqlx::query_scalar("SELECT vector_dims(embedding) FROM stored_embeddings LIMIT 1")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(dims, 384);
}

type Mutation = fn(&mut pb::WriteAuditRequest);

fn event_of(r: &mut pb::WriteAuditRequest) -> &mut pb::AuditEvent {
    r.event.as_mut().unwrap()
}

fn remediation_of(r: &mut pb::WriteAuditRequest) -> &mut pb::RemediationAudit {
    match event_of(r).payload.as_mut().unwrap() {
        Payload::Remediation(rem) => rem,
        _ => unreachable!(),
    }
}

fn set_payload(r: &mut pb::WriteAuditRequest, payload: Payload) {
    event_of(r).payload = Some(payload);
}

fn nested_struct(depth: usize) -> prost_types::Struct {
    let mut inner = prost_types::Struct::default();
    for _ in 0..depth {
        inner = prost_types::Struct {
            fields: [(
                "n".to_owned(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StructValue(inner)),
                },
            )]
            .into(),
        };
    }
    inner
}

/// Every rule of the contract, each with the field path it must name.
fn rules() -> Vec<(&'static str, Mutation)> {
    vec![
        ("event", |r| r.event = None),
        ("event.correlation_id", |r| event_of(r).correlation_id.clear()),
        ("event.correlation_id", |r| event_of(r).correlation_id = "c".repeat(256)),
        ("event.remediation_request_id", |r| {
            event_of(r).remediation_request_id.clear()
        }),
        ("event.remediation_request_id", |r| {
            event_of(r).remediation_request_id = "r".repeat(256)
        }),
        ("event.occurred_at", |r| event_of(r).occurred_at = None),
        ("event.occurred_at", |r| {
            event_of(r).occurred_at = Some(timestamp_ago(-6 * 60))
        }),
        ("event.occurred_at", |r| {
            event_of(r).occurred_at = Some(prost_types::Timestamp { seconds: 0, nanos: -1 })
        }),
        ("event.namespace", |r| event_of(r).namespace.clear()),
        ("event.namespace", |r| event_of(r).namespace = "n".repeat(256)),
        ("event.cluster", |r| event_of(r).cluster = "c".repeat(256)),
        // PostgreSQL text cannot hold NUL: refused at the edge, not an internal error.
        ("event.namespace", |r| event_of(r).namespace = "pay\0ments".into()),
        ("event.labels[\"team\"]", |r| {
            event_of(r).labels = [("team".to_owned(), "a\0b".to_owned())].into()
        }),
        ("request_id", |r| r.request_id = "key\0".into()),
        ("event.labels", |r| {
            event_of(r).labels = (0..65).map(|i| (format!("k{i}"), "v".to_owned())).collect()
        }),
        (
            "event.labels[\"kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk\"]",
            |r| event_of(r).labels = [("k".repeat(64), "v".to_owned())].into(),
        ),
        ("event.labels[\"team\"]", |r| {
            event_of(r).labels = [("team".to_owned(), "v".repeat(256))].into()
        }),
        ("event.parent_event_id", |r| {
            event_of(r).parent_event_id = "not-a-uuid".into()
        }),
        ("event.parent_event_id", |r| {
            event_of(r).parent_event_id = uuid::Uuid::now_v7().to_string()
        }),
        ("event.payload", |r| event_of(r).payload = None),
        ("event.remediation.signal_type", |r| {
            remediation_of(r).signal_type.clear()
        }),
        ("event.remediation.signal_name", |r| {
            remediation_of(r).signal_name.clear()
        }),
        ("event.remediation.severity", |r| remediation_of(r).severity = 0),
        ("event.remediation.severity", |r| remediation_of(r).severity = 42),
        ("event.remediation.target", |r| remediation_of(r).target = None),
        ("event.remediation.target.kind", |r| {
            remediation_of(r).target.as_mut().unwrap().kind.clear()
        }),
        ("event.remediation.target.name", |r| {
            remediation_of(r).target.as_mut().unwrap().name.clear()
        }),
        ("event.remediation.phase", |r| remediation_of(r).phase = 0),
        ("event.remediation.message", |r| {
            remediation_of(r).message = "m".repeat(10 * 1024 + 1)
        }),
        ("event.remediation.completed_at", |r| {
            let rem = remediation_of(r);
            rem.started_at = Some(timestamp_ago(10));
            rem.completed_at = Some(timestamp_ago(20));
        }),
        ("event.ai_analysis.root_cause", |r| {
            set_payload(
                r,
                Payload::AiAnalysis(pb::AiAnalysisAudit {
                    root_cause: String::new(),
                    ..ai_analysis()
                }),
            )
        }),
        ("event.ai_analysis.root_cause", |r| {
            set_payload(
                r,
                Payload::AiAnalysis(pb::AiAnalysisAudit {
                    root_cause: "x".repeat(10 * 1024 + 1),
                    ..ai_analysis()
                }),
            )
        }),
        ("event.ai_analysis.recommended_action", |r| {
            set_payload(
                r,
                Payload::AiAnalysis(pb::AiAnalysisAudit {
                    recommended_action: String::new(),
                    ..ai_analysis()
                }),
            )
        }),
        ("event.ai_analysis.confidence", |r| {
            set_payload(
                r,
                Payload::AiAnalysis(pb::AiAnalysisAudit {
                    confidence: 1.5,
                    ..ai_analysis()
                }),
            )
        }),
        ("event.ai_analysis.confidence", |r| {
            set_payload(
                r,
                Payload::AiAnalysis(pb::AiAnalysisAudit {
                    confidence: f64::NAN,
                    ..ai_analysis()
                }),
            )
        }),
        ("event.ai_analysis.reasoning", |r| {
            set_payload(
                r,
                Payload::AiAnalysis(pb::AiAnalysisAudit {
                    reasoning: "x".repeat(10 * 1024 + 1),
                    ..ai_analysis()
                }),
            )
        }),
        ("event.workflow.workflow_id", |r| {
            set_payload(
                r,
                Payload::Workflow(pb::WorkflowAudit {
                    workflow_id: String::new(),
                    ..workflow()
                }),
            )
        }),
        ("event.workflow.step_name", |r| {
            set_payload(
                r,
                Payload::Workflow(pb::WorkflowAudit {
                    step_name: String::new(),
                    ..workflow()
                }),
            )
        }),
        ("event.workflow.status", |r| {
            set_payload(
                r,
                Payload::Workflow(pb::WorkflowAudit {
                    status: 0,
                    ..workflow()
                }),
            )
        }),
        ("event.workflow.duration", |r| {
            set_payload(
                r,
                Payload::Workflow(pb::WorkflowAudit {
                    duration: Some(prost_types::Duration { seconds: -1, nanos: 0 }),
                    ..workflow()
                }),
            )
        }),
        ("event.workflow.error_message", |r| {
            set_payload(
                r,
                Payload::Workflow(pb::WorkflowAudit {
                    error_message: "e".repeat(10 * 1024 + 1),
                    ..workflow()
                }),
            )
        }),
        ("event.execution.action_type", |r| {
            set_payload(
                r,
                Payload::Execution(pb::ExecutionAudit {
                    action_type: String::new(),
                    ..execution()
                }),
            )
        }),
        ("event.execution.target", |r| {
            set_payload(
                r,
                Payload::Execution(pb::ExecutionAudit {
                    target: None,
                    ..execution()
                }),
            )
        }),
        ("event.execution.status", |r| {
            set_payload(
                r,
                Payload::Execution(pb::ExecutionAudit {
                    status: 0,
                    ..execution()
                }),
            )
        }),
        ("event.execution.duration", |r| {
            set_payload(
                r,
                Payload::Execution(pb::ExecutionAudit {
                    duration: Some(prost_types::Duration { seconds: 0, nanos: -5 }),
                    ..execution()
                }),
            )
        }),
        ("event.custom.event_type", |r| {
            set_payload(
                r,
                Payload::Custom(pb::CustomAudit {
                    event_type: String::new(),
                    ..custom("")
                }),
            )
        }),
        ("event.custom.event_type", |r| {
            set_payload(
                r,
                Payload::Custom(pb::CustomAudit {
                    event_type: "e".repeat(101),
                    ..custom("")
                }),
            )
        }),
        ("event.custom.action", |r| {
            set_payload(
                r,
                Payload::Custom(pb::CustomAudit {
                    action: "a".repeat(51),
                    ..custom("")
                }),
            )
        }),
        ("event.custom.outcome", |r| {
            set_payload(
                r,
                Payload::Custom(pb::CustomAudit {
                    outcome: "o".repeat(21),
                    ..custom("")
                }),
            )
        }),
        ("event.custom.data", |r| {
            set_payload(
                r,
                Payload::Custom(pb::CustomAudit {
                    data: Some(nested_struct(11)),
                    ..custom("")
                }),
            )
        }),
        ("event.custom.data", |r| {
            let nul = prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue("a\0b".into())),
            };
            let data = prost_types::Struct {
                fields: [("note".to_owned(), nul)].into(),
            };
            set_payload(
                r,
                Payload::Custom(pb::CustomAudit {
                    data: Some(data),
                    ..custom("")
                }),
            )
        }),
        ("event.custom.data", |r| {
            let big = prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue("x".repeat(257 * 1024))),
            };
            let data = prost_types::Struct {
                fields: [("blob".to_owned(), big)].into(),
            };
            set_payload(
                r,
                Payload::Custom(pb::CustomAudit {
                    data: Some(data),
                    ..custom("")
                }),
            )
        }),
        ("event.custom.text", |r| {
            set_payload(
                r,
                Payload::Custom(pb::CustomAudit {
                    text: "t".repeat(10 * 1024 + 1),
                    ..custom("")
                }),
            )
        }),
        ("request_id", |r| r.request_id = "k".repeat(256)),
        ("embedding.values", |r| {
            r.embedding = Some(pb::Vector { values: vec![0.5; 383] })
        }),
        ("embedding.values[7]", |r| {
            let mut values = vec![0.5; 384];
            values[7] = f32::NAN;
            r.embedding = Some(pb::Vector { values })
        }),
        ("embedding.values[0]", |r| {
            let mut values = vec![0.5; 384];
            values[0] = f32::INFINITY;
            r.embedding = Some(pb::Vector { values })
        }),
        ("embedding.values", |r| {
            r.embedding = Some(pb::Vector { values: vec![0.0; 384] })
        }),
    ]
}

#[tokio::test]
async fn each_validation_rule_rejects_with_the_field_that_broke_it() {
    let app = spawn_app().await;
    let mut client = app.audit_client().await;
    for (index, (field, mutate)) in rules().into_iter().enumerate() {
        let mut request = write(remediation_event("rr-invalid"));
        mutate(&mut request);
        let status = client
            .write_audit(request.clone())
            .await
            .expect_err(&format!("rule {index} ({field}) rejects"));
        assert_eq!(violated_fields(&status), vec![field.to_owned()], "rule {index}");
        assert!(
            !status.message().to_lowercase().contains("select"),
            "{}",
            status.message()
        );

        // The same rule inside a batch names the item.
        let batch = pb::BatchWriteAuditRequest {
            requests: vec![write(remediation_event("rr-ok")), request],
        };
        let status = client.batch_write_audit(batch).await.expect_err("batch rejects");
        assert_eq!(
            violated_fields(&status),
            vec![format!("requests[1].{field}")],
            "rule {index} in a batch"
        );
    }
    assert_eq!(
        app.count("audit_events").await,
        0,
        "nothing invalid, and no partial batch, was stored"
    );
}

#[tokio::test]
async fn batches_hold_one_to_a_thousand_requests() {
    let app = spawn_app().await;
    let mut client = app.audit_client().await;
    let status = client
        .batch_write_audit(pb::BatchWriteAuditRequest { requests: vec![] })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["requests"]);
    let too_many = (0..1001)
        .map(|i| write(remediation_event(&format!("rr-{i}"))))
        .collect();
    let status = client
        .batch_write_audit(pb::BatchWriteAuditRequest { requests: too_many })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["requests"]);
}

#[tokio::test]
async fn a_batch_commits_in_request_order_and_a_parent_may_precede_its_child() {
    let app = spawn_app().await;
    let mut client = app.audit_client().await;
    let first = client
        .write_audit(write(remediation_event("rr-parent")))
        .await
        .unwrap()
        .into_inner();
    let mut child = remediation_event("rr-parent");
    child.parent_event_id = first.event_id.clone();
    let mut vector = vec![0.0f32; 384];
    vector[3] = 1.0;
    let requests = vec![
        pb::WriteAuditRequest {
            embedding: Some(pb::Vector { values: vector }),
            ..write(child)
        },
        write(remediation_event("rr-other")),
    ];
    let replies = client
        .batch_write_audit(pb::BatchWriteAuditRequest { requests })
        .await
        .unwrap()
        .into_inner()
        .responses;
    assert_eq!(replies.len(), 2);
    assert_eq!(replies[0].embedding_state(), pb::EmbeddingState::Provided);
    assert_eq!(replies[0].incident_id, first.incident_id);
    assert_ne!(replies[1].incident_id, first.incident_id);
    let parent: uuid::Uuid = sqlx::query_scalar("SELECT parent_event_id FROM audit_events WHERE id = $1")
        .bind(uuid::Uuid::parse_str(&replies[0].event_id).unwrap())
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(parent.to_string(), first.event_id);
}

#[tokio::test]
async fn repeated_texts_come_from_the_cache() {
    let app = spawn_app().await;
    let mut client = app.audit_client().await;
    let first = client
        .write_audit(write(remediation_event("rr-cache-1")))
        .await
        .unwrap()
        .into_inner();
    let second = client
        .write_audit(write(remediation_event("rr-cache-2")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.embedding_state(), pb::EmbeddingState::Generated);
    assert_eq!(second.embedding_state(), pb::EmbeddingState::Cached);
    let distinct: i64 = sqlx::query_scalar("SELECT count(DISTINCT embedding::text) FROM stored_embeddings")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(distinct, 1, "the cached vector is the generated one");
}

#[tokio::test]
async fn an_idempotent_retry_returns_the_original_answer_and_writes_nothing() {
    let app = spawn_app().await;
    let mut client = app.audit_client().await;
    let request = pb::WriteAuditRequest {
        request_id: "retry-1".into(),
        ..write(remediation_event("rr-idem"))
    };
    let original = client.write_audit(request.clone()).await.unwrap().into_inner();
    let retry = client.write_audit(request.clone()).await.unwrap().into_inner();
    assert!(!original.duplicate);
    assert!(retry.duplicate);
    assert_eq!(retry.event_id, original.event_id);
    assert_eq!(retry.incident_id, original.incident_id);
    assert_eq!(retry.embedding_state, original.embedding_state);
    assert_eq!(app.count("audit_events").await, 1);
    let event_count: i64 = sqlx::query_scalar("SELECT event_count FROM incidents")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(event_count, 1);

    // Same key, different event.
    let mut other = request.clone();
    event_of(&mut other).namespace = "another".into();
    let status = client.write_audit(other).await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert_eq!(app.count("audit_events").await, 1);

    // A batch retried as a whole: its keyed items are duplicates, the rest is new.
    let batch = pb::BatchWriteAuditRequest {
        requests: vec![request.clone(), write(remediation_event("rr-idem-2"))],
    };
    let replies = client.batch_write_audit(batch).await.unwrap().into_inner().responses;
    assert!(replies[0].duplicate);
    assert_eq!(replies[0].event_id, original.event_id);
    assert!(!replies[1].duplicate);
    assert_eq!(app.count("audit_events").await, 2);
}

#[tokio::test]
async fn concurrent_retries_with_one_key_write_exactly_once() {
    let app = spawn_app().await;
    let request = pb::WriteAuditRequest {
        request_id: "race".into(),
        ..write(remediation_event("rr-race"))
    };
    let mut calls = Vec::new();
    for _ in 0..8 {
        let mut client = app.audit_client().await;
        let request = request.clone();
        calls.push(tokio::spawn(async move {
            client.write_audit(request).await.unwrap().into_inner()
        }));
    }
    let mut replies = Vec::new();
    for call in calls {
        replies.push(call.await.unwrap());
    }
    assert_eq!(replies.iter().filter(|r| !r.duplicate).count(), 1);
    assert!(replies.iter().all(|r| r.event_id == replies[0].event_id));
    assert_eq!(app.count("audit_events").await, 1);
}

/// "Break the schema": a trigger makes the embedding insert fail inside the
/// transaction; the event, its incident and its idempotency key must vanish with it.
#[tokio::test]
async fn a_failing_embedding_insert_leaves_no_event_incident_or_key() {
    let app = spawn_app().await;
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_embeddings() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN RAISE EXCEPTION 'embedding insert refused by test'; END $$; \
         CREATE TRIGGER refuse_embeddings BEFORE INSERT ON fresh_embeddings \
         FOR EACH ROW EXECUTE FUNCTION refuse_embeddings();",
    )
    .execute(&app.db)
    .await
    .unwrap();
    let mut client = app.audit_client().await;
    let request = pb::WriteAuditRequest {
        request_id: "atomic-1".into(),
        ..write(remediation_event("rr-atomic"))
    };
    let status = client.write_audit(request).await.unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    assert!(
        !status.message().contains("refused"),
        "no internals leak: {}",
        status.message()
    );

    let batch = pb::BatchWriteAuditRequest {
        requests: vec![
            write(with_payload(Payload::Custom(custom("")))),
            write(remediation_event("rr-atomic-2")),
        ],
    };
    assert_eq!(
        client.batch_write_audit(batch).await.unwrap_err().code(),
        Code::Internal
    );

    for table in [
        "audit_events",
        "incidents",
        "idempotency_keys",
        "stored_embeddings",
        "pending_embeddings",
    ] {
        assert_eq!(app.count(table).await, 0, "{table} is empty");
    }
}

/// A real HTTP provider pointed at a port nothing listens on.
fn unreachable_provider() -> Arc<dyn datastorage::embedding::EmbeddingProvider> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    Arc::new(
        OpenAiEmbedder::new(OpenAiSettings {
            base_url: format!("http://127.0.0.1:{port}"),
            model: "unreachable-embedder".into(),
            dimensions: 384,
            max_retries: 1,
            initial_backoff_ms: 1,
            timeout_ms: 2_000,
            ..OpenAiSettings::default()
        })
        .unwrap(),
    )
}

#[tokio::test]
async fn defer_policy_stores_the_event_with_a_pending_marker() {
    let app = spawn_app_with(
        |s| {
            s.embedding.provider = ProviderKind::Openai;
            s.embedding.failure_policy = FailurePolicy::Defer;
        },
        unreachable_provider(),
    )
    .await;
    let mut client = app.audit_client().await;
    let reply = client
        .write_audit(write(remediation_event("rr-defer")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.embedding_state(), pb::EmbeddingState::Deferred);
    assert_eq!(app.count("audit_events").await, 1);
    assert_eq!(app.count("incidents").await, 1);
    assert_eq!(app.count("stored_embeddings").await, 0);
    let (pending_event, state): (uuid::Uuid, i16) = sqlx::query_as(
        "SELECT p.event_id, e.embedding_state FROM pending_embeddings p JOIN audit_events e ON e.id = p.event_id",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(pending_event.to_string(), reply.event_id);
    assert_eq!(state, pb::EmbeddingState::Deferred as i16);

    // A caller-supplied vector needs no provider.
    let mut values = vec![0.1f32; 384];
    values[0] = 0.9;
    let provided = client
        .write_audit(pb::WriteAuditRequest {
            embedding: Some(pb::Vector { values }),
            ..write(remediation_event("rr-defer-2"))
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(provided.embedding_state(), pb::EmbeddingState::Provided);
}

#[tokio::test]
async fn reject_policy_writes_nothing_and_answers_unavailable() {
    let app = spawn_app_with(
        |s| {
            s.embedding.provider = ProviderKind::Openai;
            s.embedding.failure_policy = FailurePolicy::Reject;
        },
        unreachable_provider(),
    )
    .await;
    let mut client = app.audit_client().await;
    let status = client
        .write_audit(write(remediation_event("rr-reject")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    for table in ["audit_events", "incidents", "pending_embeddings", "stored_embeddings"] {
        assert_eq!(app.count(table).await, 0, "{table} is empty");
    }
}

#[tokio::test]
async fn events_in_different_months_land_in_their_own_partitions() {
    let app = spawn_app().await;
    let mut client = app.audit_client().await;
    let mut old = remediation_event("rr-old");
    old.occurred_at = Some(prost_types::Timestamp {
        seconds: 946_684_800,
        nanos: 0,
    }); // 2000-01-01
    client.write_audit(write(old)).await.unwrap();
    client.write_audit(write(remediation_event("rr-now"))).await.unwrap();
    let partitions: i64 = sqlx::query_scalar("SELECT count(DISTINCT tableoid) FROM audit_events")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(partitions, 2);
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('audit_events_2000_01') IS NOT NULL")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert!(exists);
}
