//! `PrivacyService` (DESIGN §10): policies, budgets and releases, served by every node.
//! Each call goes to the twin's own node over the fabric; releases are computed there,
//! so raw values never travel to the node that took the call.

use std::time::Duration;

use tonic::{Request, Response, Status};

use twinmesh_proto::v1::privacy_service_server::PrivacyService;
use twinmesh_twins::proto::{
    self, twin_reply, twin_request, Budget, GetBudgetRequest, GetPolicyRequest, PrivacyPolicy,
    ReleaseAggregateRequest, ReleaseAggregateResponse, SetPolicyRequest,
};

use twinmesh_twins::privacy::Role;

use crate::api::{parse_twin_id, Api};
use crate::auth::require;

#[derive(Clone)]
pub struct Privacy {
    pub api: Api,
}

fn unexpected() -> Status {
    Status::internal("unexpected reply from twin")
}

impl Privacy {
    /// Sends `request` to `twin_id`'s twin for `who`, and picks the reply it expects.
    async fn call<T>(
        &self,
        twin_id: &str,
        request: twin_request::Request,
        who: &crate::auth::Identity,
        deadline: Option<Duration>,
        pick: fn(twin_reply::Reply) -> Option<T>,
    ) -> Result<Response<T>, Status> {
        let id = parse_twin_id(twin_id)?;
        let reply = self
            .api
            .twin_call_as(&id, request, deadline, self.api.caller_of(who))
            .await?;
        pick(reply).map(Response::new).ok_or_else(unexpected)
    }
}

#[tonic::async_trait]
impl PrivacyService for Privacy {
    async fn get_policy(
        &self,
        request: Request<GetPolicyRequest>,
    ) -> Result<Response<PrivacyPolicy>, Status> {
        let who = require(&request, Role::Viewer)?;
        let req = request.into_inner();
        let twin_id = req.twin_id.clone();
        self.call(
            &twin_id,
            twin_request::Request::GetPolicy(req),
            &who,
            None,
            |r| match r {
                twin_reply::Reply::Policy(p) => Some(p),
                _ => None,
            },
        )
        .await
    }

    async fn set_policy(
        &self,
        request: Request<SetPolicyRequest>,
    ) -> Result<Response<PrivacyPolicy>, Status> {
        let who = require(&request, Role::DataOwner)?;
        let req = request.into_inner();
        let twin_id = req
            .policy
            .as_ref()
            .map(|p| p.twin_id.clone())
            .unwrap_or_default();
        self.call(
            &twin_id,
            twin_request::Request::SetPolicy(req),
            &who,
            None,
            |r| match r {
                twin_reply::Reply::Policy(p) => Some(p),
                _ => None,
            },
        )
        .await
    }

    async fn get_budget(
        &self,
        request: Request<GetBudgetRequest>,
    ) -> Result<Response<Budget>, Status> {
        let who = require(&request, Role::Viewer)?;
        let req = request.into_inner();
        if !req.site.is_empty() {
            if !req.twin_id.is_empty() {
                return Err(Status::invalid_argument(
                    "a budget request names a twin or a site, not both",
                ));
            }
            twinmesh_twins::id::validate_site(&req.site)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let read = proto::SiteBudgetRequest {
                site: req.site,
                ..Default::default()
            };
            return match self
                .api
                .mesh_request(
                    proto::mesh_request::Request::SiteBudget(read),
                    Duration::from_secs(5),
                )
                .await?
            {
                proto::mesh_reply::Reply::SiteBudget(b) => Ok(Response::new(b)),
                _ => Err(Status::internal(
                    "unexpected reply from the placement authority",
                )),
            };
        }
        let twin_id = req.twin_id.clone();
        self.call(
            &twin_id,
            twin_request::Request::GetBudget(req),
            &who,
            None,
            |r| match r {
                twin_reply::Reply::Budget(b) => Some(b),
                _ => None,
            },
        )
        .await
    }

    async fn release_aggregate(
        &self,
        request: Request<ReleaseAggregateRequest>,
    ) -> Result<Response<ReleaseAggregateResponse>, Status> {
        let who = require(&request, Role::DataManager)?;
        let req = request.into_inner();
        let Some(first) = req.twin_ids.first().cloned() else {
            return Err(Status::invalid_argument(
                "a release names at least one twin",
            ));
        };
        for t in &req.twin_ids {
            parse_twin_id(t)?;
        }
        // The first twin's node computes the release (and coordinates a set on its site).
        let deadline = Some(Duration::from_secs(if req.twin_ids.len() > 1 {
            60
        } else {
            10
        }));
        self.call(
            &first,
            twin_request::Request::Release(req),
            &who,
            deadline,
            |r| match r {
                twin_reply::Reply::Release(r) => Some(r),
                _ => None,
            },
        )
        .await
    }
}
