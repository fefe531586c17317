//! Errors of the node daemon. The workspace has one classification of errors, the
//! [`ErrorCode`] of DESIGN §9, which every crate's error carries (`twins::Error`,
//! `actors::Error`, this [`Error`]). This module holds the only conversions to a gRPC
//! status and to an HTTP response, so a code means the same on every door.

use std::path::PathBuf;

use thiserror::Error;

use twinmesh_twins::proto;
pub use twinmesh_twins::ErrorCode;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Error)]
pub enum Error {
    /// A request refused with a reason: by this node (bad argument, unknown twin), or by
    /// a twin or the placement authority over the fabric (their `proto::Error`).
    #[error("{message}")]
    Refused { code: ErrorCode, message: String },
    #[error(transparent)]
    Domain(#[from] twinmesh_twins::Error),
    #[error(transparent)]
    Actors(#[from] twinmesh_actors::Error),
    /// The caller could not be authenticated or lacks the role.
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    /// A configuration that cannot run (checked before anything starts).
    #[error("{0}")]
    Config(String),
    /// A file the node needs (configuration, keys, certificates) and what went wrong.
    #[error("cannot {action} {}: {source}", path.display())]
    File {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A listener address that cannot be bound.
    #[error("cannot bind {what} address {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("zenoh: {0}")]
    Zenoh(#[from] zenoh::Error),
    #[error("tls: {0}")]
    Tls(String),
    #[error(transparent)]
    Seal(#[from] twinmesh_actors::seal::SealError),
    #[error("certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("bearer token keys: {0}")]
    Jwt(#[from] jsonwebtoken::errors::Error),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("grpc reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("grpc transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Error {
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Refused { code, .. } => *code,
            Error::Domain(e) => e.code(),
            Error::Actors(e) => e.code(),
            Error::Auth(e) => e.code(),
            Error::Config(_) | Error::Certificate(_) | Error::Jwt(_) | Error::Seal(_) => {
                ErrorCode::InvalidArgument
            }
            Error::Json(_) => ErrorCode::Internal,
            Error::File { .. } | Error::Bind { .. } | Error::Tls(_) | Error::Io(_) => {
                ErrorCode::Internal
            }
            Error::Reflection(_) => ErrorCode::Internal,
            Error::Zenoh(_) | Error::Transport(_) => ErrorCode::Unavailable,
        }
    }

    pub fn refused(code: ErrorCode, message: impl Into<String>) -> Self {
        Error::Refused {
            code,
            message: message.into(),
        }
    }

    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::refused(ErrorCode::InvalidArgument, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::refused(ErrorCode::NotFound, message)
    }

    pub fn failed_precondition(message: impl Into<String>) -> Self {
        Self::refused(ErrorCode::FailedPrecondition, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::refused(ErrorCode::Unavailable, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::refused(ErrorCode::Internal, message)
    }

    pub fn cancelled(message: impl Into<String>) -> Self {
        Self::refused(ErrorCode::Cancelled, message)
    }

    pub fn config(message: impl Into<String>) -> Self {
        Error::Config(message.into())
    }

    /// `action` on `path` failed (`read`, `create`, `write`).
    pub fn file(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::File {
            action,
            path: path.into(),
            source,
        }
    }
}

impl From<ractor::SpawnErr> for Error {
    fn from(e: ractor::SpawnErr) -> Self {
        Error::Actors(twinmesh_actors::Error::actor(e))
    }
}

impl From<twinmesh_twins::chain::ChainError> for Error {
    fn from(e: twinmesh_twins::chain::ChainError) -> Self {
        Error::Domain(e.into())
    }
}

/// An error a twin or the placement authority sent back over the fabric.
impl From<proto::Error> for Error {
    fn from(e: proto::Error) -> Self {
        Error::refused(ErrorCode::of_proto(e.code), e.message)
    }
}

/// The one conversion to a gRPC status (DESIGN §9): the code, and the error's own
/// lowercase message.
impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let code = match e.code() {
            ErrorCode::NotFound => tonic::Code::NotFound,
            ErrorCode::InvalidArgument => tonic::Code::InvalidArgument,
            ErrorCode::FailedPrecondition => tonic::Code::FailedPrecondition,
            ErrorCode::Unavailable => tonic::Code::Unavailable,
            ErrorCode::PermissionDenied => tonic::Code::PermissionDenied,
            ErrorCode::Unauthenticated => tonic::Code::Unauthenticated,
            ErrorCode::Cancelled => tonic::Code::Cancelled,
            ErrorCode::Internal => tonic::Code::Internal,
        };
        tonic::Status::new(code, e.to_string())
    }
}

/// A gRPC refusal, back to the error it came from (the dashboard calls the gRPC
/// services in process).
impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        let code = match s.code() {
            tonic::Code::NotFound => ErrorCode::NotFound,
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => ErrorCode::InvalidArgument,
            tonic::Code::FailedPrecondition | tonic::Code::AlreadyExists | tonic::Code::Aborted => {
                ErrorCode::FailedPrecondition
            }
            tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::ResourceExhausted => ErrorCode::Unavailable,
            tonic::Code::PermissionDenied => ErrorCode::PermissionDenied,
            tonic::Code::Unauthenticated => ErrorCode::Unauthenticated,
            tonic::Code::Cancelled => ErrorCode::Cancelled,
            _ => ErrorCode::Internal,
        };
        Error::Refused {
            code,
            message: s.message().to_owned(),
        }
    }
}

/// A refused caller, through the same conversion.
impl From<crate::auth::AuthError> for tonic::Status {
    fn from(e: crate::auth::AuthError) -> Self {
        Error::from(e).into()
    }
}

/// The one conversion to an HTTP response: the status code of the class, and the
/// message as the body.
impl axum::response::IntoResponse for Error {
    fn into_response(self) -> axum::response::Response {
        use axum::http::StatusCode;
        let status = match self.code() {
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::InvalidArgument => StatusCode::BAD_REQUEST,
            ErrorCode::FailedPrecondition => StatusCode::CONFLICT,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::PermissionDenied => StatusCode::FORBIDDEN,
            ErrorCode::Unauthenticated => StatusCode::UNAUTHORIZED,
            // nginx's "client closed request".
            ErrorCode::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (status, self.to_string()).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_keeps_its_code_and_message_on_both_doors() {
        use axum::response::IntoResponse;
        let cases = [
            (
                Error::not_found("unknown twin a/b"),
                tonic::Code::NotFound,
                404,
            ),
            (
                Error::invalid_argument("invalid bucket_ns 0"),
                tonic::Code::InvalidArgument,
                400,
            ),
            (
                Error::from(proto::Error {
                    code: proto::ErrorCode::FailedPrecondition as i32,
                    message: "revision mismatch".into(),
                }),
                tonic::Code::FailedPrecondition,
                409,
            ),
            (
                Error::from(twinmesh_twins::Error::UnknownTwin("a/b".into())),
                tonic::Code::NotFound,
                404,
            ),
            (Error::unavailable("moving"), tonic::Code::Unavailable, 503),
            (
                Error::config("bad lease"),
                tonic::Code::InvalidArgument,
                400,
            ),
        ];
        for (e, grpc, http) in cases {
            let message = e.to_string();
            let http_status = Error::refused(e.code(), message.clone())
                .into_response()
                .status();
            let status = tonic::Status::from(e);
            assert_eq!(status.code(), grpc, "{message}");
            assert_eq!(status.message(), message);
            assert_eq!(http_status.as_u16(), http, "{message}");
        }
        // An unknown code from the fabric is internal, never a success.
        let e = Error::from(proto::Error {
            code: 99,
            message: "?".into(),
        });
        assert_eq!(e.code(), ErrorCode::Internal);
    }
}
