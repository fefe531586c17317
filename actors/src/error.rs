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
}

impl Error {
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
