//! Errors of the actor layer.

use thiserror::Error;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Error)]
pub enum Error {
    #[error("fabric: {0}")]
    Fabric(String),
    #[error("store: {0}")]
    Store(String),
    #[error(transparent)]
    Domain(#[from] twinmesh_twins::Error),
    #[error("decode {what}: {source}")]
    Decode {
        what: &'static str,
        #[source]
        source: prost::DecodeError,
    },
    #[error("actor: {0}")]
    Actor(String),
    #[error("twin {0} is not hosted on this node")]
    NotHosted(String),
    /// Refused with a class and a reason: a request the mesh cannot carry out now, or
    /// an error that came back over the fabric.
    #[error("{message}")]
    Refused {
        code: twinmesh_twins::ErrorCode,
        message: String,
    },
    /// The model registry could not read or write its store.
    #[error("model registry: {0}")]
    Registry(String),
    #[error("unknown model {model_id} v{version}")]
    UnknownModel { model_id: String, version: u64 },
}

impl Error {
    /// The class of the error (DESIGN §9): what a caller at the API sees.
    pub fn code(&self) -> twinmesh_twins::ErrorCode {
        use twinmesh_twins::ErrorCode;
        match self {
            Error::Domain(e) => e.code(),
            Error::Decode { .. } => ErrorCode::InvalidArgument,
            Error::UnknownModel { .. } => ErrorCode::NotFound,
            Error::Registry(_) => ErrorCode::Internal,
            // The fabric, the store or an actor failed: the caller may retry.
            Error::Fabric(_) | Error::Store(_) | Error::Actor(_) | Error::NotHosted(_) => {
                ErrorCode::Unavailable
            }
            Error::Refused { code, .. } => *code,
        }
    }

    pub fn refused(code: twinmesh_twins::ErrorCode, message: impl Into<String>) -> Self {
        Error::Refused {
            code,
            message: message.into(),
        }
    }

    /// Cannot be done now (storage, a twin moving); the caller may retry.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::refused(twinmesh_twins::ErrorCode::Unavailable, message)
    }

    pub fn fabric(e: impl std::fmt::Display) -> Self {
        Error::Fabric(e.to_string())
    }

    pub fn store(e: impl std::fmt::Display) -> Self {
        Error::Store(e.to_string())
    }

    pub fn actor(e: impl std::fmt::Display) -> Self {
        Error::Actor(e.to_string())
    }
}

/// The error as it crosses the fabric (a twin's or the placement authority's reply).
impl From<&Error> for twinmesh_twins::proto::Error {
    fn from(e: &Error) -> Self {
        twinmesh_twins::proto::Error {
            code: twinmesh_twins::proto::ErrorCode::from(e.code()) as i32,
            message: e.to_string(),
        }
    }
}

/// An error that came back over the fabric.
impl From<twinmesh_twins::proto::Error> for Error {
    fn from(e: twinmesh_twins::proto::Error) -> Self {
        Error::refused(twinmesh_twins::ErrorCode::of_proto(e.code), e.message)
    }
}
