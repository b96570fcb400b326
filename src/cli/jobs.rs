//! `datastorage jobs start|get|list|cancel|watch`: maintenance jobs on a
//! running server, through its JobStatus service.
use std::{
    io::{IsTerminal, Write},
    process::ExitCode,
    time::{Duration, SystemTime},
};

use chrono::{DateTime, Datelike, TimeDelta, Utc};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use tonic::{service::interceptor::InterceptedService, transport::Channel};

use super::{
    client::{unary, Bearer, CliError, ServerArgs},
    render,
};
use crate::proto::v1::{self as pb, job_status_client::JobStatusClient, start_job_request::Spec, Job, JobState};

type Client = JobStatusClient<InterceptedService<Channel, Bearer>>;

const EXIT_STATUS_HELP: &str = "\
Exit status:
  0  the request succeeded; for `watch` and `start --watch`, the job SUCCEEDED
  1  the request failed: the server is unreachable or answered with a gRPC error
  2  the command line is invalid
  3  the watched job FAILED
  4  the watched job was CANCELLED";

const EXIT_OK: u8 = 0;
const EXIT_ERROR: u8 = 1;
const EXIT_FAILED: u8 = 3;
const EXIT_CANCELLED: u8 = 4;

#[derive(Debug, Args)]
#[command(after_help = EXIT_STATUS_HELP)]
pub struct JobsArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Print JSON instead of a table: one object per job, one line each (`list`
    /// prints one object with `jobs` and `next_page_token`).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: JobsCommand,
}

#[derive(Debug, Subcommand)]
enum JobsCommand {
    /// Start a job and print it; with --watch, follow it until it ends.
    #[command(after_help = EXIT_STATUS_HELP)]
    Start(StartArgs),
    /// Print a job.
    Get {
        /// The job's id, as `start` and `list` print it.
        id: String,
    },
    /// List jobs, newest first, a page at a time unless --all.
    List(ListArgs),
    /// Ask the server to cancel a job, and print the job.
    Cancel {
        /// The job's id.
        id: String,
    },
    /// Follow a job until it ends: a progress bar on a terminal, a line per
    /// change otherwise (every update with --json).
    #[command(after_help = EXIT_STATUS_HELP)]
    Watch {
        /// The job's id.
        id: String,
    },
}

#[derive(Debug, Args)]
struct StartArgs {
    #[command(subcommand)]
    job: JobKind,
    /// Idempotency key: a retry with the same key returns the job the first
    /// request started instead of starting another.
    #[arg(long, global = true, value_name = "KEY")]
    request_id: Option<String>,
    /// After starting, follow the job until it ends (as `watch` does).
    #[arg(long, global = true)]
    watch: bool,
}

#[derive(Debug, Subcommand)]
enum JobKind {
    /// Embed every event whose embedding was deferred.
    BackfillEmbeddings,
    /// Embed every event again with another configured model.
    Reembed {
        /// The configured model to embed with.
        #[arg(long)]
        model: String,
    },
    /// Delete events, embeddings and incidents older than a cut-off.
    Purge {
        /// The cut-off: an RFC 3339 timestamp (2025-01-31T00:00:00Z), or a
        /// duration back from now on this machine's clock: 90d, 12h, 30m, 45s, 2w.
        #[arg(long, value_name = "WHEN", value_parser = older_than)]
        older_than: DateTime<Utc>,
    },
    /// Rebuild a model's vector index.
    Reindex {
        /// The model whose index to rebuild.
        #[arg(long)]
        model: String,
    },
}

impl JobKind {
    fn spec(self) -> Spec {
        match self {
            JobKind::BackfillEmbeddings => Spec::BackfillEmbeddings(pb::BackfillEmbeddingsJob {}),
            JobKind::Reembed { model } => Spec::Reembed(pb::ReembedJob { model }),
            JobKind::Purge { older_than } => Spec::Purge(pb::PurgeJob {
                older_than: Some(SystemTime::from(older_than).into()),
            }),
            JobKind::Reindex { model } => Spec::Reindex(pb::ReindexJob { model }),
        }
    }
}

