//! `MeshService`: nodes, placements, migrations and drains, answered by the placement
//! authority (the cloud's `MeshSupervisor`) over the fabric.

use std::time::Duration;

use tonic::{Request, Response, Status};

use twinmesh_proto::v1::mesh_service_server::MeshService;
use twinmesh_twins::kind::KindSource;
use twinmesh_twins::privacy::Role;
use twinmesh_twins::proto::{
    mesh_reply, mesh_request, DrainNodeRequest, DrainNodeResponse, GetPlacementRequest, KindInfo,
    ListKindsRequest, ListKindsResponse, ListNodesRequest, ListNodesResponse, MigrateTwinRequest,
    MigrateTwinResponse, Placement,
};
use twinmesh_twins::AssetKind;

use super::Services;
use crate::api::parse_twin_id;

/// How long a migration may take before the caller hears `UNAVAILABLE`.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a drain (one migration per twin of the node) may take.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(300);

fn unexpected() -> crate::Error {
    crate::Error::internal("unexpected reply from the placement authority")
}

#[tonic::async_trait]
impl MeshService for Services {
    async fn list_nodes(
        &self,
        request: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        crate::auth::require(&request, Role::Viewer)?;
        Ok(Response::new(ListNodesResponse {
            nodes: self.api.list_nodes().await?,
        }))
    }

    async fn list_kinds(
        &self,
        request: Request<ListKindsRequest>,
    ) -> Result<Response<ListKindsResponse>, Status> {
        crate::auth::require(&request, Role::Viewer)?;
        Ok(Response::new(ListKindsResponse {
            kinds: AssetKind::registered().into_iter().map(kind_info).collect(),
        }))
    }

    async fn migrate_twin(
        &self,
        request: Request<MigrateTwinRequest>,
    ) -> Result<Response<MigrateTwinResponse>, Status> {
        let who = crate::auth::require(&request, Role::DataManager)?;
        let req = request.into_inner();
        who.require_site(parse_twin_id(&req.twin_id)?.site())?;
        match self
            .api
            .mesh_request(
                self.api.caller_of(&who),
                mesh_request::Request::Migrate(req),
                MIGRATE_TIMEOUT,
            )
            .await?
        {
            mesh_reply::Reply::Migrate(r) => Ok(Response::new(r)),
            _ => Err(unexpected().into()),
        }
    }

    async fn drain_node(
        &self,
        request: Request<DrainNodeRequest>,
    ) -> Result<Response<DrainNodeResponse>, Status> {
        let who = crate::auth::require(&request, Role::DataManager)?;
        let req = request.into_inner();
        req.node
            .parse::<twinmesh_twins::NodeId>()
            .map_err(crate::Error::from)?;
        // A role scoped to sites drains only nodes of those sites.
        if !who.sites.is_empty() {
            let nodes = self.api.list_nodes().await?;
            let node = nodes
                .iter()
                .find(|n| n.node == req.node)
                .ok_or_else(|| crate::Error::not_found(format!("unknown node {}", req.node)))?;
            who.require_site(&node.site)?;
        }
        match self
            .api
            .mesh_request(
                self.api.caller_of(&who),
                mesh_request::Request::Drain(req),
                DRAIN_TIMEOUT,
            )
            .await?
        {
            mesh_reply::Reply::Drain(r) => Ok(Response::new(r)),
            _ => Err(unexpected().into()),
        }
    }

    async fn get_placement(
        &self,
        request: Request<GetPlacementRequest>,
    ) -> Result<Response<Placement>, Status> {
        crate::auth::require(&request, Role::Viewer)?;
        let id = parse_twin_id(&request.get_ref().twin_id)?;
        self.api
            .placement(&id)
            .await?
            .map(Response::new)
            .ok_or_else(|| crate::Error::not_found(format!("unknown twin {id}")).into())
    }
}

/// What `ListKinds` says of one kind this node knows.
pub fn kind_info(kind: AssetKind) -> KindInfo {
    let s = kind.schema();
    KindInfo {
        kind: s.name.to_owned(),
        title: s.title.to_owned(),
        source: s.source.label().to_owned(),
        defined_by: match &s.source {
            KindSource::BuiltIn => String::new(),
            KindSource::File(path) => path.clone(),
            KindSource::Fabric { site } => site.clone(),
        },
        signals: s.signals.iter().map(|x| x.name.to_owned()).collect(),
        setpoints: s.properties.iter().map(|x| x.name.to_owned()).collect(),
        thing_model: s.thing_model.to_owned(),
    }
}
