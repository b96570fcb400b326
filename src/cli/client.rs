//! The connection every client subcommand shares (`--addr`, `--token`) and
//! the one error type they report, rendered as `CODE: message`.
use std::time::Duration;

use clap::Args;
use secrecy::{ExposeSecret, SecretString};
use tonic::{
    metadata::{Ascii, MetadataValue},
    service::Interceptor,
    transport::{Channel, Endpoint},
    Code, Request, Status,
};

/// How long to wait for the TCP (and HTTP/2) connection to the server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Deadline of a unary call, sent as `grpc-timeout` so the server stops too.
/// Streams (`watch`) have none: they last as long as the job.
const UNARY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// The server's gRPC address; http:// is assumed when it has no scheme.
    #[arg(
        long,
        env = "DATASTORAGE_ADDR",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    addr: String,
    /// Bearer token, sent as `authorization: Bearer <token>` with every call.
    #[arg(long, env = "DATASTORAGE_TOKEN", hide_env_values = true, global = true)]
    token: Option<SecretString>,
}

impl ServerArgs {
    /// The interceptor that attaches `--token`; checked before connecting.
    pub fn bearer(&self) -> Result<Bearer, CliError> {
        let Some(token) = self.token.as_ref().filter(|t| !t.expose_secret().is_empty()) else {
            return Ok(Bearer(None));
        };
        let mut value =
            MetadataValue::try_from(format!("Bearer {}", token.expose_secret())).map_err(|_| CliError::InvalidToken)?;
        value.set_sensitive(true);
        Ok(Bearer(Some(value)))
    }

    /// Connects now, so an unreachable server is reported as such rather than
    /// as the first call's status.
    pub async fn channel(&self) -> Result<Channel, CliError> {
        let addr = with_scheme(&self.addr);
        let endpoint = Endpoint::from_shared(addr.clone())
            .map_err(|source| CliError::InvalidAddr {
                addr: addr.clone(),
                reason: source.to_string(),
            })?
            .connect_timeout(CONNECT_TIMEOUT);
        endpoint.connect().await.map_err(|source| CliError::Connect {
            addr,
            reason: error_chain(&source),
        })
    }
}

/// `127.0.0.1:8080` means `http://127.0.0.1:8080`, as it does for grpcurl.
fn with_scheme(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    }
}

/// Adds `authorization: Bearer <token>` to each call when a token is set.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A unary call's request, with its deadline.
pub fn unary<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(UNARY_TIMEOUT);
    request
}

/// Why a client command failed; `Display` is the one line the user sees.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{}", describe_status(.0))]
    Status(#[from] Status),
    #[error("invalid --addr {addr}: {reason}")]
    InvalidAddr { addr: String, reason: String },
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("--token holds characters a gRPC header cannot carry")]
    InvalidToken,
    #[error(
        "the server ended the watch of job {id} before the job ended (last state: {last_state}); \
         `datastorage jobs watch {id}` follows it again"
    )]
    WatchEnded { id: String, last_state: String },
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
    /// A local file or key problem, already worded for the user.
    #[error("{0}")]
    Local(String),
}

/// `UNAVAILABLE: job store is unavailable; retry later`: the code's canonical
/// name, the server's message, and the causes of a client-side failure.
fn describe_status(status: &Status) -> String {
    let mut text = code_name(status.code()).to_owned();
    if !status.message().is_empty() {
        text = format!("{text}: {}", status.message());
    }
    if let Some(source) = std::error::Error::source(status) {
        let causes = error_chain(source);
        if !text.contains(&causes) {
            text = format!("{text}: {causes}");
        }
    }
    text
}

/// An error and its causes on one line, each cause once (transport errors
/// often repeat their source's text).
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}

/// The canonical name of a status code, as gRPC documents and grpcurl prints it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(token: Option<&str>) -> ServerArgs {
        ServerArgs {
            addr: "127.0.0.1:1".into(),
            token: token.map(SecretString::from),
        }
    }

    fn authorization(mut bearer: Bearer) -> Option<String> {
        let request = bearer.call(Request::new(())).unwrap();
        request
            .metadata()
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned())
    }

    #[test]
    fn a_status_reads_as_its_code_name_and_message() {
        let status = Status::unavailable("job store is unavailable; retry later");
        assert_eq!(
            CliError::from(status).to_string(),
            "UNAVAILABLE: job store is unavailable; retry later"
        );
        assert_eq!(CliError::from(Status::not_found("")).to_string(), "NOT_FOUND");
    }

    #[test]
    fn a_watch_cut_short_says_how_to_resume() {
        let error = CliError::WatchEnded {
            id: "j-1".into(),
            last_state: "running".into(),
        };
        assert_eq!(
            error.to_string(),
            "the server ended the watch of job j-1 before the job ended (last state: running); \
             `datastorage jobs watch j-1` follows it again"
        );
    }

    #[test]
    fn the_token_is_sent_as_a_bearer_header_only_when_set() {
        assert_eq!(
            authorization(server(Some("s3cret")).bearer().unwrap()).as_deref(),
            Some("Bearer s3cret")
        );
        assert_eq!(authorization(server(None).bearer().unwrap()), None);
        assert_eq!(authorization(server(Some("")).bearer().unwrap()), None);
        assert!(matches!(
            server(Some("line\nbreak")).bearer(),
            Err(CliError::InvalidToken)
        ));
    }

    #[test]
    fn an_address_without_a_scheme_is_plain_http() {
        assert_eq!(with_scheme("127.0.0.1:8080"), "http://127.0.0.1:8080");
        assert_eq!(with_scheme("https://ds.example:443"), "https://ds.example:443");
    }

    #[tokio::test]
    async fn an_unreachable_server_is_named_with_the_cause() {
        // Port 1 on loopback: nothing listens there, so the connect is refused at once.
        let error = server(None).channel().await.unwrap_err().to_string();
        assert!(error.starts_with("cannot connect to http://127.0.0.1:1: "), "{error}");
        assert!(error.to_lowercase().contains("refused"), "{error}");
    }
}
