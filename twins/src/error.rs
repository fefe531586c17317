//! Domain errors. Each maps to exactly one [`ErrorCode`], which the gRPC layer turns into
//! a status code (DESIGN §9). Messages are lowercase and name the offending value.

use thiserror::Error;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Stable error classes, one per gRPC status code the API uses (DESIGN §9). Every
/// crate's error carries one; `nodes` alone turns it into a gRPC status or an HTTP
/// response, and the fabric carries it as `proto::ErrorCode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    NotFound,
    InvalidArgument,
    FailedPrecondition,
    Unavailable,
    PermissionDenied,
    /// No valid credentials (a missing, malformed or expired bearer token).
    Unauthenticated,
    /// The caller went away or asked to stop (a training whose stream was closed).
    Cancelled,
    Internal,
}

#[derive(Debug, Error, Clone, PartialEq)]
pub enum Error {
    #[error("invalid twin id {0:?}: expected {{site}}/{{asset}}, each [a-z0-9][a-z0-9_-]{{0,62}}")]
    InvalidTwinId(String),
    #[error("invalid node id {0:?}: expected [a-z0-9][a-z0-9_-]{{0,62}}")]
    InvalidNodeId(String),
    #[error("invalid site {0:?}: expected [a-z0-9][a-z0-9_-]{{0,62}}")]
    InvalidSite(String),
    #[error("invalid tier {0:?}: expected iot, edge or cloud")]
    InvalidTier(String),
    #[error("unknown asset kind {0:?}")]
    UnknownKind(String),
    #[error("unknown twin {0}")]
    UnknownTwin(String),
    #[error("unknown signal {signal:?} of {kind}")]
    UnknownSignal { kind: String, signal: String },
    #[error("unknown property {property:?} of {kind}: settable properties are {allowed}")]
    UnknownProperty {
        kind: String,
        property: String,
        allowed: String,
    },
    #[error("value {value} of property {property} is outside [{min}, {max}]")]
    ValueOutOfRange {
        property: String,
        value: f64,
        min: f64,
        max: f64,
    },
    #[error("revision mismatch on {twin}: expected {expected}, twin is at {actual}")]
    RevisionMismatch {
        twin: String,
        expected: u64,
        actual: u64,
    },
    #[error("invalid time range: start_ns {start_ns} must be before end_ns {end_ns}")]
    InvalidRange { start_ns: i64, end_ns: i64 },
    #[error("invalid bucket_ns {0}: must be positive")]
    InvalidBucket(i64),
    #[error("too many buckets: {buckets} requested, at most {max}")]
    TooManyBuckets { buckets: u64, max: u64 },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error(
        "privacy budget of {who} exhausted: {requested} requested, {remaining} left in this period"
    )]
    BudgetExhausted {
        who: String,
        requested: f64,
        remaining: f64,
    },
    #[error("group of {size} is smaller than k = {k}: micro-aggregates need at least k members")]
    GroupTooSmall { size: usize, k: u32 },
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    #[error("policy version mismatch on {twin}: expected {expected}, policy is at {actual}")]
    PolicyVersionMismatch {
        twin: String,
        expected: u64,
        actual: u64,
    },
    #[error("invalid chain: {0}")]
    InvalidChain(#[from] crate::chain::ChainError),
}

impl Error {
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::UnknownTwin(_) => ErrorCode::NotFound,
            Error::RevisionMismatch { .. }
            | Error::BudgetExhausted { .. }
            | Error::GroupTooSmall { .. }
            | Error::PolicyVersionMismatch { .. } => ErrorCode::FailedPrecondition,
            Error::PermissionDenied(_) => ErrorCode::PermissionDenied,
            _ => ErrorCode::InvalidArgument,
        }
    }
}

impl From<ErrorCode> for crate::proto::ErrorCode {
    fn from(code: ErrorCode) -> Self {
        use crate::proto::ErrorCode as P;
        match code {
            ErrorCode::NotFound => P::NotFound,
            ErrorCode::InvalidArgument => P::InvalidArgument,
            ErrorCode::FailedPrecondition => P::FailedPrecondition,
            ErrorCode::Unavailable => P::Unavailable,
            ErrorCode::PermissionDenied => P::PermissionDenied,
            ErrorCode::Unauthenticated => P::Unauthenticated,
            ErrorCode::Cancelled => P::Cancelled,
            ErrorCode::Internal => P::Internal,
        }
    }
}

impl From<crate::proto::ErrorCode> for ErrorCode {
    fn from(code: crate::proto::ErrorCode) -> Self {
        use crate::proto::ErrorCode as P;
        match code {
            P::NotFound => ErrorCode::NotFound,
            P::InvalidArgument => ErrorCode::InvalidArgument,
            P::FailedPrecondition => ErrorCode::FailedPrecondition,
            P::Unavailable => ErrorCode::Unavailable,
            P::PermissionDenied => ErrorCode::PermissionDenied,
            P::Unauthenticated => ErrorCode::Unauthenticated,
            P::Cancelled => ErrorCode::Cancelled,
            P::Internal | P::Unspecified => ErrorCode::Internal,
        }
    }
}

impl ErrorCode {
    /// The class of an error that came over the fabric (unknown values are internal).
    pub fn of_proto(code: i32) -> Self {
        crate::proto::ErrorCode::try_from(code).map_or(ErrorCode::Internal, Into::into)
    }
}

impl From<&Error> for crate::proto::Error {
    fn from(err: &Error) -> Self {
        crate::proto::Error {
            code: crate::proto::ErrorCode::from(err.code()) as i32,
            message: err.to_string(),
        }
    }
}
