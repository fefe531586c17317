//! gRPC client helpers shared by `twinmesh ctl`, the benchmarks and the tests.

use std::time::Duration;

use prost::Message;
use tonic::transport::Channel;
use twinmesh_proto::v1::{Placement, PlacementRequest};

/// `not_found`, `invalid_argument`, ... for a gRPC code.
pub fn code_name(code: tonic::Code) -> String {
    let code = format!("{code:?}");
    let mut snake = String::new();
    for (i, c) in code.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            snake.push('_');
        }
        snake.push(c.to_ascii_lowercase());
    }
    snake
}

/// A channel to `endpoint`; `https://` endpoints are verified against `ca`.
pub async fn connect_tls(
    endpoint: &str,
    timeout: Duration,
    ca: Option<&std::path::Path>,
) -> crate::Result<Channel> {
    let mut ep = Channel::from_shared(endpoint.to_owned())
        .map_err(|e| crate::Error::config(format!("invalid endpoint {endpoint:?}: {e}")))?;
    if endpoint.starts_with("https://") {
        let Some(ca) = ca else {
            return Err(crate::Error::config(format!(
                "{endpoint} is https: give the CA certificate with --ca FILE"
            )));
        };
        let pem = std::fs::read(ca)
            .map_err(|e| crate::Error::config(format!("cannot read CA {}: {e}", ca.display())))?;
        ep = ep
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(pem)),
            )
            .map_err(|e| crate::Error::config(format!("tls: {e}")))?;
    }
    ep.timeout(timeout)
        .connect_timeout(Duration::from_secs(3))
        .connect()
        .await
        .map_err(|e| crate::Error::config(format!("cannot connect to {endpoint}: {e}")))
}

/// One placement request as a gateway sends it to the placement authority: the
/// authority's answer, or `None` when no answer (or no placement) came within 2 s.
pub async fn request_placement(
    session: &zenoh::Session,
    req: &PlacementRequest,
) -> zenoh::Result<Option<Placement>> {
    let replies = session
        .get(format!("twinmesh/placement/{}", req.twin_id))
        .payload(req.encode_to_vec())
        .encoding(zenoh::bytes::Encoding::from(
            <PlacementRequest as twinmesh_proto::Wire>::ENCODING,
        ))
        .timeout(Duration::from_secs(2))
        .await?;
    Ok(replies.recv_async().await.ok().and_then(|r| {
        r.result()
            .ok()
            .and_then(|s| Placement::decode(&*s.payload().to_bytes()).ok())
    }))
}
