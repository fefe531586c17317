//! `PrivacyService` (DESIGN §10): policies, budgets and releases, served by every node.
//! Each call goes to the twin's own node over the fabric; releases are computed there,
//! so raw values never travel to the node that took the call.

use tonic::{Request, Response, Status};

use twinmesh_proto::v1::privacy_service_server::PrivacyService;
use twinmesh_twins::proto::{
    twin_reply, twin_request, Budget, GetBudgetRequest, GetPolicyRequest, PrivacyPolicy,
    ReleaseAggregateRequest, ReleaseAggregateResponse, SetPolicyRequest,
};

use crate::api::{parse_twin_id, Api};

#[derive(Clone)]
pub struct Privacy {
    pub api: Api,
}

fn unexpected() -> Status {
    Status::internal("unexpected reply from twin")
}

#[tonic::async_trait]
impl PrivacyService for Privacy {
    async fn get_policy(
        &self,
        request: Request<GetPolicyRequest>,
    ) -> Result<Response<PrivacyPolicy>, Status> {
        let who = crate::auth::require(&request, twinmesh_twins::privacy::Role::Viewer)?;
        let req = request.into_inner();
        let id = parse_twin_id(&req.twin_id)?;
        match self
            .api
            .twin_call_as(
                &id,
                twin_request::Request::GetPolicy(req),
                None,
                self.api.caller_of(&who),
            )
            .await?
        {
            twin_reply::Reply::Policy(p) => Ok(Response::new(p)),
            _ => Err(unexpected()),
        }
    }

    async fn set_policy(
        &self,
        request: Request<SetPolicyRequest>,
    ) -> Result<Response<PrivacyPolicy>, Status> {
        let who = crate::auth::require(&request, twinmesh_twins::privacy::Role::DataOwner)?;
        let req = request.into_inner();
        let twin_id = req
            .policy
            .as_ref()
            .map(|p| p.twin_id.clone())
            .unwrap_or_default();
        let id = parse_twin_id(&twin_id)?;
        match self
            .api
            .twin_call_as(
                &id,
                twin_request::Request::SetPolicy(req),
                None,
                self.api.caller_of(&who),
            )
            .await?
        {
            twin_reply::Reply::Policy(p) => Ok(Response::new(p)),
            _ => Err(unexpected()),
        }
    }

    async fn get_budget(
        &self,
        request: Request<GetBudgetRequest>,
    ) -> Result<Response<Budget>, Status> {
        let who = crate::auth::require(&request, twinmesh_twins::privacy::Role::Viewer)?;
        let req = request.into_inner();
        let id = parse_twin_id(&req.twin_id)?;
        match self
            .api
            .twin_call_as(
                &id,
                twin_request::Request::GetBudget(req),
                None,
                self.api.caller_of(&who),
            )
            .await?
        {
            twin_reply::Reply::Budget(b) => Ok(Response::new(b)),
            _ => Err(unexpected()),
        }
    }

    async fn release_aggregate(
        &self,
        request: Request<ReleaseAggregateRequest>,
    ) -> Result<Response<ReleaseAggregateResponse>, Status> {
        let who = crate::auth::require(&request, twinmesh_twins::privacy::Role::DataManager)?;
        let req = request.into_inner();
        let Some(first) = req.twin_ids.first() else {
            return Err(Status::invalid_argument(
                "a release names at least one twin",
            ));
        };
        for t in &req.twin_ids {
            parse_twin_id(t)?;
        }
        // The first twin's node computes the release (and coordinates a set on its site).
        let id = parse_twin_id(first)?;
        let deadline = Some(std::time::Duration::from_secs(if req.twin_ids.len() > 1 {
            60
        } else {
            10
        }));
        match self
            .api
            .twin_call_as(
                &id,
                twin_request::Request::Release(req),
                deadline,
                self.api.caller_of(&who),
            )
            .await?
        {
            twin_reply::Reply::Release(r) => Ok(Response::new(r)),
            _ => Err(unexpected()),
        }
    }
}
