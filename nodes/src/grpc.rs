//! The gRPC API (DESIGN §9), served by every node: `TwinService`, `MeshService` and
//! `ModelService` ([`crate::models`]), plus
//! standard health checking and server reflection.

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use prost::Message;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use twinmesh_proto::v1::mesh_service_server::{MeshService, MeshServiceServer};
use twinmesh_proto::v1::model_service_server::ModelServiceServer;
use twinmesh_proto::v1::privacy_service_server::PrivacyServiceServer;
use twinmesh_proto::v1::twin_service_server::{TwinService, TwinServiceServer};
use twinmesh_twins::keys;
use twinmesh_twins::proto::{
    mesh_reply, mesh_request, twin_reply, twin_request, watch_twin_response, DrainNodeRequest,
    DrainNodeResponse, FeatureSet, GetPlacementRequest, GetThingDescriptionRequest, GetTwinRequest,
    ImportHistoryRequest, ImportHistoryResponse, ListNodesRequest, ListNodesResponse,
    ListTwinsRequest, ListTwinsResponse, MigrateTwinRequest, MigrateTwinResponse, Placement,
    QueryHistoryRequest, QueryHistoryResponse, SetChainRequest, SetChainResponse,
    SetDesiredRequest, SetDesiredResponse, ThingDescription, Twin, TwinEvent, TwinState,
    WatchTwinRequest, WatchTwinResponse,
};

use crate::api::{parse_twin_id, Api};

