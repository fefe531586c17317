//! The twin's read cache: its encoded `GetTwin` answers as of its last change, one per
//! view (on the site with a raw view, or gated), which the node's router serves itself,
//! on the fabric's thread, without waking the twin's task or actor.
//!
//! The actor fills a view when it answers a `GetTwin` and empties both before it handles
//! anything else, so a cached answer is always the one the actor would give now: every
//! change of state happens in the actor, after the views were emptied, and nothing is
//! acknowledged to anyone before that.

use std::sync::Mutex;

use bytes::Bytes;
use tokio::time::Instant;

use twinmesh_twins::privacy;
use twinmesh_twins::proto::{twin_request, Caller, TwinRequest};
use twinmesh_twins::TwinId;

use crate::wire;

/// One per twin on an edge node (its id is the router's key for it, so it keeps none).
#[derive(Default)]
pub struct ReplyCache {
    inner: Mutex<Views>,
}

#[derive(Default)]
struct Views {
    /// Encoded `TwinReply`s: the raw view, then the gated one.
    answers: [Option<Bytes>; 2],
    /// When a call was last answered from here (passivation counts it as activity).
    last_hit: Option<Instant>,
}

impl ReplyCache {
    fn views(&self) -> std::sync::MutexGuard<'_, Views> {
        self.inner.lock().expect("views lock")
    }

    /// The cached answer to the encoded twin request `payload` for the twin `twin`
    /// (`{site}/{asset}`), if it is a `GetTwin` of that twin whose view the twin has
    /// answered since its last change.
    pub fn answer(&self, twin: &str, payload: &Bytes) -> Option<Bytes> {
        if self.views().answers.iter().all(Option::is_none) {
            return None;
        }
        let request: TwinRequest = wire::decode(payload).ok()?;
        match &request.request {
            Some(twin_request::Request::GetTwin(get)) if get.twin_id == twin => {}
            _ => return None,
        }
        let view = view(request.caller.as_ref(), site_of(twin));
        let mut views = self.views();
        let answer = views.answers[view].clone()?;
        views.last_hit = Some(Instant::now());
        Some(answer)
    }

    /// Keeps the actor's answer to a `GetTwin` of `caller` for the twin `id`.
    pub(super) fn store(&self, id: &TwinId, caller: Option<&Caller>, answer: Bytes) {
        let view = view(caller, id.site());
        self.views().answers[view] = Some(answer);
    }

    /// Forgets both views: the twin is about to change.
    pub(super) fn clear(&self) {
        self.views().answers = [None, None];
    }

    /// When a call was last answered from the cache.
    pub(super) fn last_hit(&self) -> Option<Instant> {
        self.views().last_hit
    }
}

/// Which cached view a caller gets: 0, raw (on the site, data operator or above), or 1,
/// gated.
fn view(caller: Option<&Caller>, site: &str) -> usize {
    usize::from(!privacy::sees_raw(caller, site))
}

fn site_of(twin: &str) -> &str {
    twin.split_once('/').map_or(twin, |(site, _)| site)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use twinmesh_twins::proto::GetTwinRequest;

    fn get(twin: &str, caller: Option<Caller>) -> Bytes {
        TwinRequest {
            caller,
            request: Some(twin_request::Request::GetTwin(GetTwinRequest {
                twin_id: twin.into(),
            })),
        }
        .encode_to_vec()
        .into()
    }

    fn operator(site: &str) -> Caller {
        Caller {
            site: site.into(),
            role: "data_operator".into(),
            subject: String::new(),
        }
    }

    #[test]
    fn answers_only_a_get_of_this_twin_in_the_callers_view() {
        let cache = ReplyCache::default();
        let id: TwinId = "plant/wt-1".parse().unwrap();
        let on_site = Some(operator("plant"));
        let off_site = Some(operator("elsewhere"));
        assert_eq!(
            cache.answer("plant/wt-1", &get("plant/wt-1", on_site.clone())),
            None
        );
        cache.store(&id, on_site.as_ref(), Bytes::from_static(b"raw"));
        assert_eq!(
            cache.answer("plant/wt-1", &get("plant/wt-1", on_site.clone())),
            Some(Bytes::from_static(b"raw"))
        );
        assert!(cache.last_hit().is_some());
        // Another twin, a gated caller, an anonymous one, garbage: not from here.
        assert_eq!(
            cache.answer("plant/wt-1", &get("plant/wt-2", on_site.clone())),
            None
        );
        assert_eq!(
            cache.answer("plant/wt-1", &get("plant/wt-1", off_site.clone())),
            None
        );
        assert_eq!(cache.answer("plant/wt-1", &get("plant/wt-1", None)), None);
        assert_eq!(
            cache.answer("plant/wt-1", &Bytes::from_static(b"\xff\xff")),
            None
        );
        cache.store(&id, off_site.as_ref(), Bytes::from_static(b"gated"));
        assert_eq!(
            cache.answer("plant/wt-1", &get("plant/wt-1", None)),
            Some(Bytes::from_static(b"gated"))
        );
        cache.clear();
        assert_eq!(
            cache.answer("plant/wt-1", &get("plant/wt-1", on_site)),
            None
        );
        assert_eq!(
            cache.answer("plant/wt-1", &get("plant/wt-1", off_site)),
            None
        );
    }
}
