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
use twinmesh_twins::proto::{twin_request, Caller, TwinReply, TwinRequest};
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
    pub fn answer(
        &self,
        twin: &str,
        payload: &Bytes,
        trust: &crate::trust::Trust,
        now_ms: i64,
    ) -> Option<Bytes> {
        if self.views().answers.iter().all(Option::is_none) {
            return None;
        }
        let mut request: TwinRequest = wire::decode(payload).ok()?;
        match &request.request {
            Some(twin_request::Request::GetTwin(get)) if get.twin_id == twin => {}
            _ => return None,
        }
        // The view is the one the caller can be believed to have. The context is only
        // remembered if answered from here (else the twin admits the request itself).
        let tag = trust.admit_unrecorded(&mut request, site_of(twin), now_ms);
        let mut view = view(request.caller.as_ref(), site_of(twin));
        let mut views = self.views();
        views.answers[view].as_ref()?;
        let mut proven_for = None;
        if let (Some(tag), Some(c)) = (tag, request.caller.as_ref()) {
            if trust.remember(&tag, c.expires_ms, now_ms) {
                proven_for = Some(tag);
            } else {
                // Admitted meanwhile by another answer: a replay, anonymous.
                view = 1;
            }
        }
        let answer = views.answers[view].clone()?;
        views.last_hit = Some(Instant::now());
        drop(views);
        Some(match proven_for {
            Some(tag) => trust.prove_reply::<TwinReply>(&tag, answer),
            None => answer,
        })
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
    use crate::seal::KeyRing;
    use crate::trust::Trust;
    use prost::Message;
    use twinmesh_twins::proto::{twin_reply, GetTwinRequest};

    const NOW: i64 = 1_700_000_000_000;

    fn ring(b: u8) -> KeyRing {
        KeyRing::new(vec![("k1".into(), [b; 32])]).unwrap()
    }

    /// An edge of the twin's site, and the cloud: both hold the mesh key.
    fn edge() -> Trust {
        Trust::new("edge", "plant")
            .with_mesh_key(&ring(1))
            .with_site_key(&ring(2))
    }
    fn cloud() -> Trust {
        Trust::new("cloud", "cloud").with_mesh_key(&ring(1))
    }

    /// A GetTwin of a data operator, vouched for by `by` (or sent as is, claiming the
    /// twin's site), and its caller as the asking node keeps it.
    fn get(twin: &str, by: Option<&Trust>) -> (Bytes, Option<Caller>) {
        let mut req = TwinRequest {
            caller: Some(Caller {
                site: "plant".into(),
                role: "data_operator".into(),
                ..Default::default()
            }),
            request: Some(twin_request::Request::GetTwin(GetTwinRequest {
                twin_id: twin.into(),
            })),
        };
        if let Some(t) = by {
            t.vouch(&mut req, NOW);
        }
        (req.encode_to_vec().into(), req.caller)
    }

    /// An encoded reply naming `what`.
    fn answer(what: &str) -> Bytes {
        TwinReply {
            reply: Some(twin_reply::Reply::Twin(twinmesh_twins::proto::Twin {
                twin_id: what.into(),
                ..Default::default()
            })),
            proof: None,
        }
        .encode_to_vec()
        .into()
    }

    #[test]
    fn answers_only_a_get_of_this_twin_in_the_callers_view_once_and_proven() {
        let cache = ReplyCache::default();
        let id: TwinId = "plant/wt-1".parse().unwrap();
        let (edge, cloud) = (edge(), cloud());
        let ask = |payload: &Bytes| cache.answer("plant/wt-1", payload, &edge, NOW);
        // What the asking node (`by`) makes of an answer: the twin it names, if proven
        // for its request.
        let named = |by: &Trust, caller: &Option<Caller>, bytes: Option<Bytes>| {
            let r: TwinReply = by.answer(caller.as_ref(), &bytes?)?;
            match r.reply {
                Some(twin_reply::Reply::Twin(t)) => Some(t.twin_id),
                _ => None,
            }
        };
        let (on_site, on_caller) = get("plant/wt-1", Some(&edge));
        let (off_site, off_caller) = get("plant/wt-1", Some(&cloud));
        let (forged, _) = get("plant/wt-1", None);
        // Not answered from here: not remembered either (the twin admits it).
        assert_eq!(ask(&on_site), None);
        let raw_caller = Caller {
            site: "plant".into(),
            role: "data_operator".into(),
            ..Default::default()
        };
        cache.store(&id, Some(&raw_caller), answer("raw"));
        assert_eq!(
            named(&edge, &on_caller, ask(&on_site)).as_deref(),
            Some("raw")
        );
        assert!(cache.last_hit().is_some());
        // The same request again (a replay): an anonymous caller's, nothing raw.
        assert_eq!(ask(&on_site), None);
        // Another twin, a caller off the site, a forged on-site claim, garbage: not
        // from the raw view.
        assert_eq!(ask(&get("plant/wt-2", Some(&edge)).0), None);
        assert_eq!(ask(&off_site), None);
        assert_eq!(ask(&forged), None);
        assert_eq!(ask(&Bytes::from_static(b"\xff\xff")), None);
        cache.store(&id, None, answer("gated"));
        assert_eq!(
            ask(&forged),
            Some(answer("gated")),
            "unproven: nothing to bind"
        );
        assert_eq!(
            named(&cloud, &off_caller, ask(&off_site)).as_deref(),
            Some("gated")
        );
        // Replayed, the on-site request gets the gated view, and no proof.
        assert_eq!(ask(&on_site), Some(answer("gated")));
        let (again, again_caller) = get("plant/wt-1", Some(&edge));
        let reply = ask(&again);
        assert_eq!(
            named(&edge, &again_caller, reply.clone()).as_deref(),
            Some("raw")
        );
        // The proof binds the reply to its request: not good for another one.
        assert_eq!(named(&edge, &on_caller, reply), None);
        cache.clear();
        let (fresh, _) = get("plant/wt-1", Some(&edge));
        assert_eq!(ask(&fresh), None);
    }
}
