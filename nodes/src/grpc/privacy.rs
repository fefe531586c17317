//! `PrivacyService` (DESIGN §10): policies, budgets and releases, served by every node.
//! Each call goes to the twin's own node over the fabric; releases are computed there,
//! so raw values never travel to the node that took the call.

use std::time::Duration;

use tonic::{Request, Response, Status};

use twinmesh_proto::v1::privacy_service_server::PrivacyService;
use twinmesh_twins::privacy::Role;
use twinmesh_twins::proto::{
    self, Budget, GetBudgetRequest, GetPolicyRequest, PrivacyPolicy, ReleaseAggregateRequest,
    ReleaseAggregateResponse, SetPolicyRequest,
};
use twinmesh_twins::TwinId;

use super::{plain_twin_rpcs, Services, TwinRpc};
use crate::api::parse_twin_id;

/// Deadlines of releases: a set release is coordinated across the twins of a site.
const RELEASE_DEADLINE: Duration = Duration::from_secs(10);
const SET_RELEASE_DEADLINE: Duration = Duration::from_secs(60);

plain_twin_rpcs! {
    GetPolicyRequest => Viewer;
    GetBudgetRequest => Viewer;
}

impl TwinRpc for SetPolicyRequest {
    const LEAST_ROLE: Role = Role::DataOwner;
    fn twin_id(&self) -> &str {
        self.policy.as_ref().map_or("", |p| p.twin_id.as_str())
    }
}

impl TwinRpc for ReleaseAggregateRequest {
    const LEAST_ROLE: Role = Role::DataManager;
    /// The first twin's node computes the release (and coordinates a set on its site).
    fn twin_id(&self) -> &str {
        self.twin_ids.first().map_or("", String::as_str)
    }
    fn check(&self, _first: &TwinId) -> crate::Result<()> {
        for t in &self.twin_ids {
            parse_twin_id(t)?;
        }
        Ok(())
    }
    fn deadline(&self, _client: Option<Duration>) -> Option<Duration> {
        Some(if self.twin_ids.len() > 1 {
            SET_RELEASE_DEADLINE
        } else {
            RELEASE_DEADLINE
        })
    }
}

#[tonic::async_trait]
impl PrivacyService for Services {
    async fn get_policy(
        &self,
        request: Request<GetPolicyRequest>,
    ) -> Result<Response<PrivacyPolicy>, Status> {
        Ok(self.forward(request).await?)
    }

    async fn set_policy(
        &self,
        request: Request<SetPolicyRequest>,
    ) -> Result<Response<PrivacyPolicy>, Status> {
        Ok(self.forward(request).await?)
    }

    async fn get_budget(
        &self,
        request: Request<GetBudgetRequest>,
    ) -> Result<Response<Budget>, Status> {
        let req = request.get_ref();
        if req.site.is_empty() {
            return Ok(self.forward(request).await?);
        }
        // A site's ledger is kept by the placement authority.
        let who = crate::auth::require(&request, GetBudgetRequest::LEAST_ROLE)?;
        let req = request.into_inner();
        if !req.twin_id.is_empty() {
            return Err(crate::Error::invalid_argument(
                "a budget request names a twin or a site, not both",
            )
            .into());
        }
        twinmesh_twins::id::validate_site(&req.site).map_err(crate::Error::from)?;
        who.require_site(&req.site)?;
        let read = proto::SiteBudgetRequest {
            site: req.site,
            ..Default::default()
        };
        match self
            .api
            .mesh_request(
                self.api.caller_of(&who),
                proto::mesh_request::Request::SiteBudget(read),
                Duration::from_secs(5),
            )
            .await?
        {
            proto::mesh_reply::Reply::SiteBudget(b) => Ok(Response::new(b)),
            _ => {
                Err(crate::Error::internal("unexpected reply from the placement authority").into())
            }
        }
    }

    async fn release_aggregate(
        &self,
        request: Request<ReleaseAggregateRequest>,
    ) -> Result<Response<ReleaseAggregateResponse>, Status> {
        if request.get_ref().twin_ids.is_empty() {
            crate::auth::require(&request, ReleaseAggregateRequest::LEAST_ROLE)?;
            return Err(crate::Error::invalid_argument("a release names at least one twin").into());
        }
        Ok(self.forward(request).await?)
    }
}
