//! The gRPC API (DESIGN §9), served by every node, with standard health checking and
//! server reflection. Every service is written the same way: an `impl` on [`Services`]
//! in its own file, and every call that goes to one twin through [`Services::forward`]
//! (least role → deadline → twin id → typed twin call → reply).
//!
//! # Layout
//!
//! - `twins`: `TwinService`.
//! - `mesh`: `MeshService`.
//! - `privacy`: `PrivacyService`.
//! - `models`: `ModelService` (the registry and training are [`crate::models`]).

mod mesh;
mod models;
mod privacy;
mod twins;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response};

use twinmesh_proto::v1::mesh_service_server::MeshServiceServer;
use twinmesh_proto::v1::model_service_server::ModelServiceServer;
use twinmesh_proto::v1::privacy_service_server::PrivacyServiceServer;
use twinmesh_proto::v1::twin_service_server::TwinServiceServer;
use twinmesh_twins::privacy::Role;
use twinmesh_twins::TwinId;

use crate::api::{parse_twin_id, Api, TwinCall};

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

#[derive(Clone)]
pub struct Services {
    pub api: Api,
    /// Bearer-token checks; `None`: every caller is trusted.
    pub auth: Option<std::sync::Arc<crate::auth::Authenticator>>,
    pub cancel: CancellationToken,
    pub tasks: tokio_util::task::TaskTracker,
    /// Which of the node's required actors are down: health says `NOT_SERVING` then.
    pub health: twinmesh_actors::keeper::Health,
    /// The model registry and the feature archive (on cloud nodes).
    pub models: crate::models::Models,
}

/// A gRPC request that one twin answers: what [`Services::forward`] needs beyond the
/// wire mapping of [`TwinCall`].
/// [`TwinRpc`] for requests that name their twin in `twin_id` and need no check of
/// their own: `Request => LeastRole;`.
macro_rules! plain_twin_rpcs {
    ($($request:ty => $role:ident;)*) => {$(
        impl TwinRpc for $request {
            const LEAST_ROLE: Role = Role::$role;
            fn twin_id(&self) -> &str {
                &self.twin_id
            }
        }
    )*};
}
pub(crate) use plain_twin_rpcs;

pub(crate) trait TwinRpc: TwinCall {
    /// The least role of the RPC (DESIGN §10).
    const LEAST_ROLE: Role;
    /// The twin it goes to.
    fn twin_id(&self) -> &str;
    /// Checks that need no twin, so a bad request never travels.
    fn check(&self, _id: &TwinId) -> crate::Result<()> {
        Ok(())
    }
    /// The deadline of the twin call, from the client's.
    fn deadline(&self, client: Option<Duration>) -> Option<Duration> {
        client
    }
}

impl Services {
    /// The one forwarding sequence of the API: the caller's role, the deadline, the
    /// twin id, the typed twin call on the caller's behalf, the reply.
    pub(crate) async fn forward<R: TwinRpc>(
        &self,
        request: Request<R>,
    ) -> crate::Result<Response<R::Reply>> {
        let who = crate::auth::require(&request, R::LEAST_ROLE)?;
        let client_deadline = deadline(&request);
        let req = request.into_inner();
        let id = parse_twin_id(req.twin_id())?;
        // Beyond reading, a role scoped to sites acts only on twins of those sites (the
        // twin decides what a read of another site shows).
        if R::LEAST_ROLE > Role::Viewer {
            who.require_site(id.site())?;
        }
        req.check(&id)?;
        let deadline = req.deadline(client_deadline);
        self.api
            .call(&id, req, deadline, self.api.caller_of(&who))
            .await
            .map(Response::new)
    }
}

/// Serves the API on `listener` until `cancel`.
pub async fn serve(
    listener: TcpListener,
    services: Services,
    tls: Option<crate::config::TlsConfig>,
    cancel: CancellationToken,
) -> crate::Result<()> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let changes = services.health.subscribe();
    report_health(&health_reporter, &services.health).await;
    let (reporter, health, stop) = (
        health_reporter.clone(),
        services.health.clone(),
        cancel.clone(),
    );
    services.tasks.spawn(async move {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = follow_health(reporter, health, changes) => {}
        }
    });
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
            std::fs::read(p)
                .map_err(|e| crate::Error::config(format!("cannot read {}: {e}", p.display())))
        };
        let identity =
            tonic::transport::Identity::from_pem(read(&t.cert_file)?, read(&t.key_file)?);
        builder = builder
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .map_err(|e| crate::Error::config(format!("grpc tls: {e}")))?;
    }
    builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(TwinServiceServer::with_interceptor(
            services.clone(),
            auth.clone(),
        ))
        .add_service(MeshServiceServer::with_interceptor(
            services.clone(),
            auth.clone(),
        ))
        .add_service(ModelServiceServer::with_interceptor(
            services.clone(),
            auth.clone(),
        ))
        .add_service(PrivacyServiceServer::with_interceptor(services, auth))
        .serve_with_incoming_shutdown(
            // Small RPCs must not wait for Nagle's algorithm.
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            cancel.cancelled_owned(),
        )
        .await?;
    Ok(())
}

