//! The one place where core errors become gRPC statuses. Internal causes are
//! logged with their chain and never sent to the client.
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::CoreError;

/// `ErrorInfo.domain` of every error this service sends.
const ERROR_DOMAIN: &str = "datastorage.v1";

impl From<CoreError> for Status {
    fn from(error: CoreError) -> Self {
        match error {
            CoreError::InvalidInput(violations) => {
                let mut details = ErrorDetails::new();
                for v in violations.iter() {
                    details.add_bad_request_violation(v.field.clone(), v.description.clone());
                }
                Status::with_error_details(Code::InvalidArgument, format!("invalid request: {violations}"), details)
            }
            CoreError::NotFound(what) => Status::not_found(format!("{what} not found")),
            CoreError::AlreadyExists(message) => Status::with_error_details(
                Code::AlreadyExists,
                message,
                ErrorDetails::with_error_info("IDEMPOTENCY_KEY_REUSED", ERROR_DOMAIN, []),
            ),
            CoreError::FailedPrecondition(message) => Status::failed_precondition(message),
            CoreError::Unavailable { what, source } => {
                tracing::warn!(error = format!("{source:#}"), what, "dependency unavailable");
                let mut details = ErrorDetails::with_error_info(
                    "DEPENDENCY_UNAVAILABLE",
                    ERROR_DOMAIN,
                    [("dependency".to_owned(), what.to_owned())],
                );
                details.set_retry_info(Some(std::time::Duration::from_secs(1)));
                Status::with_error_details(
                    Code::Unavailable,
                    format!("{what} is unavailable; retry later"),
                    details,
                )
            }
            CoreError::Unauthenticated { reason } => Status::with_error_details(
                Code::Unauthenticated,
                "a valid bearer token is required (authorization: Bearer <JWT>)",
                ErrorDetails::with_error_info(reason, ERROR_DOMAIN, []),
            ),
            CoreError::PermissionDenied { required } => Status::with_error_details(
                Code::PermissionDenied,
                format!("this call needs the scope {required}"),
                ErrorDetails::with_error_info(
                    "SCOPE_MISSING",
                    ERROR_DOMAIN,
                    [("required_scope".to_owned(), required.to_string())],
                ),
            ),
            CoreError::RateLimited { retry_after } => {
                let mut details = ErrorDetails::with_error_info("RATE_LIMITED", ERROR_DOMAIN, []);
                details.set_retry_info(Some(retry_after));
                Status::with_error_details(Code::ResourceExhausted, "rate limit exceeded; retry later", details)
            }
            CoreError::Overloaded => {
                let mut details = ErrorDetails::with_error_info("OVERLOADED", ERROR_DOMAIN, []);
                details.set_retry_info(Some(std::time::Duration::from_millis(100)));
                Status::with_error_details(
                    Code::Unavailable,
                    "the server is at its concurrency limit; retry, ideally on another replica",
                    details,
                )
            }
            CoreError::DeadlineExceeded { after } => {
                Status::deadline_exceeded(format!("deadline exceeded after {} ms", after.as_millis()))
            }
            CoreError::Internal(source) => {
                tracing::error!(error = format!("{source:#}"), "internal error");
                Status::internal("internal error")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Violations;

    #[test]
    fn internal_errors_do_not_leak_their_cause() {
        let status: Status = CoreError::Internal(anyhow::anyhow!("syntax error at or near SELECT")).into();
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("SELECT"));
    }

    #[test]
    fn invalid_input_carries_field_violations() {
        let status: Status = CoreError::InvalidInput(Violations::single("event.namespace", "is required")).into();
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status.get_details_bad_request().expect("bad request details");
        assert_eq!(details.field_violations[0].field, "event.namespace");
    }
}
