//! Services every node runs besides its actors: `twinmesh/nodes/{node}/info` (what the
//! placement authority and `ListNodes` read) and `twinmesh/nodes/{node}/twins` (what
//! `ListTwins` reads).

use std::sync::Arc;

use twinmesh_twins::keys;
use twinmesh_twins::proto::{NodeInfo, NodeTwins};

use crate::context::NodeContext;

/// Declares the node's info and twins queryables and serves them until the node stops.
pub async fn serve_node_queryables(ctx: &Arc<NodeContext>, info: NodeInfo) -> crate::Result<()> {
    let info_q = ctx
        .fabric
        .queryable(&keys::node_info(&ctx.node), 64)
        .await?;
    let twins_q = ctx
        .fabric
        .queryable(&keys::node_twins(&ctx.node), 64)
        .await?;
    let c = ctx.clone();
    ctx.spawn_until_cancelled(async move {
        let info_key = keys::node_info(&c.node);
        let twins_key = keys::node_twins(&c.node);
        loop {
            tokio::select! {
                biased;
                q = info_q.rx.recv_async() => {
                    let Ok(q) = q else { break };
                    let mut info = NodeInfo { twins: c.directory.len() as u32, ..info.clone() };
                    // Edge and cloud nodes: the authority hosts twins only on proven ones.
                    c.trust.prove_mesh(&mut info);
                    q.reply_with(&info_key, &info);
                }
                q = twins_q.rx.recv_async() => {
                    let Ok(q) = q else { break };
                    let twins = NodeTwins { node: c.node.to_string(), twins: c.directory.list() };
                    q.reply_with(&twins_key, &twins);
                }
            }
        }
        drop(info_q);
        drop(twins_q);
    });
    Ok(())
}
