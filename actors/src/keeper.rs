//! `Keeper`: the supervisor of a node's long-lived actors (the placement authority, the
//! node supervisor, the gateway). It spawns its one child linked to itself and, when the
//! child fails or stops on its own, spawns it again after a backoff, at most
//! [`RestartPolicy::max_restarts`] times within [`RestartPolicy::window`]; then it gives
//! up and the child stays down. The child starts from the store each time (state that
//! must survive a restart lives there). [`Health`] says which required actors are down:
//! gRPC health answers `NOT_SERVING` meanwhile.

use std::collections::{BTreeSet, VecDeque};
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::sync::watch;
use tokio::time::Instant;

/// The required actors of a node that are down now (none: the node serves).
#[derive(Clone, Debug)]
pub struct Health {
    down: Arc<watch::Sender<BTreeSet<&'static str>>>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            down: Arc::new(watch::Sender::new(BTreeSet::new())),
        }
    }
}

impl Health {
    fn set(&self, role: &'static str, up: bool) {
        self.down.send_if_modified(|down| {
            if up {
                down.remove(role)
            } else {
                down.insert(role)
            }
        });
    }

    /// Every required actor is up.
    pub fn is_serving(&self) -> bool {
        self.down.borrow().is_empty()
    }

    /// The required actors that are down, by role.
    pub fn down(&self) -> BTreeSet<&'static str> {
        self.down.borrow().clone()
    }

    /// Follows changes (gRPC health does).
    pub fn subscribe(&self) -> watch::Receiver<BTreeSet<&'static str>> {
        self.down.subscribe()
    }
}

/// How often a kept actor may be restarted, and how long to wait before each restart.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RestartPolicy {
    /// Restarts allowed within `window`; the next failure is given up on.
    pub max_restarts: usize,
    pub window: Duration,
    /// The first restart waits this long, each next one twice as long, up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            max_restarts: 5,
            window: Duration::from_secs(60),
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// The current actor of a [`Keeper`]: `None` while it is down.
pub struct Kept<M: ractor::Message> {
    current: watch::Receiver<Option<ActorRef<M>>>,
    keeper: ActorRef<KeeperMsg>,
}

impl<M: ractor::Message> Clone for Kept<M> {
    fn clone(&self) -> Self {
        Kept {
            current: self.current.clone(),
            keeper: self.keeper.clone(),
        }
    }
}

impl<M: ractor::Message> Kept<M> {
    pub fn get(&self) -> Option<ActorRef<M>> {
        self.current.borrow().clone()
    }

    /// The supervising actor (stopping it stops the kept one cleanly).
    pub fn keeper(&self) -> &ActorRef<KeeperMsg> {
        &self.keeper
    }

    /// Waits until an actor other than `not` runs, at most `within`.
    pub async fn restarted(&self, not: &ActorRef<M>, within: Duration) -> Option<ActorRef<M>> {
        let mut rx = self.current.clone();
        tokio::time::timeout(within, async {
            loop {
                if let Some(a) = rx.borrow_and_update().clone() {
                    if a.get_id() != not.get_id() {
                        return Some(a);
                    }
                }
                rx.changed().await.ok()?;
            }
        })
        .await
        .ok()
        .flatten()
    }
}

pub enum KeeperMsg {
    /// Start the child again (after the backoff).
    Restart,
    Inspect(RpcReplyPort<KeeperSnapshot>),
}

/// Observable state of a keeper.
#[derive(Debug, Clone, PartialEq)]
pub struct KeeperSnapshot {
    pub role: &'static str,
    pub up: bool,
    /// Restarts since the node started.
    pub restarts: u64,
    /// Failed too often: not restarted any more.
    pub given_up: bool,
}

/// What a keeper runs: a role name, the actor, and its arguments for each start.
pub struct KeeperArgs<A: Actor> {
    pub role: &'static str,
    pub actor: A,
    pub args: Box<dyn FnMut() -> A::Arguments + Send>,
    pub policy: RestartPolicy,
    pub health: Health,
}

pub struct Keeper<A>(PhantomData<fn() -> A>);

impl<A> Default for Keeper<A> {
    fn default() -> Self {
        Keeper(PhantomData)
    }
}

pub struct KeeperState<A: Actor> {
    spec: KeeperArgs<A>,
    child: Option<ActorRef<A::Msg>>,
    current: watch::Sender<Option<ActorRef<A::Msg>>>,
    failures: VecDeque<Instant>,
    restarts: u64,
    given_up: bool,
}

impl<A: Actor + Clone> KeeperState<A> {
    async fn spawn(&mut self, myself: &ActorRef<KeeperMsg>) -> Result<(), ActorProcessingErr> {
        let args = (self.spec.args)();
        let (child, _) =
            Actor::spawn_linked(None, self.spec.actor.clone(), args, myself.get_cell()).await?;
        self.child = Some(child.clone());
        self.current.send_replace(Some(child));
        self.spec.health.set(self.spec.role, true);
        Ok(())
    }

    /// The child is gone: restart it after a backoff, unless it failed too often.
    fn failed(&mut self, myself: &ActorRef<KeeperMsg>, why: &str) {
        let role = self.spec.role;
        self.child = None;
        self.current.send_replace(None);
        self.spec.health.set(role, false);
        let now = Instant::now();
        let policy = self.spec.policy;
        self.failures.push_back(now);
        while self
            .failures
            .front()
            .is_some_and(|t| now.duration_since(*t) >= policy.window)
        {
            self.failures.pop_front();
        }
        if self.failures.len() > policy.max_restarts {
            tracing::error!(
                role,
                "{role} failed {} times within {:?} ({why}); not restarting",
                self.failures.len(),
                policy.window
            );
            self.given_up = true;
            return;
        }
        let doublings = (self.failures.len() - 1).min(16) as u32;
        let backoff = policy
            .backoff
            .saturating_mul(1 << doublings)
            .min(policy.max_backoff);
        tracing::warn!(role, ?backoff, "{role} stopped ({why}); restarting");
        myself.send_after(backoff, || KeeperMsg::Restart);
    }
}

