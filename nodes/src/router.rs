//! `twinmesh router`: a Zenoh session in router mode and nothing else, so that nodes
//! which cannot open connections to each other (edges behind a site's firewall, a cloud
//! in another network) reach each other through it, as they would through `zenohd`.
//!
//! Zenoh (1.9 and later) forwards between a router's neighbours only when they are
//! routers or clients: the peers connected to one router form a peer-to-peer region in
//! which the router forwards nothing from one peer to another (zenoh's own
//! `static_failover_brokering` test is ignored, eclipse-zenoh/zenoh#2224). Nodes behind
//! routers therefore run with `--mode router` (or `client`); the router warns about every
//! peer that connects to it, and a peer-mode node that reaches only routers warns too
//! (see [`warn_peer_behind_routers`]).

use std::collections::BTreeSet;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{RouterConfig, ZenohMode};
use crate::fabric::{check_listen_endpoints, router_zenoh_config};

/// How often a router (or a peer-mode node) looks at who it is connected to.
const CHECK_PERIOD: Duration = Duration::from_secs(1);

/// A running router: its session and the locators it listens on.
pub struct RunningRouter {
    pub config: RouterConfig,
    pub locators: Vec<String>,
    session: zenoh::Session,
}

impl RunningRouter {
    pub async fn start(config: RouterConfig) -> crate::Result<Self> {
        check_listen_endpoints(&config.listen)?;
        let zc = router_zenoh_config(&config)?;
        let session = zenoh::open(zc)
            .await
            .map_err(|e| crate::Error::config(format!("cannot open zenoh router session: {e}")))?;
        let locators = session
            .info()
            .locators()
            .await
            .into_iter()
            .map(|l| l.to_string())
            .collect();
        tracing::info!(router = %config.id, ?locators, connect = ?config.connect, "router started");
        Ok(RunningRouter {
            config,
            locators,
            session,
        })
    }

    /// The line `twinmesh node` prints too: `ready node=NAME tier=router ... zenoh=...`.
    pub fn ready_line(&self) -> String {
        format!(
            "ready node={} tier=router site= grpc= http= zenoh={}",
            self.config.id,
            self.locators.join(",")
        )
    }

    /// Warns once about each peer-mode session connected to this router: the router
    /// forwards nothing between it and other peers.
    async fn check_peers(&self, warned: &mut BTreeSet<String>) {
        for zid in self.session.info().peers_zid().await {
            if warned.insert(zid.to_string()) {
                tracing::warn!(
                    router = %self.config.id,
                    peer = %zid,
                    "a peer-mode session connected to this router: Zenoh routers do not \
                     forward between the peers connected to them, so it reaches only \
                     this router and whoever it connects to directly; twinmesh nodes \
                     behind routers run with --mode router (or client)"
                );
            }
        }
    }

    pub async fn stop(self) {
        if let Err(e) = self.session.close().await {
            tracing::warn!("zenoh router session close: {e}");
        }
        tracing::info!(router = %self.config.id, "router stopped");
    }
}

/// Runs a router until `shutdown` fires (the binary passes Ctrl-C).
pub async fn run_router(config: RouterConfig, shutdown: CancellationToken) -> crate::Result<()> {
    let router = RunningRouter::start(config).await?;
    println!("{}", router.ready_line());
    let mut warned = BTreeSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(CHECK_PERIOD) => router.check_peers(&mut warned).await,
        }
    }
    router.stop().await;
    Ok(())
}

/// Consecutive checks a peer-mode node must see only routers before it warns (gossip
/// may still be connecting it to its peers directly).
const LONELY_CHECKS: u32 = 3;

/// For a node in peer mode: warns once when, for [`LONELY_CHECKS`] checks in a row, it
/// is connected to Zenoh routers and to no peer at all. Such a node sees nothing of the
/// mesh behind those routers (they do not forward between peers) — the failure of
/// issue 21 — and the warning says what to do. Ends with `cancel`.
pub async fn warn_peer_behind_routers(
    session: zenoh::Session,
    node: String,
    mode: ZenohMode,
    cancel: CancellationToken,
) {
    if mode != ZenohMode::Peer {
        return;
    }
    let mut lonely = 0;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(CHECK_PERIOD) => {}
        }
        let routers = session.info().routers_zid().await.count();
        let peers = session.info().peers_zid().await.count();
        lonely = if routers > 0 && peers == 0 {
            lonely + 1
        } else {
            0
        };
        if lonely >= LONELY_CHECKS {
            tracing::warn!(
                node,
                routers,
                "this peer-mode node is connected only to Zenoh routers, which do not \
                 forward between the peers connected to them: it will see no other node \
                 through them; run nodes behind routers with --mode router (or client)"
            );
            return;
        }
    }
}