#[derive(Debug, Args)]
struct ListArgs {
    /// Only jobs in this state: pending, running, succeeded, failed or
    /// cancelled. Repeat it, or separate states with commas, for several.
    #[arg(long = "state", value_name = "STATE", value_parser = job_state, value_delimiter = ',')]
    states: Vec<JobState>,
    /// Only jobs of this type: backfill_embeddings, reembed, purge or reindex.
    #[arg(long = "type", value_name = "TYPE", value_parser = job_type)]
    job_type: Option<String>,
    /// Jobs per page; the server's default when unset.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..))]
    page_size: Option<i32>,
    /// Continue from the next_page_token of an earlier page.
    #[arg(long, value_name = "TOKEN")]
    page_token: Option<String>,
    /// Follow next_page_token to the last page and print every job at once.
    #[arg(long)]
    all: bool,
}

/// Runs a `jobs` subcommand; failures are one line on stderr. The exit
/// status is as `EXIT_STATUS_HELP` says.
pub async fn run(args: JobsArgs) -> ExitCode {
    match execute(args).await {
        Ok(status) => ExitCode::from(status),
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

async fn execute(args: JobsArgs) -> Result<u8, CliError> {
    let JobsArgs { server, json, command } = args;
    let bearer = server.bearer()?;
    let mut client = JobStatusClient::with_interceptor(server.channel().await?, bearer);
    let show = |job: &Job| {
        if json {
            print(&render::job_json(job).to_string())
        } else {
            print(&render::table(std::slice::from_ref(job)))
        }
    };
    match command {
        JobsCommand::Start(StartArgs {
            job,
            request_id,
            watch: follow,
        }) => {
            let request = pb::StartJobRequest {
                spec: Some(job.spec()),
                request_id: request_id.unwrap_or_default(),
            };
            let job = client.start_job(unary(request)).await?.into_inner();
            show(&job)?;
            if !follow {
                return Ok(EXIT_OK);
            }
            // A retried request_id can return a job that has already ended.
            match exit_status(job.state()) {
                Some(status) => Ok(status),
                None => watch(&mut client, job.id.clone(), Some(job), json).await,
            }
        }
        JobsCommand::Get { id } => {
            let job = client.get_job(unary(pb::GetJobRequest { id })).await?.into_inner();
            show(&job)?;
            Ok(EXIT_OK)
        }
        JobsCommand::List(args) => list(&mut client, args, json).await,
        JobsCommand::Cancel { id } => {
            let job = client
                .cancel_job(unary(pb::CancelJobRequest { id }))
                .await?
                .into_inner();
            show(&job)?;
            Ok(EXIT_OK)
        }
        JobsCommand::Watch { id } => watch(&mut client, id, None, json).await,
    }
}

async fn list(client: &mut Client, args: ListArgs, json: bool) -> Result<u8, CliError> {
    let ListArgs {
        states,
        job_type,
        page_size,
        page_token,
        all,
    } = args;
    let mut request = pb::ListJobsRequest {
        states: states.into_iter().map(i32::from).collect(),
        r#type: job_type.unwrap_or_default(),
        page_size: page_size.unwrap_or_default(),
        page_token: page_token.unwrap_or_default(),
    };
    let mut jobs = Vec::new();
    let next_page_token = loop {
        let page = client.list_jobs(unary(request.clone())).await?.into_inner();
        jobs.extend(page.jobs);
        if !all || page.next_page_token.is_empty() {
            break page.next_page_token;
        }
        request.page_token = page.next_page_token;
    };
    if json {
        print(&render::list_json(&jobs, &next_page_token).to_string())?;
    } else if jobs.is_empty() {
        print("no jobs")?;
    } else {
        print(&render::table(&jobs))?;
    }
    if !json && !next_page_token.is_empty() {
        print(&format!("more: --page-token {next_page_token}"))?;
    }
    Ok(EXIT_OK)
}

/// Follows a job until it ends; `seen` is a state already printed (by `start`).
async fn watch(client: &mut Client, id: String, seen: Option<Job>, json: bool) -> Result<u8, CliError> {
    let mut updates = client
        .watch_job(pb::WatchJobRequest { id: id.clone() })
        .await?
        .into_inner();
    let mut display = if json {
        WatchDisplay::Json {
            last: seen.map(Box::new),
        }
    } else if std::io::stderr().is_terminal() {
        WatchDisplay::Bar(None)
    } else {
        WatchDisplay::Lines { last: None }
    };
    let mut last_state = None;
    while let Some(job) = updates.message().await? {
        if let Some(line) = display.update(&job) {
            print(&line)?;
        }
        if let Some(status) = exit_status(job.state()) {
            if let Some(summary) = display.finish(&job) {
                print(&summary)?;
            }
            return Ok(status);
        }
        last_state = Some(job.state);
    }
    Err(CliError::WatchEnded {
        id,
        last_state: last_state.map_or_else(|| "none received".to_owned(), render::state_name),
    })
}

/// The exit status a job's end means, or None while it has not ended.
fn exit_status(state: JobState) -> Option<u8> {
    match state {
        JobState::Succeeded => Some(EXIT_OK),
        JobState::Failed => Some(EXIT_FAILED),
        JobState::Cancelled => Some(EXIT_CANCELLED),
        JobState::Unspecified | JobState::Pending | JobState::Running => None,
    }
}

const BAR_TEMPLATE: &str = "{spinner} {prefix} [{bar:30}] {msg} ({elapsed})";

/// How `watch` shows updates. Each method returns what to print on stdout;
/// the bar draws itself on stderr.
enum WatchDisplay {
    /// Every update as a JSON line, but never the same job twice in a row.
    Json { last: Option<Box<Job>> },
    /// A line when the state or the percentage changes, so a log of a long
    /// job stays short.
    Lines { last: Option<(i32, i32)> },
    /// Drawn on stderr from the first update on.
    Bar(Option<ProgressBar>),
}

impl WatchDisplay {
    fn update(&mut self, job: &Job) -> Option<String> {
        match self {
            WatchDisplay::Json { last } => {
                if last.as_deref() == Some(job) {
                    return None;
                }
                *last = Some(Box::new(job.clone()));
                Some(render::job_json(job).to_string())
            }
            WatchDisplay::Lines { last } => {
                let key = (job.state, job.progress_percent);
                if *last == Some(key) {
                    return None;
                }
                *last = Some(key);
                Some(render::progress_line(job))
            }
            WatchDisplay::Bar(bar) => {
                let position = job.progress_percent.clamp(0, 100).unsigned_abs().into();
                let message = format!(
                    "{}% {}/{} {}",
                    job.progress_percent,
                    job.done,
                    job.total,
                    render::state_name(job.state)
                );
                match bar {
                    Some(bar) => {
                        bar.set_position(position);
                        bar.set_message(message);
                    }
                    None => {
                        let style =
                            ProgressStyle::with_template(BAR_TEMPLATE).expect("BAR_TEMPLATE is a valid template");
                        let new = ProgressBar::new(100)
                            .with_style(style.progress_chars("=> "))
                            .with_prefix(job.r#type.clone())
                            .with_position(position)
                            .with_message(message);
                        new.enable_steady_tick(Duration::from_millis(120));
                        *bar = Some(new);
                    }
                }
                None
            }
        }
    }

    /// After the job's last update: people get its row with the error or
    /// result; JSON readers already have the last object.
    fn finish(self, job: &Job) -> Option<String> {
        match self {
            WatchDisplay::Json { .. } => None,
            WatchDisplay::Lines { .. } => Some(render::table(std::slice::from_ref(job))),
            WatchDisplay::Bar(bar) => {
                if let Some(bar) = bar {
                    bar.finish_and_clear();
                }
                Some(render::table(std::slice::from_ref(job)))
            }
        }
    }
}

fn print(text: &str) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")?;
    out.flush()?;
    Ok(())
}

/// `--older-than`, resolved against the clock as the command line is parsed.
fn older_than(value: &str) -> Result<DateTime<Utc>, String> {
    cutoff(value, Utc::now())
}

/// An RFC 3339 timestamp, or `<n><unit>` (w, d, h, m, s) back from `now`.
fn cutoff(value: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    if let Ok(at) = DateTime::parse_from_rfc3339(value) {
        return Ok(at.with_timezone(&Utc));
    }
    let invalid = || {
        format!(
            "expected an RFC 3339 timestamp such as 2025-01-31T00:00:00Z, \
             or a duration such as 90d or 12h (units: w, d, h, m, s); got {value:?}"
        )
    };
    let digits = value.find(|c: char| !c.is_ascii_digit()).ok_or_else(invalid)?;
    let (amount, unit) = value.split_at(digits);
    let amount: i64 = amount.parse().map_err(|_| invalid())?;
    if amount == 0 {
        return Err("a duration must be longer than zero".to_owned());
    }
    let span = match unit {
        "w" => TimeDelta::try_weeks(amount),
        "d" => TimeDelta::try_days(amount),
        "h" => TimeDelta::try_hours(amount),
        "m" => TimeDelta::try_minutes(amount),
        "s" => TimeDelta::try_seconds(amount),
        _ => return Err(invalid()),
    };
    span.and_then(|span| now.checked_sub_signed(span))
        // A protobuf Timestamp starts at 0001-01-01.
        .filter(|at| at.year() >= 1)
        .ok_or_else(|| format!("{value} reaches back before the year 1"))
}

/// `running`, `RUNNING` or `JOB_STATE_RUNNING`.
fn job_state(value: &str) -> Result<JobState, String> {
    let name = value.trim().to_ascii_uppercase();
    let name = if name.starts_with("JOB_STATE_") {
        name
    } else {
        format!("JOB_STATE_{name}")
    };
    match JobState::from_str_name(&name) {
        Some(JobState::Unspecified) | None => Err(format!(
            "unknown state {value:?}; expected pending, running, succeeded, failed or cancelled"
        )),
        Some(state) => Ok(state),
    }
}

/// A job type as `Job.type` spells it; `backfill-embeddings`, as `start`
/// spells it, means `backfill_embeddings`.
fn job_type(value: &str) -> Result<String, String> {
    let name = value.trim().to_ascii_lowercase().replace('-', "_");
    if name.is_empty() {
        return Err("a job type must not be empty".to_owned());
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;
    use crate::cli::render::tests::{failed_job, running_job, succeeded_job};

    /// `jobs` as `main.rs` mounts it.
    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        jobs: JobsArgs,
    }

    fn parse(args: &[&str]) -> Result<JobsArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("jobs").chain(args.iter().copied())).map(|cli| cli.jobs)
    }

    fn at(rfc3339: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(rfc3339).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn start_takes_its_options_before_or_after_the_job() {
        let args = parse(&[
            "start",
            "--watch",
            "purge",
            "--older-than",
            "90d",
            "--request-id",
            "r-1",
            "--json",
        ])
        .unwrap();
        assert!(args.json);
        let JobsCommand::Start(start) = args.command else {
            panic!("{:?}", args.command)
        };
        assert!(start.watch);
        assert_eq!(start.request_id.as_deref(), Some("r-1"));
        let JobKind::Purge { older_than } = start.job else {
            panic!("{:?}", start.job)
        };
        let expected = Utc::now() - TimeDelta::days(90);
        assert!((older_than - expected).num_seconds().abs() < 60, "{older_than}");

        assert!(parse(&["start", "reembed"]).is_err(), "reembed needs --model");
        assert!(parse(&["start", "purge", "--older-than", "soon"]).is_err());
    }

    #[test]
    fn list_takes_repeated_and_comma_separated_states() {
        let args = parse(&[
            "list",
            "--state",
            "running",
            "--state",
            "pending,FAILED",
            "--type",
            "backfill-embeddings",
        ])
        .unwrap();
        let JobsCommand::List(list) = args.command else {
            panic!("{:?}", args.command)
        };
        assert_eq!(list.states, [JobState::Running, JobState::Pending, JobState::Failed]);
        assert_eq!(list.job_type.as_deref(), Some("backfill_embeddings"));
        assert!(parse(&["list", "--page-size", "0"]).is_err());
    }

    #[test]
    fn a_cutoff_is_a_timestamp_or_a_span_back_from_now() {
        let now = at("2026-11-23T15:00:00Z");
        assert_eq!(cutoff("90d", now), Ok(at("2026-08-25T15:00:00Z")));
        assert_eq!(cutoff("12h", now), Ok(at("2026-11-23T03:00:00Z")));
        assert_eq!(cutoff("2w", now), Ok(at("2026-11-09T15:00:00Z")));
        assert_eq!(cutoff("30m", now), Ok(at("2026-11-23T14:30:00Z")));
        assert_eq!(cutoff("45s", now), Ok(at("2026-11-23T14:59:15Z")));
        assert_eq!(cutoff("2025-01-31T00:00:00Z", now), Ok(at("2025-01-31T00:00:00Z")));
        assert_eq!(cutoff("2025-01-31T01:00:00+01:00", now), Ok(at("2025-01-31T00:00:00Z")));
    }

    #[test]
    fn a_cutoff_refuses_what_it_cannot_read() {
        let now = at("2026-11-23T15:00:00Z");
        for bad in ["", "90", "d", "90x", "-5d", "1.5d", "90 d", "2025-01-31", "yesterday"] {
            let error = cutoff(bad, now).unwrap_err();
            assert!(error.contains("expected an RFC 3339 timestamp"), "{bad:?}: {error}");
        }
        assert!(cutoff("0d", now).unwrap_err().contains("longer than zero"));
        assert!(cutoff("999999999w", now).unwrap_err().contains("before the year 1"));
        assert!(cutoff("99999999999999999999d", now).is_err());
    }

    #[test]
    fn states_parse_by_short_or_full_name_in_any_case() {
        assert_eq!(job_state("running"), Ok(JobState::Running));
        assert_eq!(job_state("CANCELLED"), Ok(JobState::Cancelled));
        assert_eq!(job_state("job_state_succeeded"), Ok(JobState::Succeeded));
        assert_eq!(job_state("JOB_STATE_FAILED"), Ok(JobState::Failed));
        for bad in ["unspecified", "JOB_STATE_UNSPECIFIED", "done", ""] {
            assert!(
                job_state(bad).unwrap_err().contains("expected pending, running"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn job_types_take_the_start_spelling_too() {
        assert_eq!(job_type("Backfill-Embeddings").as_deref(), Ok("backfill_embeddings"));
        assert_eq!(job_type("purge").as_deref(), Ok("purge"));
        assert!(job_type(" ").is_err());
    }

    #[test]
    fn only_an_ended_job_has_an_exit_status() {
        assert_eq!(exit_status(JobState::Succeeded), Some(0));
        assert_eq!(exit_status(JobState::Failed), Some(3));
        assert_eq!(exit_status(JobState::Cancelled), Some(4));
        assert_eq!(exit_status(JobState::Running), None);
        assert_eq!(exit_status(JobState::Pending), None);
    }

    #[test]
    fn a_plain_watch_prints_a_line_per_state_or_percentage_change() {
        let mut display = WatchDisplay::Lines { last: None };
        let job = running_job();
        assert!(display.update(&job).is_some());
        // More done, same percentage: nothing new to say.
        assert!(display
            .update(&Job {
                done: 421,
                ..job.clone()
            })
            .is_none());
        assert!(display
            .update(&Job {
                progress_percent: 43,
                ..job
            })
            .is_some());
        let summary = display.finish(&failed_job()).unwrap();
        assert!(summary.contains("error: FAILED_PRECONDITION"), "{summary}");
    }

    #[test]
    fn a_json_watch_prints_each_change_once() {
        let mut display = WatchDisplay::Json {
            last: Some(Box::new(running_job())),
        };
        assert!(display.update(&running_job()).is_none(), "start already printed it");
        let line = display.update(&succeeded_job()).unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&line).unwrap()["state"],
            "succeeded"
        );
        assert!(display.finish(&succeeded_job()).is_none());
    }

    #[test]
    fn the_bar_template_is_valid() {
        assert!(ProgressStyle::with_template(BAR_TEMPLATE).is_ok());
    }
}