impl<A> Actor for Keeper<A>
where
    A: Actor + Clone,
{
    type Msg = KeeperMsg;
    type State = KeeperState<A>;
    type Arguments = (KeeperArgs<A>, watch::Sender<Option<ActorRef<A::Msg>>>);

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        (spec, current): Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut state = KeeperState {
            spec,
            child: None,
            current,
            failures: VecDeque::new(),
            restarts: 0,
            given_up: false,
        };
        // The first start fails the node's start (a bad store, a fabric that refuses).
        state.spawn(&myself).await?;
        Ok(state)
    }

    async fn post_stop(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // A clean stop of the node: the child stops cleanly too (a gateway gives back
        // its unused sequence numbers, a node supervisor stops its twins).
        myself
            .stop_children_and_wait(
                Some("node shutting down".into()),
                Some(Duration::from_secs(5)),
            )
            .await;
        state.current.send_replace(None);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            KeeperMsg::Restart => {
                if state.child.is_some() || state.given_up {
                    return Ok(());
                }
                state.restarts += 1;
                match state.spawn(&myself).await {
                    Ok(()) => tracing::info!(role = state.spec.role, "restarted"),
                    Err(e) => state.failed(&myself, &format!("restart failed: {e}")),
                }
            }
            KeeperMsg::Inspect(reply) => {
                let _ = reply.send(KeeperSnapshot {
                    role: state.spec.role,
                    up: state.child.is_some(),
                    restarts: state.restarts,
                    given_up: state.given_up,
                });
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Never stop because the child ended (ractor's default would).
        let (cell, why) = match evt {
            SupervisionEvent::ActorFailed(cell, err) => (cell, err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.unwrap_or_else(|| "stopped".into()))
            }
            _ => return Ok(()),
        };
        if state
            .child
            .as_ref()
            .is_some_and(|c| c.get_id() == cell.get_id())
        {
            state.failed(&myself, &why);
        }
        Ok(())
    }
}

/// Starts `spec`'s actor under a keeper.
pub async fn keep<A: Actor + Clone>(spec: KeeperArgs<A>) -> crate::Result<Kept<A::Msg>> {
    let (tx, rx) = watch::channel(None);
    let (keeper, _) = Actor::spawn(None, Keeper::<A>::default(), (spec, tx))
        .await
        .map_err(crate::Error::actor)?;
    Ok(Kept {
        current: rx,
        keeper,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An actor that fails on any message.
    #[derive(Clone)]
    struct Brittle;

    impl Actor for Brittle {
        type Msg = ();
        type State = ();
        type Arguments = ();

        async fn pre_start(
            &self,
            _myself: ActorRef<()>,
            _args: (),
        ) -> Result<(), ActorProcessingErr> {
            Ok(())
        }

        async fn handle(
            &self,
            _myself: ActorRef<()>,
            _msg: (),
            _state: &mut (),
        ) -> Result<(), ActorProcessingErr> {
            Err("injected failure".into())
        }
    }

    #[tokio::test]
    async fn a_failed_actor_is_restarted_with_backoff_until_the_limit() {
        let health = Health::default();
        let policy = RestartPolicy {
            max_restarts: 2,
            window: Duration::from_secs(60),
            backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
        };
        let kept = keep(KeeperArgs {
            role: "brittle",
            actor: Brittle,
            args: Box::new(|| ()),
            policy,
            health: health.clone(),
        })
        .await
        .unwrap();
        assert!(health.is_serving());
        for n in 1..=2u64 {
            let first = kept.get().expect("up");
            let failed_at = Instant::now();
            first.cast(()).unwrap();
            let mut rx = health.subscribe();
            // Down in between...
            tokio::time::timeout(
                Duration::from_secs(1),
                rx.wait_for(|d| d.contains("brittle")),
            )
            .await
            .expect("health goes down")
            .unwrap();
            assert!(kept.get().is_none());
            // ... and up again after the backoff (50 ms, then 100 ms).
            let next = kept
                .restarted(&first, Duration::from_secs(10))
                .await
                .expect("restarted");
            assert!(failed_at.elapsed() >= Duration::from_millis(50 << (n - 1)));
            assert!(health.is_serving());
            assert_ne!(next.get_id(), first.get_id());
            let snap = ractor::call_t!(kept.keeper(), KeeperMsg::Inspect, 1000).unwrap();
            assert_eq!((snap.up, snap.restarts, snap.given_up), (true, n, false));
        }
        // The third failure within the window: given up, and health stays down.
        kept.get().unwrap().cast(()).unwrap();
        let snap = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let snap = ractor::call_t!(kept.keeper(), KeeperMsg::Inspect, 1000).unwrap();
                if snap.given_up {
                    return snap;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("given up");
        assert_eq!(snap.restarts, 2);
        // Nothing restarts it later either.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let snap = ractor::call_t!(kept.keeper(), KeeperMsg::Inspect, 1000).unwrap();
        assert_eq!((snap.up, snap.restarts, snap.given_up), (false, 2, true));
        assert_eq!(health.down(), BTreeSet::from(["brittle"]));
        assert!(kept.get().is_none());
    }
}
