//! Lambda-shaped errors: every failure the API returns is one of these, with the status, the
//! `x-amzn-ErrorType` header and the JSON body fields that botocore's service model gives its shape.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// One Lambda error. The message is what the client sees; the variant picks the error type,
/// status and body layout.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    ResourceNotFound(String),
    #[error("{0}")]
    InvalidParameterValue(String),
    /// A value broke a constraint of the service model (pattern, range, length).
    #[error("{0}")]
    Validation(String),
    #[error("{0}")]
    ResourceConflict(String),
    #[error("{0}")]
    PreconditionFailed(String),
    #[error("{0}")]
    RequestEntityTooLarge(String),
    #[error("{message}")]
    TooManyRequests {
        message: String,
        reason: &'static str,
        retry_after_seconds: u32,
    },
    #[error("{0}")]
    InvalidRequestContent(String),
    #[error("{0}")]
    InvalidSignature(String),
    #[error("{0}")]
    UnrecognizedClient(String),
    #[error("{0}")]
    IncompleteSignature(String),
    #[error("{0}")]
    MissingAuthenticationToken(String),
    #[error("{0}")]
    UnknownOperation(String),
    #[error("{0}")]
    Service(String),
}

/// How the body names its message field: the model spells it `Message` for some shapes and
/// `message` for others.
#[derive(Clone, Copy)]
enum MessageField {
    Upper,
    Lower,
}

impl ApiError {
    /// The error type, as it appears in `x-amzn-ErrorType` and the body's code.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::ResourceNotFound(_) => "ResourceNotFoundException",
            Self::InvalidParameterValue(_) => "InvalidParameterValueException",
            Self::Validation(_) => "ValidationException",
            Self::ResourceConflict(_) => "ResourceConflictException",
            Self::PreconditionFailed(_) => "PreconditionFailedException",
            Self::RequestEntityTooLarge(_) => "RequestEntityTooLargeException",
            Self::TooManyRequests { .. } => "TooManyRequestsException",
            Self::InvalidRequestContent(_) => "InvalidRequestContentException",
            Self::InvalidSignature(_) => "InvalidSignatureException",
            Self::UnrecognizedClient(_) => "UnrecognizedClientException",
            Self::IncompleteSignature(_) => "IncompleteSignatureException",
            Self::MissingAuthenticationToken(_) => "MissingAuthenticationTokenException",
            Self::UnknownOperation(_) => "UnknownOperationException",
            Self::Service(_) => "ServiceException",
        }
    }

    /// The HTTP status of this error's shape.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::ResourceNotFound(_) | Self::UnknownOperation(_) => StatusCode::NOT_FOUND,
            Self::InvalidParameterValue(_)
            | Self::Validation(_)
            | Self::InvalidRequestContent(_)
            | Self::IncompleteSignature(_) => StatusCode::BAD_REQUEST,
            Self::ResourceConflict(_) => StatusCode::CONFLICT,
            Self::PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
            Self::RequestEntityTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::InvalidSignature(_)
            | Self::UnrecognizedClient(_)
            | Self::MissingAuthenticationToken(_) => StatusCode::FORBIDDEN,
            Self::Service(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn message_field(&self) -> MessageField {
        match self {
            Self::ResourceNotFound(_) | Self::Service(_) => MessageField::Upper,
            _ => MessageField::Lower,
        }
    }

    /// `User` for the caller's fault, `Service` for ours (Lambda's `Type` body field).
    fn fault(&self) -> &'static str {
        if self.status().is_server_error() {
            "Service"
        } else {
            "User"
        }
    }

    /// The JSON body, exactly as Lambda lays it out for this error shape.
    pub fn body(&self) -> serde_json::Value {
        let mut body = serde_json::Map::new();
        body.insert("Type".into(), self.fault().into());
        let key = match self.message_field() {
            MessageField::Upper => "Message",
            MessageField::Lower => "message",
        };
        body.insert(key.into(), self.to_string().into());
        if let Self::TooManyRequests {
            reason,
            retry_after_seconds,
            ..
        } = self
        {
            body.insert("Reason".into(), (*reason).into());
            body.insert(
                "retryAfterSeconds".into(),
                retry_after_seconds.to_string().into(),
            );
        }
        serde_json::Value::Object(body)
    }

    /// A ServiceException for a failure of ours; the cause goes to the log, not to the client.
    pub fn internal(context: &str, err: &dyn std::error::Error) -> Self {
        tracing::error!(error = %err, source = ?err.source(), "{context}");
        Self::Service(format!("{context}: internal error"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(error_type = self.type_name(), message = %self, "request failed");
        } else {
            tracing::debug!(error_type = self.type_name(), message = %self, "request rejected");
        }
        let mut response = (status, axum::Json(self.body())).into_response();
        let headers = response.headers_mut();
        headers.insert(
            "x-amzn-ErrorType",
            HeaderValue::from_static(self.type_name()),
        );
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Self::TooManyRequests {
            retry_after_seconds,
            ..
        } = &self
        {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_seconds));
        }
        response
    }
}

/// Lambda's message for a value outside a range in the model.
pub fn range_error(field: &str, value: i64, min: i64, max: i64) -> ApiError {
    if value < min {
        ApiError::Validation(format!(
            "1 validation error detected: Value '{value}' at '{field}' failed to satisfy constraint: \
             Member must have value greater than or equal to {min}"
        ))
    } else {
        ApiError::Validation(format!(
            "1 validation error detected: Value '{value}' at '{field}' failed to satisfy constraint: \
             Member must have value less than or equal to {max}"
        ))
    }
}

/// Lambda's message for a string that breaks a pattern in the model.
pub fn pattern_error(field: &str, value: &str, pattern: &str) -> ApiError {
    ApiError::Validation(format!(
        "1 validation error detected: Value '{value}' at '{field}' failed to satisfy constraint: \
         Member must satisfy regular expression pattern: {pattern}"
    ))
}

/// Checks `min <= value <= max` with Lambda's message.
pub fn check_range(field: &str, value: i64, min: i64, max: i64) -> Result<(), ApiError> {
    if value < min || value > max {
        Err(range_error(field, value, min, max))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_uses_capital_message() {
        let body = ApiError::ResourceNotFound("x".into()).body();
        assert_eq!(body["Message"], "x");
        assert_eq!(body["Type"], "User");
    }

    #[test]
    fn throttle_has_reason_and_retry_after() {
        let err = ApiError::TooManyRequests {
            message: "Rate Exceeded.".into(),
            reason: "ReservedFunctionConcurrentInvocationLimitExceeded",
            retry_after_seconds: 1,
        };
        let response = err.into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()["retry-after"], "1");
        assert_eq!(
            response.headers()["x-amzn-errortype"],
            "TooManyRequestsException"
        );
    }
}
