//! How a job looks: a table, with a line for its error or result, for people;
//! one JSON object per job for machines.
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Map, Value};
use tonic::Code;

use super::client::code_name;
use crate::proto::v1::{Job, JobState};

/// `running` for JOB_STATE_RUNNING: the name `--state` takes and both outputs print.
pub fn state_name(state: i32) -> String {
    match JobState::try_from(state) {
        Ok(state) => state
            .as_str_name()
            .trim_start_matches("JOB_STATE_")
            .to_ascii_lowercase(),
        Err(_) => format!("unknown({state})"),
    }
}

/// Jobs as an aligned table; a failed job's error and a finished job's result
/// follow its row, indented.
pub fn table(jobs: &[Job]) -> String {
    const HEADER: [&str; 6] = ["ID", "TYPE", "STATE", "PROGRESS", "DONE/TOTAL", "CREATED"];
    let rows: Vec<[String; 6]> = jobs
        .iter()
        .map(|job| {
            [
                job.id.clone(),
                job.r#type.clone(),
                state_name(job.state),
                format!("{}%", job.progress_percent),
                format!("{}/{}", job.done, job.total),
                job.created_at.as_ref().map_or_else(|| "-".to_owned(), human_time),
            ]
        })
        .collect();
    let mut widths = HEADER.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &[&str]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        padded.join("  ").trim_end().to_owned()
    };
    let mut lines = vec![line(&HEADER)];
    for (job, row) in jobs.iter().zip(&rows) {
        lines.push(line(&row.each_ref().map(String::as_str)));
        lines.extend(details(job).into_iter().map(|detail| format!("  {detail}")));
    }
    lines.join("\n")
}

/// `error: CODE: message` when the job carries one; `result: k=v, …` once it
/// has ended with one.
fn details(job: &Job) -> Vec<String> {
    let mut lines = Vec::new();
    if let Some(error) = job.error.as_ref().filter(|e| e.code != Code::Ok as i32) {
        lines.push(format!(
            "error: {}: {}",
            code_name(Code::from_i32(error.code)),
            error.message
        ));
    }
    let result = job.result.as_ref().map(struct_json).unwrap_or_default();
    if ended(job) && !result.is_empty() {
        let pairs: Vec<String> = result
            .iter()
            .map(|(key, value)| match value {
                Value::String(text) => format!("{key}={text}"),
                other => format!("{key}={other}"),
            })
            .collect();
        lines.push(format!("result: {}", pairs.join(", ")));
    }
    lines
}

fn ended(job: &Job) -> bool {
    matches!(
        job.state(),
        JobState::Succeeded | JobState::Failed | JobState::Cancelled
    )
}

/// One line per change while watching without a terminal:
/// `updated_at  id  state  42%  420/1000`.
pub fn progress_line(job: &Job) -> String {
    format!(
        "{}  {}  {}  {}%  {}/{}",
        job.updated_at.as_ref().map_or_else(|| "-".to_owned(), human_time),
        job.id,
        state_name(job.state),
        job.progress_percent,
        job.done,
        job.total
    )
}

/// A job as one JSON object: proto field names, the state as `state_name`
/// prints it, timestamps in RFC 3339 (null when unset), the result as the
/// object the job produced, the error as `{code, status, message}`.
pub fn job_json(job: &Job) -> Value {
    // Every field by name, so a field added to the contract breaks the build here.
    let Job {
        id,
        r#type,
        state,
        progress_percent,
        done,
        total,
        result,
        error,
        created_by,
        created_at,
        started_at,
        updated_at,
        finished_at,
        expires_at,
    } = job;
    json!({
        "id": id,
        "type": r#type,
        "state": state_name(*state),
        "progress_percent": progress_percent,
        "done": done,
        "total": total,
        "result": result.as_ref().map(struct_json).unwrap_or_default(),
        "error": error.as_ref().map(|e| json!({
            "code": e.code,
            "status": code_name(Code::from_i32(e.code)),
            "message": e.message,
        })),
        "created_by": created_by,
        "created_at": created_at.as_ref().map(json_time),
        "started_at": started_at.as_ref().map(json_time),
        "updated_at": updated_at.as_ref().map(json_time),
        "finished_at": finished_at.as_ref().map(json_time),
        "expires_at": expires_at.as_ref().map(json_time),
    })
}

