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
        }
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