/// The client's deadline (`grpc-timeout`), if it sent one.
fn deadline<T>(req: &Request<T>) -> Option<Duration> {
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn unexpected() -> Status {
    Status::internal("unexpected reply from twin")
}

#[derive(Clone)]
pub struct Services {
    pub api: Api,
    /// Bearer-token checks; `None`: every caller is trusted.
    pub auth: Option<std::sync::Arc<crate::auth::Authenticator>>,
    pub cancel: CancellationToken,
    pub tasks: tokio_util::task::TaskTracker,
}

#[tonic::async_trait]
impl TwinService for Services {
    async fn list_twins(
        &self,
        request: Request<ListTwinsRequest>,
    ) -> Result<Response<ListTwinsResponse>, Status> {
        let _who = crate::auth::require(&request, twinmesh_twins::privacy::Role::Viewer)?;
        Ok(Response::new(self.api.list_twins(request.get_ref()).await?))
    }

    async fn get_twin(&self, request: Request<GetTwinRequest>) -> Result<Response<Twin>, Status> {
        let who = crate::auth::require(&request, twinmesh_twins::privacy::Role::Viewer)?;
        let dl = deadline(&request);
        let req = request.into_inner();
        let id = parse_twin_id(&req.twin_id)?;
        match self
            .api
            .twin_call_as(
                &id,
                twin_request::Request::GetTwin(req),
                dl,
                self.api.caller_of(&who),
            )
            .await?
        {
            twin_reply::Reply::Twin(t) => Ok(Response::new(t)),
            _ => Err(unexpected()),
        }
    }

    async fn get_thing_description(
        &self,
        request: Request<GetThingDescriptionRequest>,
    ) -> Result<Response<ThingDescription>, Status> {
        let who = crate::auth::require(&request, twinmesh_twins::privacy::Role::Viewer)?;
        let dl = deadline(&request);
        let req = request.into_inner();
        let id = parse_twin_id(&req.twin_id)?;
        match self
            .api
            .twin_call_as(
                &id,
                twin_request::Request::ThingDescription(req),
                dl,
                self.api.caller_of(&who),
            )
            .await?
        {
            twin_reply::Reply::ThingDescription(t) => Ok(Response::new(t)),
            _ => Err(unexpected()),
        }
    }

    async fn query_history(
        &self,
        request: Request<QueryHistoryRequest>,
    ) -> Result<Response<QueryHistoryResponse>, Status> {
        let who = crate::auth::require(&request, twinmesh_twins::privacy::Role::Viewer)?;
        let dl = deadline(&request);
        let req = request.into_inner();
        let id = parse_twin_id(&req.twin_id)?;
        // Reject bad ranges here too, so a bad request never travels.
        twinmesh_actors::twin::validate_history(&id, &req)
            .map_err(|e| crate::api::status_of(e.code(), e.to_string()))?;
        match self
            .api
            .twin_call_as(
                &id,
                twin_request::Request::QueryHistory(req),
                dl,
                self.api.caller_of(&who),
            )
            .await?
        {
            twin_reply::Reply::QueryHistory(h) => Ok(Response::new(h)),
            _ => Err(unexpected()),
        }
    }

    type WatchTwinStream =
        Pin<Box<dyn Stream<Item = Result<WatchTwinResponse, Status>> + Send + 'static>>;

    async fn watch_twin(
        &self,
        request: Request<WatchTwinRequest>,
    ) -> Result<Response<Self::WatchTwinStream>, Status> {
        let who = crate::auth::require(&request, twinmesh_twins::privacy::Role::Viewer)?;
        let dl = deadline(&request);
        let id = parse_twin_id(&request.get_ref().twin_id)?;
        // Subscribe first so nothing between the snapshot and the stream is missed.
        let sub = self
            .api
            .fabric()
            .subscribe(&keys::twin_updates(&id), 256)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let first = match self
            .api
            .twin_call_as(
                &id,
                twin_request::Request::GetTwin(GetTwinRequest {
                    twin_id: id.to_string(),
                }),
                dl,
                self.api.caller_of(&who),
            )
            .await?
        {
            twin_reply::Reply::Twin(t) => t,
            _ => return Err(unexpected()),
        };
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let cancel = self.cancel.clone();
        self.tasks.spawn(async move {
            // Own the whole subscription (not just its channel): its guard keeps it declared.
            let sub = sub;
            let initial = WatchTwinResponse {
                update: Some(watch_twin_response::Update::State(TwinState {
                    twin: Some(first),
                    timestamp_ns: 0,
                })),
            };
            if tx.send(Ok(initial)).await.is_err() {
                return;
            }
            loop {
                let sample = tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tx.closed() => break,
                    s = sub.rx.recv_async() => match s { Ok(s) => s, Err(_) => break },
                };
                let update = if sample.key.ends_with("/state") {
                    TwinState::decode(sample.payload).map(watch_twin_response::Update::State)
                } else if sample.key.ends_with("/features") {
                    FeatureSet::decode(sample.payload).map(watch_twin_response::Update::Features)
                } else if sample.key.ends_with("/events") {
                    TwinEvent::decode(sample.payload).map(watch_twin_response::Update::Event)
                } else {
                    continue;
                };
                let Ok(update) = update else { continue };
                if tx
                    .send(Ok(WatchTwinResponse {
                        update: Some(update),
                    }))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn set_desired(
        &self,
        request: Request<SetDesiredRequest>,
    ) -> Result<Response<SetDesiredResponse>, Status> {
        let who = crate::auth::require(&request, twinmesh_twins::privacy::Role::DataOperator)?;
        let dl = deadline(&request);
        let req = request.into_inner();
        let id = parse_twin_id(&req.twin_id)?;
        match self
            .api
            .twin_call_as(
                &id,
                twin_request::Request::SetDesired(req),
                dl,
                self.api.caller_of(&who),
            )
            .await?
        {
            twin_reply::Reply::SetDesired(r) => Ok(Response::new(r)),
            _ => Err(unexpected()),
        }
    }

    async fn set_chain(
        &self,
        request: Request<SetChainRequest>,
    ) -> Result<Response<SetChainResponse>, Status> {
        let who = crate::auth::require(&request, twinmesh_twins::privacy::Role::DataManager)?;
        self.set_chain_impl(request, who).await
    }

    async fn import_history(
        &self,
        request: Request<ImportHistoryRequest>,
    ) -> Result<Response<ImportHistoryResponse>, Status> {
        let who = crate::auth::require(&request, twinmesh_twins::privacy::Role::DataManager)?;
        let dl = deadline(&request);
        let req = request.into_inner();
        let id = parse_twin_id(&req.twin_id)?;
        match self
            .api
            .twin_call_as(
                &id,
                twin_request::Request::ImportHistory(req),
                dl,
                self.api.caller_of(&who),
            )
            .await?
        {
            twin_reply::Reply::ImportHistory(r) => Ok(Response::new(r)),
            _ => Err(unexpected()),
        }
    }
}

impl Services {
    async fn set_chain_impl(
        &self,
        request: Request<SetChainRequest>,
        who: crate::auth::Identity,
    ) -> Result<Response<SetChainResponse>, Status> {
        let dl = deadline(&request);
        let req = request.into_inner();
        let id = parse_twin_id(&req.twin_id)?;
        if req.chain.is_none() {
            return Err(Status::invalid_argument("invalid chain: missing"));
        }
        match self
            .api
            .twin_call_as(
                &id,
                twin_request::Request::SetChain(req),
                dl,
                self.api.caller_of(&who),
            )
            .await?
        {
            twin_reply::Reply::SetChain(r) => Ok(Response::new(r)),
            _ => Err(unexpected()),
        }
    }
}

#[tonic::async_trait]
impl MeshService for Services {
    async fn list_nodes(
        &self,
        _request: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        let _who = crate::auth::require(&_request, twinmesh_twins::privacy::Role::Viewer)?;
        Ok(Response::new(ListNodesResponse {
            nodes: self.api.list_nodes().await?,
        }))
    }

    async fn migrate_twin(
        &self,
        request: Request<MigrateTwinRequest>,
    ) -> Result<Response<MigrateTwinResponse>, Status> {
        let _who = crate::auth::require(&request, twinmesh_twins::privacy::Role::DataManager)?;
        let req = request.into_inner();
        parse_twin_id(&req.twin_id)?;
        match self
            .api
            .mesh_request(mesh_request::Request::Migrate(req), Duration::from_secs(20))
            .await?
        {
            mesh_reply::Reply::Migrate(r) => Ok(Response::new(r)),
            _ => Err(unexpected()),
        }
    }

    async fn drain_node(
        &self,
        request: Request<DrainNodeRequest>,
    ) -> Result<Response<DrainNodeResponse>, Status> {
        let _who = crate::auth::require(&request, twinmesh_twins::privacy::Role::DataManager)?;
        let req = request.into_inner();
        req.node
            .parse::<twinmesh_twins::NodeId>()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let timeout = Duration::from_secs(300);
        match self
            .api
            .mesh_request(mesh_request::Request::Drain(req), timeout)
            .await?
        {
            mesh_reply::Reply::Drain(r) => Ok(Response::new(r)),
            _ => Err(unexpected()),
        }
    }

    async fn get_placement(
        &self,
        request: Request<GetPlacementRequest>,
    ) -> Result<Response<Placement>, Status> {
        let _who = crate::auth::require(&request, twinmesh_twins::privacy::Role::Viewer)?;
        let id = parse_twin_id(&request.get_ref().twin_id)?;
        self.api
            .placement(&id)
            .await?
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("unknown twin {id}")))
    }
}

/// Serves the API on `listener` until `cancel`.
pub async fn serve(
    listener: TcpListener,
    services: Services,
    models: crate::models::Models,
    tls: Option<crate::config::TlsConfig>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<TwinServiceServer<Services>>()
        .await;
    health_reporter
        .set_serving::<MeshServiceServer<Services>>()
        .await;
    health_reporter
        .set_serving::<ModelServiceServer<crate::models::Models>>()
        .await;
    health_reporter
        .set_serving::<PrivacyServiceServer<crate::privacy::Privacy>>()
        .await;
    let privacy = crate::privacy::Privacy {
        api: services.api.clone(),
    };
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(twinmesh_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    // Health and reflection stay open; every twinmesh service checks its callers.
    let auth = crate::auth::AuthInterceptor {
        auth: services.auth.clone(),
    };
    let mut builder = tonic::transport::Server::builder();
    if let Some(t) = &tls {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))
        };
        let identity =
            tonic::transport::Identity::from_pem(read(&t.cert_file)?, read(&t.key_file)?);
        builder = builder
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .map_err(|e| anyhow::anyhow!("grpc tls: {e}"))?;
    }
    builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(TwinServiceServer::with_interceptor(
            services.clone(),
            auth.clone(),
        ))
        .add_service(MeshServiceServer::with_interceptor(services, auth.clone()))
        .add_service(ModelServiceServer::with_interceptor(models, auth.clone()))
        .add_service(PrivacyServiceServer::with_interceptor(privacy, auth))
        .serve_with_incoming_shutdown(
            // Small RPCs must not wait for Nagle's algorithm.
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            cancel.cancelled_owned(),
        )
        .await?;
    Ok(())
}

/// Binds a gRPC listener, failing with a clear message.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind gRPC address {addr}: {e}"))
}