/// A page of `list`: `{"jobs": [...], "next_page_token": "..."}`.
pub fn list_json(jobs: &[Job], next_page_token: &str) -> Value {
    json!({
        "jobs": jobs.iter().map(job_json).collect::<Vec<_>>(),
        "next_page_token": next_page_token,
    })
}

/// None for a timestamp out of chrono's range or with invalid nanos.
fn datetime(timestamp: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(timestamp.seconds, u32::try_from(timestamp.nanos).ok()?)
}

/// Seconds are enough to read; `-` for a timestamp no clock can show.
fn human_time(timestamp: &prost_types::Timestamp) -> String {
    datetime(timestamp).map_or_else(|| "-".to_owned(), |t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
}

/// As protobuf's JSON mapping writes a Timestamp: Z, and 0, 3, 6 or 9 fractional digits.
fn json_time(timestamp: &prost_types::Timestamp) -> Value {
    datetime(timestamp).map_or(Value::Null, |t| {
        Value::String(t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
    })
}

fn struct_json(data: &prost_types::Struct) -> Map<String, Value> {
    data.fields
        .iter()
        .map(|(key, value)| (key.clone(), value_json(value)))
        .collect()
}

fn value_json(value: &prost_types::Value) -> Value {
    use prost_types::value::Kind;
    match &value.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::NumberValue(n)) => number_json(*n),
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::StructValue(s)) => Value::Object(struct_json(s)),
        Some(Kind::ListValue(list)) => Value::Array(list.values.iter().map(value_json).collect()),
    }
}

