//! `TwinService`: state, descriptions, history, set-points, chains and imports of one
//! twin, wherever it lives, and the twin listing.

use std::pin::Pin;

use futures::Stream;
use tonic::{Request, Response, Status};

use twinmesh_proto::v1::twin_service_server::TwinService;
use twinmesh_twins::keys;
use twinmesh_twins::privacy::Role;
use twinmesh_twins::proto::{
    watch_twin_response, FeatureSet, GetThingDescriptionRequest, GetTwinRequest,
    ImportHistoryRequest, ImportHistoryResponse, ListTwinsRequest, ListTwinsResponse,
    QueryHistoryRequest, QueryHistoryResponse, SetChainRequest, SetChainResponse,
    SetDesiredRequest, SetDesiredResponse, ThingDescription, Twin, TwinEvent, TwinState,
    WatchTwinRequest, WatchTwinResponse,
};
use twinmesh_twins::TwinId;

use super::{deadline, plain_twin_rpcs, Services, TwinRpc};
use crate::api::parse_twin_id;

plain_twin_rpcs! {
    GetTwinRequest => Viewer;
    GetThingDescriptionRequest => Viewer;
    SetDesiredRequest => DataOperator;
    ImportHistoryRequest => DataManager;
}

impl TwinRpc for QueryHistoryRequest {
    const LEAST_ROLE: Role = Role::Viewer;
    fn twin_id(&self) -> &str {
        &self.twin_id
    }
    fn check(&self, id: &TwinId) -> crate::Result<()> {
        twinmesh_twins::history::validate_query(id, self)?;
        Ok(())
    }
}

impl TwinRpc for SetChainRequest {
    const LEAST_ROLE: Role = Role::DataManager;
    fn twin_id(&self) -> &str {
        &self.twin_id
    }
    fn check(&self, _id: &TwinId) -> crate::Result<()> {
        match self.chain {
            Some(_) => Ok(()),
            None => Err(crate::Error::invalid_argument("invalid chain: missing")),
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchTwinResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl TwinService for Services {
    async fn list_twins(
        &self,
        request: Request<ListTwinsRequest>,
    ) -> Result<Response<ListTwinsResponse>, Status> {
        crate::auth::require(&request, Role::Viewer)?;
        Ok(Response::new(self.api.list_twins(request.get_ref()).await?))
    }

    async fn get_twin(&self, request: Request<GetTwinRequest>) -> Result<Response<Twin>, Status> {
        Ok(self.forward(request).await?)
    }

    async fn get_thing_description(
        &self,
        request: Request<GetThingDescriptionRequest>,
    ) -> Result<Response<ThingDescription>, Status> {
        Ok(self.forward(request).await?)
    }

    async fn query_history(
        &self,
        request: Request<QueryHistoryRequest>,
    ) -> Result<Response<QueryHistoryResponse>, Status> {
        Ok(self.forward(request).await?)
    }

    type WatchTwinStream = WatchStream;

    async fn watch_twin(
        &self,
        request: Request<WatchTwinRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let who = crate::auth::require(&request, Role::Viewer)?;
        let dl = deadline(&request);
        let id = parse_twin_id(&request.get_ref().twin_id)?;
        // Subscribe first so nothing between the snapshot and the stream is missed.
        let sub = self
            .api
            .fabric()
            .subscribe(&keys::twin_updates(&id), 256)
            .await
            .map_err(|e| crate::Error::unavailable(e.to_string()))?;
        let get = GetTwinRequest {
            twin_id: id.to_string(),
        };
        let first = self
            .api
            .call(&id, get, dl, self.api.caller_of(&who))
            .await?;
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
                    sample
                        .decode::<TwinState>()
                        .map(watch_twin_response::Update::State)
                } else if sample.key.ends_with("/features") {
                    sample
                        .decode::<FeatureSet>()
                        .map(watch_twin_response::Update::Features)
                } else if sample.key.ends_with("/events") {
                    sample
                        .decode::<TwinEvent>()
                        .map(watch_twin_response::Update::Event)
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
        Ok(self.forward(request).await?)
    }

    async fn set_chain(
        &self,
        request: Request<SetChainRequest>,
    ) -> Result<Response<SetChainResponse>, Status> {
        Ok(self.forward(request).await?)
    }

    async fn import_history(
        &self,
        request: Request<ImportHistoryRequest>,
    ) -> Result<Response<ImportHistoryResponse>, Status> {
        Ok(self.forward(request).await?)
    }
}