/// The services this node serves, by their health-check names ("" is the whole server).
const SERVICES: [&str; 5] = [
    "",
    <TwinServiceServer<Services> as tonic::server::NamedService>::NAME,
    <MeshServiceServer<Services> as tonic::server::NamedService>::NAME,
    <ModelServiceServer<Services> as tonic::server::NamedService>::NAME,
    <PrivacyServiceServer<Services> as tonic::server::NamedService>::NAME,
];

/// `SERVING` while every required actor of the node runs, `NOT_SERVING` while one is
/// down (restarting, or given up on).
async fn report_health(
    reporter: &tonic_health::server::HealthReporter,
    health: &twinmesh_actors::keeper::Health,
) {
    let down = health.down();
    let status = if down.is_empty() {
        tonic_health::ServingStatus::Serving
    } else {
        tracing::warn!(?down, "not serving: a required actor is down");
        tonic_health::ServingStatus::NotServing
    };
    for name in SERVICES {
        reporter.set_service_status(name, status).await;
    }
}

/// Keeps gRPC health in step with the node's actors.
async fn follow_health(
    reporter: tonic_health::server::HealthReporter,
    health: twinmesh_actors::keeper::Health,
    mut changes: tokio::sync::watch::Receiver<std::collections::BTreeSet<&'static str>>,
) {
    while changes.changed().await.is_ok() {
        report_health(&reporter, &health).await;
    }
}

/// Binds a gRPC listener, failing with a clear message.
pub async fn bind(addr: SocketAddr) -> crate::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| crate::Error::Bind {
            what: "gRPC",
            addr,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ractor::{Actor, ActorProcessingErr, ActorRef};
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_server::Health as _;
    use tonic_health::pb::HealthCheckRequest;
    use twinmesh_actors::keeper::{keep, Health, KeeperArgs, RestartPolicy};

    /// A required actor that fails on any message.
    #[derive(Clone, Copy)]
    struct Brittle;

    impl Actor for Brittle {
        type Msg = ();
        type State = ();
        type Arguments = ();

        async fn pre_start(&self, _: ActorRef<()>, _: ()) -> Result<(), ActorProcessingErr> {
            Ok(())
        }

        async fn handle(
            &self,
            _: ActorRef<()>,
            _: (),
            _: &mut (),
        ) -> Result<(), ActorProcessingErr> {
            Err("injected failure".into())
        }
    }

    async fn statuses(service: &tonic_health::server::HealthService) -> Vec<i32> {
        let mut out = Vec::new();
        for name in SERVICES {
            let r = service
                .check(Request::new(HealthCheckRequest {
                    service: name.to_owned(),
                }))
                .await
                .unwrap();
            out.push(r.into_inner().status);
        }
        out
    }

    async fn until(service: &tonic_health::server::HealthService, status: ServingStatus) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while statuses(service).await != vec![status as i32; SERVICES.len()] {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("health never became {status:?}"));
    }

    #[tokio::test]
    async fn health_is_not_serving_while_a_required_actor_is_down() {
        let health = Health::default();
        let kept = keep(KeeperArgs {
            role: "brittle",
            actor: Brittle,
            args: Box::new(|| ()),
            policy: RestartPolicy {
                backoff: Duration::from_millis(500),
                ..RestartPolicy::default()
            },
            health: health.clone(),
        })
        .await
        .unwrap();
        let reporter = tonic_health::server::HealthReporter::new();
        let service = tonic_health::server::HealthService::from_health_reporter(reporter.clone());
        let changes = health.subscribe();
        report_health(&reporter, &health).await;
        let follow = tokio::spawn(follow_health(reporter, health.clone(), changes));
        assert_eq!(
            statuses(&service).await,
            vec![ServingStatus::Serving as i32; SERVICES.len()]
        );
        let first = kept.get().unwrap();
        first.cast(()).unwrap();
        until(&service, ServingStatus::NotServing).await;
        kept.restarted(&first, Duration::from_secs(10))
            .await
            .expect("restarted");
        until(&service, ServingStatus::Serving).await;
        follow.abort();
    }
}