/// Struct numbers are doubles; counts read better as `10` than `10.0`.
fn number_json(n: f64) -> Value {
    // Within ±2^53 every integer is exact, so the cast loses nothing.
    const EXACT: f64 = 9_007_199_254_740_992.0;
    if n.fract() == 0.0 && n.abs() <= EXACT {
        Value::from(n as i64)
    } else {
        // JSON has no NaN or infinity.
        serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use prost_types::{value::Kind, Struct, Timestamp};
    use tonic_types::pb::Status;

    use super::*;

    fn number(n: f64) -> prost_types::Value {
        prost_types::Value {
            kind: Some(Kind::NumberValue(n)),
        }
    }

    /// A running job, 420 of 1000 done, created at 2026-11-23T15:09:28Z.
    pub fn running_job() -> Job {
        Job {
            id: "0195f1c2-7a3b-7c4d-8e5f-0123456789ab".into(),
            r#type: "backfill_embeddings".into(),
            state: JobState::Running as i32,
            progress_percent: 42,
            done: 420,
            total: 1000,
            result: None,
            error: None,
            created_by: "anonymous".into(),
            created_at: Some(Timestamp {
                seconds: 1_795_446_568,
                nanos: 0,
            }),
            started_at: Some(Timestamp {
                seconds: 1_795_446_569,
                nanos: 500_000_000,
            }),
            updated_at: Some(Timestamp {
                seconds: 1_795_446_570,
                nanos: 0,
            }),
            finished_at: None,
            expires_at: None,
        }
    }

    pub fn failed_job() -> Job {
        Job {
            state: JobState::Failed as i32,
            error: Some(Status {
                code: Code::FailedPrecondition as i32,
                message: "model e5-large is not configured".into(),
                details: vec![],
            }),
            ..running_job()
        }
    }

    pub fn succeeded_job() -> Job {
        Job {
            state: JobState::Succeeded as i32,
            progress_percent: 100,
            done: 1000,
            result: Some(Struct {
                fields: [
                    ("embedded".to_owned(), number(1000.0)),
                    (
                        "model".to_owned(),
                        prost_types::Value {
                            kind: Some(Kind::StringValue("all-MiniLM-L6-v2".into())),
                        },
                    ),
                ]
                .into(),
            }),
            finished_at: Some(Timestamp {
                seconds: 1_795_446_600,
                nanos: 0,
            }),
            ..running_job()
        }
    }

    #[test]
    fn a_job_renders_as_one_json_object() {
        assert_eq!(
            job_json(&running_job()),
            json!({
                "id": "0195f1c2-7a3b-7c4d-8e5f-0123456789ab",
                "type": "backfill_embeddings",
                "state": "running",
                "progress_percent": 42,
                "done": 420,
                "total": 1000,
                "result": {},
                "error": null,
                "created_by": "anonymous",
                "created_at": "2026-11-23T15:09:28Z",
                "started_at": "2026-11-23T15:09:29.500Z",
                "updated_at": "2026-11-23T15:09:30Z",
                "finished_at": null,
                "expires_at": null,
            })
        );
    }

    #[test]
    fn a_failure_renders_its_status_by_number_and_name() {
        let json = job_json(&failed_job());
        assert_eq!(json["state"], "failed");
        assert_eq!(
            json["error"],
            json!({"code": 9, "status": "FAILED_PRECONDITION", "message": "model e5-large is not configured"})
        );
    }

    #[test]
    fn a_result_keeps_its_shape_with_whole_numbers_as_integers() {
        let mut job = succeeded_job();
        job.result
            .as_mut()
            .unwrap()
            .fields
            .extend([("ratio".to_owned(), number(0.25)), ("nan".to_owned(), number(f64::NAN))]);
        assert_eq!(
            job_json(&job)["result"],
            json!({"embedded": 1000, "model": "all-MiniLM-L6-v2", "ratio": 0.25, "nan": null})
        );
    }

    #[test]
    fn a_list_page_carries_its_jobs_and_token() {
        let json = list_json(&[running_job(), failed_job()], "next");
        assert_eq!(json["jobs"].as_array().unwrap().len(), 2);
        assert_eq!(json["jobs"][1]["state"], "failed");
        assert_eq!(json["next_page_token"], "next");
    }

    #[test]
    fn state_names_are_the_short_lowercase_enum_names() {
        assert_eq!(state_name(JobState::Pending as i32), "pending");
        assert_eq!(state_name(JobState::Cancelled as i32), "cancelled");
        assert_eq!(state_name(42), "unknown(42)");
    }

    #[test]
    fn the_table_aligns_columns_and_adds_errors_and_results() {
        let expected = [
            "ID                                    TYPE                 STATE      PROGRESS  DONE/TOTAL  CREATED",
            "0195f1c2-7a3b-7c4d-8e5f-0123456789ab  backfill_embeddings  running    42%       420/1000    2026-11-23T15:09:28Z",
            "0195f1c2-7a3b-7c4d-8e5f-0123456789ab  backfill_embeddings  failed     42%       420/1000    2026-11-23T15:09:28Z",
            "  error: FAILED_PRECONDITION: model e5-large is not configured",
            "0195f1c2-7a3b-7c4d-8e5f-0123456789ab  backfill_embeddings  succeeded  100%      1000/1000   2026-11-23T15:09:28Z",
            "  result: embedded=1000, model=all-MiniLM-L6-v2",
        ]
        .join("\n");
        assert_eq!(table(&[running_job(), failed_job(), succeeded_job()]), expected);
    }

    #[test]
    fn a_progress_line_says_when_and_how_far() {
        assert_eq!(
            progress_line(&running_job()),
            "2026-11-23T15:09:30Z  0195f1c2-7a3b-7c4d-8e5f-0123456789ab  running  42%  420/1000"
        );
    }
}
