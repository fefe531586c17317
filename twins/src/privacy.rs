//! Privacy policies and mechanisms (DESIGN §10): what of a twin's data may leave its
//! site, and how.
//!
//! - [`Policy`]: per signal a [`Sensitivity`] and a [`Mechanism`]; the kind's schema gives
//!   the default, `SetPolicy` replaces it whole (validated, versioned).
//! - [`Ledger`]: the ε (and δ) a twin has spent in its current budget period. It lives
//!   in the twin's snapshot, so restarts, migrations and failovers never reset it.
//! - [`release`]: a differentially private count, bounded sum or mean through OpenDP
//!   (Laplace, or Gaussian through zCDP); the ε charged is exactly what OpenDP's privacy
//!   map gives for the measurement at the policy's input distance.
//! - [`micro_aggregate`] (k-anonymous group aggregates), [`Pseudonymiser`] (keyed
//!   HMAC-SHA256 with rotatable keys) and the egress gate helpers
//!   ([`Policy::gate_twin`], [`Policy::gate_features`]).
//!
//! Noise comes from OpenDP's samplers (OpenSSL's CSPRNG); nothing here does I/O.

use std::collections::BTreeMap;

use hmac::{Hmac, Mac};
use opendp::combinators::{make_fix_delta, make_zCDP_to_approxDP};
use opendp::domains::{AtomDomain, VectorDomain};
use opendp::measurements::{make_gaussian, make_laplace};
use opendp::measures::{MaxDivergence, ZeroConcentratedDivergence};
use opendp::metrics::SymmetricDistance;
use opendp::transformations::{make_clamp, make_count, make_mean, make_resize};
use sha2::Sha256;

use crate::error::{Error, Result};
use crate::kind::{AssetKind, Sensitivity};
use crate::proto;

/// How values of a protected signal may leave the site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// Public signal: raw values travel.
    None,
    /// Differentially private releases (OpenDP).
    Dp,
    /// Aggregates over groups of at least `k` twins.
    MicroAggregate,
    /// Identifiers replaced by a keyed HMAC.
    Pseudonymise,
    /// History only at a coarser time resolution (means or counts over long buckets).
    Coarsen,
    /// Never leaves the site in any form.
    Suppress,
}

impl Mechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::None => "",
            Mechanism::Dp => "dp",
            Mechanism::MicroAggregate => "micro_aggregate",
            Mechanism::Pseudonymise => "pseudonymise",
            Mechanism::Coarsen => "coarsen",
            Mechanism::Suppress => "suppress",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "" | "none" => Mechanism::None,
            "dp" => Mechanism::Dp,
            "micro_aggregate" => Mechanism::MicroAggregate,
            "pseudonymise" | "pseudonymize" => Mechanism::Pseudonymise,
            "coarsen" => Mechanism::Coarsen,
            "suppress" => Mechanism::Suppress,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "unknown mechanism {other:?}: expected dp, micro_aggregate, pseudonymise or suppress"
                )))
            }
        })
    }
}

/// Noise distribution of DP releases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Noise {
    /// Pure ε-DP.
    Laplace,
    /// (ε, δ)-DP: Gaussian noise accounted in zCDP, converted at the policy's δ.
    Gaussian,
}

impl Noise {
    pub fn as_str(self) -> &'static str {
        match self {
            Noise::Laplace => "laplace",
            Noise::Gaussian => "gaussian",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        match s {
            "" | "laplace" => Ok(Noise::Laplace),
            "gaussian" => Ok(Noise::Gaussian),
            other => Err(Error::InvalidArgument(format!(
                "unknown noise {other:?}: expected laplace or gaussian"
            ))),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SignalPolicy {
    pub sensitivity: Sensitivity,
    pub mechanism: Mechanism,
    /// Clamping bounds of DP releases.
    pub lower: f64,
    pub upper: f64,
    /// Smallest group of a micro-aggregate release.
    pub k: u32,
    /// `coarsen`: the shortest history bucket served off the site, ns (0 otherwise).
    pub resolution_ns: i64,
}

impl SignalPolicy {
    pub fn protected(&self) -> bool {
        self.sensitivity != Sensitivity::Public
    }
}

/// A twin's privacy policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub version: u64,
    pub signals: BTreeMap<String, SignalPolicy>,
    /// Identifier streams of the kind: `pseudonymise` (keyed HMAC at the source, the
    /// default), `suppress` (never leave the device) or, when public, none (raw).
    pub identifiers: BTreeMap<String, Mechanism>,
    pub epsilon_per_period: f64,
    pub period_ns: i64,
    pub noise: Noise,
    pub delta: f64,
    pub max_contributions: u32,
}

/// One day: the default budget period.
pub const DEFAULT_PERIOD_NS: i64 = 86_400 * 1_000_000_000;
pub const DEFAULT_EPSILON_PER_PERIOD: f64 = 10.0;
pub const DEFAULT_DELTA: f64 = 1e-7;
pub const DEFAULT_K: u32 = 5;
/// Largest ε one release may ask for.
pub const MAX_RELEASE_EPSILON: f64 = 100.0;

impl Policy {
    /// The kind's default: the schema's sensitivity per signal; protected signals are
    /// released through DP, clamped to the signal's physical range.
    pub fn default_for(kind: AssetKind) -> Policy {
        let signals = kind
            .schema()
            .signals
            .iter()
            .map(|s| {
                let mechanism = match s.sensitivity {
                    Sensitivity::Public => Mechanism::None,
                    _ => Mechanism::Dp,
                };
                (
                    s.name.to_owned(),
                    SignalPolicy {
                        sensitivity: s.sensitivity,
                        mechanism,
                        lower: s.min,
                        upper: s.max,
                        k: DEFAULT_K,
                        resolution_ns: 0,
                    },
                )
            })
            .collect();
        let identifiers = kind
            .schema()
            .identifiers
            .iter()
            .map(|i| (i.name.to_owned(), Mechanism::Pseudonymise))
            .collect();
        Policy {
            version: 1,
            signals,
            identifiers,
            epsilon_per_period: DEFAULT_EPSILON_PER_PERIOD,
            period_ns: DEFAULT_PERIOD_NS,
            noise: Noise::Laplace,
            delta: DEFAULT_DELTA,
            max_contributions: 1,
        }
    }

    /// Validates a policy for a twin of `kind`. Signals the policy leaves out keep the
    /// kind's default; the version is set by the caller.
    pub fn validate(p: &proto::PrivacyPolicy, kind: AssetKind) -> Result<Policy> {
        let mut policy = Policy::default_for(kind);
        let bad = |m: String| Err(Error::InvalidArgument(format!("invalid policy: {m}")));
        for (name, sp) in &p.signals {
            let sensitivity = match proto::Sensitivity::try_from(sp.sensitivity) {
                Ok(proto::Sensitivity::Public) => Sensitivity::Public,
                Ok(proto::Sensitivity::SiteOnly) => Sensitivity::SiteOnly,
                Ok(proto::Sensitivity::Personal) => Sensitivity::Personal,
                _ => return bad(format!("signal {name}: sensitivity must be set")),
            };
            let mut mechanism = Mechanism::parse(&sp.mechanism)?;
            if kind.schema().identifier(name).is_some() {
                let mechanism = match (sensitivity, mechanism) {
                    (Sensitivity::Public, Mechanism::None) => Mechanism::None,
                    (Sensitivity::Public, m) => {
                        return bad(format!(
                            "identifier stream {name} is public: it takes no mechanism (got {})",
                            m.as_str()
                        ))
                    }
                    (_, Mechanism::None | Mechanism::Pseudonymise) => Mechanism::Pseudonymise,
                    (_, Mechanism::Suppress) => Mechanism::Suppress,
                    (_, m) => {
                        return bad(format!(
                            "identifier stream {name}: {} does not apply to identifiers (pseudonymise or suppress)",
                            m.as_str()
                        ))
                    }
                };
                policy.identifiers.insert(name.clone(), mechanism);
                continue;
            }
            let spec = kind.schema().signal(name)?;
            if mechanism == Mechanism::Pseudonymise {
                return bad(format!(
                    "signal {name}: pseudonymise applies to identifier streams, not to measured values"
                ));
            }
            if sensitivity == Sensitivity::Public && mechanism != Mechanism::None {
                return bad(format!(
                    "signal {name} is public: it takes no mechanism (got {})",
                    mechanism.as_str()
                ));
            }
            if sensitivity != Sensitivity::Public && mechanism == Mechanism::None {
                mechanism = Mechanism::Dp;
            }
            let (lower, upper) = if sp.lower == 0.0 && sp.upper == 0.0 {
                (spec.min, spec.max)
            } else {
                (sp.lower, sp.upper)
            };
            if !(lower.is_finite() && upper.is_finite() && lower < upper) {
                return bad(format!(
                    "signal {name}: bounds [{lower}, {upper}] must be finite with lower < upper"
                ));
            }
            let k = if sp.k == 0 { DEFAULT_K } else { sp.k };
            if k < 2 {
                return bad(format!("signal {name}: k = {k} must be at least 2"));
            }
            match (mechanism, sp.resolution_ns) {
                (Mechanism::Coarsen, r) if r < 1_000_000_000 => {
                    return bad(format!(
                        "signal {name}: coarsen needs resolution_ns of at least 1 s (got {r})"
                    ))
                }
                (Mechanism::Coarsen, _) | (_, 0) => {}
                (m, r) => {
                    return bad(format!(
                    "signal {name}: resolution_ns ({r}) applies to the coarsen mechanism, not {}",
                    m.as_str()
                ))
                }
            }
            policy.signals.insert(
                name.clone(),
                SignalPolicy {
                    sensitivity,
                    mechanism,
                    lower,
                    upper,
                    k,
                    resolution_ns: sp.resolution_ns,
                },
            );
        }
        if p.epsilon_per_period != 0.0 {
            if !(p.epsilon_per_period.is_finite() && p.epsilon_per_period > 0.0) {
                return bad(format!(
                    "epsilon_per_period {} must be positive",
                    p.epsilon_per_period
                ));
            }
            policy.epsilon_per_period = p.epsilon_per_period;
        }
        if p.period_ns != 0 {
            if p.period_ns < 1_000_000_000 {
                return bad(format!("period_ns {} must be at least 1 s", p.period_ns));
            }
            policy.period_ns = p.period_ns;
        }
        policy.noise = Noise::parse(&p.noise)?;
        if p.delta != 0.0 {
            if !(p.delta > 0.0 && p.delta < 1e-3) {
                return bad(format!("delta {} must be in (0, 0.001)", p.delta));
            }
            policy.delta = p.delta;
        }
        if p.max_contributions != 0 {
            policy.max_contributions = p.max_contributions;
        }
        Ok(policy)
    }

    pub fn to_proto(&self, twin_id: &str) -> proto::PrivacyPolicy {
        proto::PrivacyPolicy {
            twin_id: twin_id.to_owned(),
            version: self.version,
            signals: self
                .signals
                .iter()
                .map(|(k, s)| {
                    let sensitivity = match s.sensitivity {
                        Sensitivity::Public => proto::Sensitivity::Public,
                        Sensitivity::SiteOnly => proto::Sensitivity::SiteOnly,
                        Sensitivity::Personal => proto::Sensitivity::Personal,
                    };
                    (
                        k.clone(),
                        proto::SignalPolicy {
                            sensitivity: sensitivity as i32,
                            mechanism: s.mechanism.as_str().to_owned(),
                            lower: s.lower,
                            upper: s.upper,
                            k: s.k,
                            resolution_ns: s.resolution_ns,
                        },
                    )
                })
                .chain(self.identifiers.iter().map(|(k, m)| {
                    let sensitivity = match m {
                        Mechanism::None => proto::Sensitivity::Public,
                        _ => proto::Sensitivity::Personal,
                    };
                    (
                        k.clone(),
                        proto::SignalPolicy {
                            sensitivity: sensitivity as i32,
                            mechanism: m.as_str().to_owned(),
                            ..Default::default()
                        },
                    )
                }))
                .collect(),
            epsilon_per_period: self.epsilon_per_period,
            period_ns: self.period_ns,
            noise: self.noise.as_str().to_owned(),
            delta: self.delta,
            max_contributions: self.max_contributions,
        }
    }

    /// The default policy of `kind`, one copy shared by every twin of the kind that has
    /// not changed its policy.
    pub fn shared_default(kind: AssetKind) -> std::sync::Arc<Policy> {
        static DEFAULTS: crate::kind::KindCache<Policy> = crate::kind::KindCache::new();
        kind.shared(&DEFAULTS, Policy::default_for)
    }

    /// [`Policy::from_stored`], sharing the kind's default when the stored policy is
    /// that.
    pub fn from_stored_shared(
        p: &proto::PrivacyPolicy,
        kind: AssetKind,
    ) -> Result<std::sync::Arc<Policy>> {
        let policy = Policy::from_stored(p, kind)?;
        let default = Policy::shared_default(kind);
        Ok(if *default == policy {
            default
        } else {
            std::sync::Arc::new(policy)
        })
    }

    /// Restores a stored policy (snapshot), keeping its version.
    pub fn from_stored(p: &proto::PrivacyPolicy, kind: AssetKind) -> Result<Policy> {
        let mut policy = Policy::validate(p, kind)?;
        policy.version = p.version.max(1);
        Ok(policy)
    }

    pub fn signal(&self, name: &str) -> Option<&SignalPolicy> {
        self.signals.get(name)
    }

    /// `identifier_mechanisms` of a `ChainUpdate`: stream → mechanism name.
    pub fn identifier_mechanisms(&self) -> std::collections::BTreeMap<String, String> {
        self.identifiers
            .iter()
            .map(|(k, m)| (k.clone(), m.as_str().to_owned()))
            .collect()
    }

    /// How an identifier stream leaves its device; unknown streams are suppressed.
    pub fn identifier(&self, name: &str) -> Mechanism {
        self.identifiers
            .get(name)
            .copied()
            .unwrap_or(Mechanism::Suppress)
    }

    /// Raw values of `signal` must stay on the site. Unknown signals are protected.
    pub fn is_protected(&self, signal: &str) -> bool {
        self.signals.get(signal).is_none_or(|s| s.protected())
    }

    /// Signals whose raw values must stay on the site, in name order.
    pub fn protected_signals(&self) -> Vec<String> {
        self.signals
            .iter()
            .filter(|(_, s)| s.protected())
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// What history of `h.signal` (a signal, or a feature `{signal}.{name}`) a caller off
    /// the site may read, as the query to run: unprotected ones (by [`Lineage`]) as
    /// asked; a `coarsen` signal (not its features) only as mean or count over buckets
    /// that are whole multiples of its resolution, on the grid of multiples of the bucket
    /// length from time 0: the range shrinks to the whole grid buckets inside it (partial
    /// buckets at either end are dropped), and a range that holds none is refused
    /// (`InvalidArgument`). So every value released aggregates whole cells of the
    /// signal's resolution grid, whatever ranges and bucket lengths are asked.
    /// Anything else is `PermissionDenied`.
    pub fn offsite_history(
        &self,
        site: &str,
        lineage: &Lineage,
        h: &proto::QueryHistoryRequest,
    ) -> Result<proto::QueryHistoryRequest> {
        let signal = h.signal.as_str();
        if !self.is_protected_feature(signal, lineage) {
            return Ok(h.clone());
        }
        let coarse = self
            .signals
            .get(signal)
            .filter(|s| s.mechanism == Mechanism::Coarsen);
        let Some(s) = coarse else {
            return Err(Error::PermissionDenied(format!(
                "raw history of {signal} stays on site {site} (privacy policy v{}): use ReleaseAggregate",
                self.version
            )));
        };
        let r = s.resolution_ns;
        let b = h.bucket_ns;
        let mean_or_count = matches!(
            h.aggregation(),
            proto::Aggregation::Mean | proto::Aggregation::Count
        );
        if b < r || b % r != 0 || !mean_or_count {
            return Err(Error::PermissionDenied(format!(
                "history of {signal} leaves site {site} only as mean or count over buckets of at least {} s, in whole multiples of it (privacy policy v{})",
                r as f64 / 1e9,
                self.version
            )));
        }
        // Whole grid buckets inside [start, end): in i128, the range may span all of i64.
        let (start, end, b) = (h.start_ns as i128, h.end_ns as i128, b as i128);
        let first = start.div_euclid(b) + i128::from(start.rem_euclid(b) != 0);
        let last = end.div_euclid(b);
        if first >= last {
            return Err(Error::InvalidArgument(format!(
                "history of {signal} leaves site {site} only in whole {} s buckets aligned to multiples of the bucket length: [{}, {}) holds none",
                b as f64 / 1e9,
                h.start_ns,
                h.end_ns
            )));
        }
        // first*b >= start and last*b <= end: both fit in i64.
        Ok(proto::QueryHistoryRequest {
            start_ns: (first * b) as i64,
            end_ns: (last * b) as i64,
            ..h.clone()
        })
    }

    /// Whether anything computed from `feature` (a signal, or `{signal}.{name}`) must
    /// stay on the site: it is when any signal it was computed from is protected
    /// ([`Lineage::sources`]).
    pub fn is_protected_feature(&self, feature: &str, lineage: &Lineage) -> bool {
        lineage.sources(feature).any(|s| self.is_protected(s))
    }

    /// Whether the installed model reads anything protected: then its score, status and
    /// alarms are as protected as its inputs.
    pub fn is_protected_model(&self, lineage: &Lineage) -> bool {
        lineage
            .model
            .iter()
            .any(|f| self.is_protected_feature(f, lineage))
    }

    /// The view of a twin for someone off its site: reported values and features of
    /// protected signals (by lineage) are removed and named in `withheld`, and so is the
    /// health of a model that reads them ([`HEALTH_WITHHELD`]). Sequence numbers survive
    /// only through the snapshot path ([`Policy::gate_snapshot_twin`]).
    pub fn gate_twin(&self, twin: &mut proto::Twin, lineage: &Lineage) {
        let mut withheld: Vec<String> = Vec::new();
        twin.reported.retain(|k, _| {
            let keep = !self.is_protected(k);
            if !keep {
                withheld.push(k.clone());
            }
            keep
        });
        twin.derived
            .retain(|k, _| !self.is_protected_feature(k, lineage));
        for s in self.protected_signals() {
            if !withheld.contains(&s) {
                withheld.push(s);
            }
        }
        if self.gate_health(twin, lineage) {
            withheld.push(HEALTH_WITHHELD.to_owned());
        }
        withheld.sort();
        twin.withheld = withheld;
    }

    /// Clears the model's assessment when the model reads protected features; whether
    /// it did.
    fn gate_health(&self, twin: &mut proto::Twin, lineage: &Lineage) -> bool {
        if !self.is_protected_model(lineage) {
            return false;
        }
        if let Some(h) = twin.health.as_mut() {
            h.anomaly_score = 0.0;
            h.status = HEALTH_WITHHELD.to_owned();
            h.last_alarm.clear();
        }
        true
    }

    /// The twin as it may be replicated off the site (cloud snapshots, migration
    /// hand-over): protected values are replaced by NaN, but their sequence numbers and
    /// timestamps stay, so a new owner admits frames exactly once; protected features
    /// and the health of a model that reads them are left out.
    pub fn gate_snapshot_twin(&self, twin: &mut proto::Twin, lineage: &Lineage) {
        for (k, v) in twin.reported.iter_mut() {
            if self.is_protected(k) {
                v.value = f64::NAN;
            }
        }
        twin.derived
            .retain(|k, _| !self.is_protected_feature(k, lineage));
        self.gate_health(twin, lineage);
        twin.withheld = self.protected_signals();
    }

    /// Features that may be published beyond the site; how many were held back.
    pub fn gate_features(&self, features: &mut BTreeMap<String, f64>, lineage: &Lineage) -> usize {
        let before = features.len();
        features.retain(|k, _| !self.is_protected_feature(k, lineage));
        before - features.len()
    }
}

/// What `Twin.withheld` names (and `Health.status` says) when the installed model reads
/// protected features: its score, status and alarms stay on the site.
pub const HEALTH_WITHHELD: &str = "health";

/// Which signals the twin's features and model are computed from (DESIGN §10: gates go
/// by lineage, not by name). A feature `{signal}.{name}` is computed from `signal` and
/// from every signal an edge stage on `signal` reads besides it (a `bearing` stage's
/// `shaft_signal`), all features of that signal alike (strict: a stage's outputs are
/// not told apart by name). The model reads its features.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Lineage {
    /// Signal analysed → other signals its edge stages read.
    reads: BTreeMap<String, Vec<String>>,
    /// Features the installed model reads.
    model: Vec<String>,
}

impl Lineage {
    /// The lineage of the features of `chain` (no model).
    pub fn of(chain: &crate::chain::Chain) -> Lineage {
        let mut reads: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for s in &chain.stages {
            if let crate::chain::Op::Bearing { shaft_signal, .. } = &s.op {
                if shaft_signal != &s.signal {
                    let r = reads.entry(s.signal.clone()).or_default();
                    if !r.contains(shaft_signal) {
                        r.push(shaft_signal.clone());
                    }
                }
            }
        }
        Lineage {
            reads,
            model: Vec::new(),
        }
    }

    /// The same, with a model that reads `features`.
    pub fn with_model(mut self, features: &[String]) -> Lineage {
        self.model = features.to_vec();
        self
    }

    /// Every signal `feature` (a signal, or `{signal}.{name}`) was computed from.
    pub fn sources<'a>(&'a self, feature: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        let signal = feature.split('.').next().unwrap_or(feature);
        std::iter::once(signal).chain(
            self.reads
                .get(signal)
                .into_iter()
                .flat_map(|r| r.iter().map(String::as_str)),
        )
    }
}

/// ε and δ spent by a twin (or a site) in its current period.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Ledger {
    pub period_start_ns: i64,
    pub epsilon_spent: f64,
    pub delta_spent: f64,
    pub releases: u64,
}

impl Ledger {
    pub fn from_proto(b: &proto::Budget) -> Ledger {
        Ledger {
            period_start_ns: b.period_start_ns,
            epsilon_spent: b.epsilon_spent,
            delta_spent: b.delta_spent,
            releases: b.releases,
        }
    }

    pub fn to_proto(&self, twin_id: &str, policy: &Policy) -> proto::Budget {
        proto::Budget {
            twin_id: twin_id.to_owned(),
            epsilon_total: policy.epsilon_per_period,
            epsilon_spent: self.epsilon_spent,
            period_start_ns: self.period_start_ns,
            releases: self.releases,
            delta_spent: self.delta_spent,
            site: String::new(),
        }
    }

    /// Starts a new period when the current one is over (periods are aligned to
    /// multiples of the period length).
    pub fn roll(&mut self, policy: &Policy, now_ns: i64) {
        self.roll_every(policy.period_ns, now_ns);
    }

    pub fn roll_every(&mut self, period_ns: i64, now_ns: i64) {
        let start = now_ns.div_euclid(period_ns) * period_ns;
        if start > self.period_start_ns {
            *self = Ledger {
                period_start_ns: start,
                ..Ledger::default()
            };
        }
    }

    pub fn remaining(&self, policy: &Policy) -> f64 {
        self.remaining_of(policy.epsilon_per_period)
    }

    pub fn remaining_of(&self, epsilon_per_period: f64) -> f64 {
        (epsilon_per_period - self.epsilon_spent).max(0.0)
    }

    /// Refuses, spending nothing, when `epsilon` does not fit in what is left.
    pub fn check(&self, who: &str, policy: &Policy, epsilon: f64) -> Result<()> {
        self.check_of(who, policy.epsilon_per_period, epsilon)
    }

    pub fn check_of(&self, who: &str, epsilon_per_period: f64, epsilon: f64) -> Result<()> {
        let left = self.remaining_of(epsilon_per_period);
        if epsilon > left {
            return Err(Error::BudgetExhausted {
                who: who.to_owned(),
                requested: epsilon,
                remaining: left,
            });
        }
        Ok(())
    }

    pub fn charge(&mut self, epsilon: f64, delta: f64) {
        self.epsilon_spent += epsilon;
        self.delta_spent += delta;
        self.releases += 1;
    }

    /// Gives back a charge whose release was never made.
    pub fn refund(&mut self, epsilon: f64, delta: f64) {
        self.epsilon_spent = (self.epsilon_spent - epsilon).max(0.0);
        self.delta_spent = (self.delta_spent - delta).max(0.0);
        self.releases = self.releases.saturating_sub(1);
    }
}

/// What a caller may do (DESIGN §10): each RPC states the least role it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Viewer,
    DataOperator,
    DataManager,
    DataOwner,
}

impl Role {
    pub const ALL: [Role; 4] = [
        Role::Viewer,
        Role::DataOperator,
        Role::DataManager,
        Role::DataOwner,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::DataOperator => "data_operator",
            Role::DataManager => "data_manager",
            Role::DataOwner => "data_owner",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// Whether a caller sees raw values of protected signals of a twin of `site`: only on
/// the site's own nodes, and from `data_operator` up. An unknown caller is an off-site
/// viewer.
pub fn sees_raw(caller: Option<&proto::Caller>, site: &str) -> bool {
    caller.is_some_and(|c| {
        c.site == site && Role::parse(&c.role).is_some_and(|r| r >= Role::DataOperator)
    })
}

/// The caller's role; an unknown caller is a viewer.
pub fn role_of(caller: Option<&proto::Caller>) -> Role {
    caller
        .and_then(|c| Role::parse(&c.role))
        .unwrap_or(Role::Viewer)
}

/// Which statistic a release computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Statistic {
    Count,
    Sum,
    Mean,
}

impl Statistic {
    pub fn from_proto(s: i32) -> Result<Statistic> {
        match proto::Statistic::try_from(s) {
            Ok(proto::Statistic::Count) => Ok(Statistic::Count),
            Ok(proto::Statistic::Sum) => Ok(Statistic::Sum),
            Ok(proto::Statistic::Mean) => Ok(Statistic::Mean),
            _ => Err(Error::InvalidArgument(
                "statistic must be count, sum or mean".to_owned(),
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Statistic::Count => "count",
            Statistic::Sum => "sum",
            Statistic::Mean => "mean",
        }
    }
}

/// What a DP release asks for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReleaseSpec {
    pub statistic: Statistic,
    pub noise: Noise,
    pub lower: f64,
    pub upper: f64,
    /// The privacy loss the caller accepts.
    pub epsilon: f64,
    /// δ of a Gaussian release.
    pub delta: f64,
    /// Input distance: records one individual may add or remove.
    pub d_in: u32,
}

/// A released value and its exact privacy loss.
#[derive(Debug, Clone, PartialEq)]
pub struct Release {
    pub value: f64,
    /// OpenDP's privacy map at `d_in`: ε (Laplace) or ε at the fixed δ (Gaussian).
    pub epsilon: f64,
    pub delta: f64,
    /// The noise scale used (Laplace b, or Gaussian σ).
    pub scale: f64,
    pub mechanism: String,
    pub records: u64,
}

/// Checks a requested ε.
pub fn check_epsilon(epsilon: f64) -> Result<()> {
    if epsilon.is_finite() && epsilon > 0.0 && epsilon <= MAX_RELEASE_EPSILON {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "epsilon {epsilon} must be in (0, {MAX_RELEASE_EPSILON}]"
        )))
    }
}

fn dp_error(e: opendp::error::Error) -> Error {
    Error::InvalidArgument(format!("dp release: {}", e.message.unwrap_or_default()))
}

type Map = Box<dyn Fn(f64) -> Result<(f64, f64)>>;
type Invoke = Box<dyn Fn(f64, &Vec<f64>) -> Result<f64>>;

/// The privacy map (ε, δ) at `d_in` and the release function of the measurement at a
/// given noise scale.
fn measurement(spec: &ReleaseSpec, n: usize) -> Result<(Map, Invoke)> {
    let s = *spec;
    let d_in = s.d_in;
    let input = || VectorDomain::new(AtomDomain::<f64>::new_non_nan());
    // One constructor per (statistic, noise): OpenDP's types differ for each.
    macro_rules! noisy {
        ($t:expr, $atom:ty, $to_f64:expr) => {{
            let build_lap = move |scale: f64| -> Result<_> {
                let t = $t?;
                let m = make_laplace::<_, _, MaxDivergence>(
                    t.output_domain.clone(),
                    t.output_metric.clone(),
                    scale,
                    None,
                )
                .map_err(dp_error)?;
                (t >> m).map_err(dp_error)
            };
            let build_gauss = move |scale: f64| -> Result<_> {
                let t = $t?;
                let m = make_gaussian::<_, _, ZeroConcentratedDivergence>(
                    t.output_domain.clone(),
                    t.output_metric.clone(),
                    scale,
                    None,
                )
                .map_err(dp_error)?;
                let m = (t >> m).map_err(dp_error)?;
                let m = make_zCDP_to_approxDP(m).map_err(dp_error)?;
                make_fix_delta(&m, s.delta).map_err(dp_error)
            };
            match s.noise {
                Noise::Laplace => {
                    let map: Map = Box::new(move |scale| {
                        let m = build_lap(scale)?;
                        Ok((m.map(&d_in).map_err(dp_error)?, 0.0))
                    });
                    let invoke: Invoke = Box::new(move |scale, data| {
                        let m = build_lap(scale)?;
                        let v: $atom = m.invoke(data).map_err(dp_error)?;
                        Ok($to_f64(v))
                    });
                    (map, invoke)
                }
                Noise::Gaussian => {
                    let map: Map = Box::new(move |scale| {
                        let m = build_gauss(scale)?;
                        m.map(&d_in).map_err(dp_error)
                    });
                    let invoke: Invoke = Box::new(move |scale, data| {
                        let m = build_gauss(scale)?;
                        let v: $atom = m.invoke(data).map_err(dp_error)?;
                        Ok($to_f64(v))
                    });
                    (map, invoke)
                }
            }
        }};
    }
    let (lo, hi) = (s.lower, s.upper);
    Ok(match s.statistic {
        Statistic::Count => noisy!(
            make_count::<f64, i64>(input(), SymmetricDistance).map_err(dp_error),
            i64,
            |v: i64| v as f64
        ),
        Statistic::Sum => noisy!(
            (make_clamp(input(), SymmetricDistance, (lo, hi)).map_err(dp_error)?
                >> opendp::transformations::then_sum())
            .map_err(dp_error),
            f64,
            |v: f64| v
        ),
        Statistic::Mean => {
            let mid = lo + (hi - lo) / 2.0;
            let size = n.max(1);
            noisy!(
                {
                    let clamp =
                        make_clamp(input(), SymmetricDistance, (lo, hi)).map_err(dp_error)?;
                    let resize = make_resize::<_, SymmetricDistance, SymmetricDistance>(
                        clamp.output_domain.clone(),
                        clamp.output_metric.clone(),
                        size,
                        mid,
                    )
                    .map_err(dp_error)?;
                    let t = (clamp >> resize).map_err(dp_error)?;
                    let mean = make_mean(t.output_domain.clone(), t.output_metric.clone())
                        .map_err(dp_error)?;
                    (t >> mean).map_err(dp_error)
                },
                f64,
                |v: f64| v
            )
        }
    })
}

/// The smallest noise scale (to 1e-9 relative) whose ε at `d_in` is at most the spec's.
/// Scales OpenDP cannot account for (too small) count as too little noise.
fn calibrate(map: &Map, target: f64) -> Result<f64> {
    let eps = |scale: f64| map(scale).map_or(f64::INFINITY, |(e, _)| e);
    let mut hi = 1.0;
    let mut tries = 0;
    while eps(hi) > target {
        hi *= 4.0;
        tries += 1;
        if tries > 60 {
            return Err(Error::InvalidArgument(format!(
                "dp release: no noise scale reaches epsilon {target}"
            )));
        }
    }
    let mut lo = 0.0;
    while (hi - lo) > hi * 1e-9 {
        let mid = lo + (hi - lo) / 2.0;
        if mid <= lo || mid >= hi {
            break;
        }
        if eps(mid) <= target {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok(hi)
}

/// The calibrated noise of a release over `n` records: the smallest scale whose
/// privacy loss is at most the spec's ε, and that loss as OpenDP's map computes it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    pub scale: f64,
    pub epsilon: f64,
    pub delta: f64,
    pub n: usize,
}

fn check_spec(spec: &ReleaseSpec) -> Result<()> {
    check_epsilon(spec.epsilon)?;
    if !(spec.lower.is_finite() && spec.upper.is_finite() && spec.lower < spec.upper) {
        return Err(Error::InvalidArgument(format!(
            "bounds [{}, {}] must be finite with lower < upper",
            spec.lower, spec.upper
        )));
    }
    if spec.d_in == 0 {
        return Err(Error::InvalidArgument(
            "max_contributions must be at least 1".to_owned(),
        ));
    }
    Ok(())
}

/// Calibrates a release over `n` records (`n` matters for the mean only, whose size
/// OpenDP must know; it is the number of records asked for, which is public).
pub fn plan(spec: &ReleaseSpec, n: usize) -> Result<Plan> {
    check_spec(spec)?;
    let (map, _) = measurement(spec, n)?;
    let scale = calibrate(&map, spec.epsilon)?;
    let (epsilon, delta) = map(scale)?;
    Ok(Plan {
        scale,
        epsilon,
        delta,
        n,
    })
}

/// Runs a planned release over `data` (non-finite values are dropped; for the mean,
/// OpenDP resizes the data to the planned size).
pub fn release_planned(spec: &ReleaseSpec, plan: &Plan, data: &[f64]) -> Result<Release> {
    let data: Vec<f64> = data.iter().copied().filter(|v| v.is_finite()).collect();
    let (_, invoke) = measurement(spec, plan.n)?;
    let value = invoke(plan.scale, &data)?;
    Ok(Release {
        value,
        epsilon: plan.epsilon,
        delta: plan.delta,
        scale: plan.scale,
        mechanism: format!("dp_{}_{}", spec.noise.as_str(), spec.statistic.as_str()),
        records: data.len() as u64,
    })
}

/// Share of a mean's ε spent on the noisy count that sizes it.
pub const MEAN_COUNT_SHARE: f64 = 0.5;

/// Largest size a DP mean is calibrated on (a public bound on the noisy count, so a
/// tiny ε cannot make OpenDP's resize allocate without limit).
pub const MAX_MEAN_SIZE: usize = 1 << 21;

/// The two measurements of a DP mean over a number of records that is itself private:
/// a noisy count (ε × [`MEAN_COUNT_SHARE`], δ / 2), then the mean resized to that count
/// (the rest). Sequential composition: the release's loss is the sum of both maps.
pub fn mean_parts(spec: &ReleaseSpec) -> (ReleaseSpec, ReleaseSpec) {
    let count = ReleaseSpec {
        statistic: Statistic::Count,
        epsilon: spec.epsilon * MEAN_COUNT_SHARE,
        delta: spec.delta / 2.0,
        ..*spec
    };
    let mean = ReleaseSpec {
        statistic: Statistic::Mean,
        epsilon: spec.epsilon - count.epsilon,
        delta: spec.delta / 2.0,
        ..*spec
    };
    (count, mean)
}

/// Releases `spec.statistic` of `data` with OpenDP: the noise scale is calibrated so
/// that the measurement's privacy loss is at most `spec.epsilon`, and the release
/// reports the loss exactly as OpenDP's privacy map computes it. The exact number of
/// records is never part of the answer: a mean is sized (and its noise calibrated) on a
/// noisy count ([`mean_parts`]), which `records` reports; a sum or count reports 0.
pub fn release(spec: &ReleaseSpec, data: &[f64]) -> Result<Release> {
    check_spec(spec)?;
    if spec.statistic != Statistic::Mean {
        // Neither needs the size: calibrated without it.
        let p = plan(spec, 0)?;
        let r = release_planned(spec, &p, data)?;
        return Ok(Release { records: 0, ..r });
    }
    let (count_spec, mean_spec) = mean_parts(spec);
    let count = release(&count_spec, data)?;
    let size = (count.value.round().max(1.0) as usize).min(MAX_MEAN_SIZE);
    let p = plan(&mean_spec, size)?;
    let mean = release_planned(&mean_spec, &p, data)?;
    Ok(Release {
        value: mean.value,
        epsilon: count.epsilon + mean.epsilon,
        delta: count.delta + mean.delta,
        scale: mean.scale,
        mechanism: format!("dp_{}_mean", spec.noise.as_str()),
        records: size as u64,
    })
}

/// The privacy loss OpenDP computes for the measurement of `spec` at `scale` over
/// `n` records (what the ledger must record for that release).
pub fn privacy_loss(spec: &ReleaseSpec, n: usize, scale: f64) -> Result<(f64, f64)> {
    check_spec(spec)?;
    let (map, _) = measurement(spec, n)?;
    map(scale)
}

/// An exact aggregate over a group of values, released only when the group has at
/// least `k` members (k-anonymity of micro-aggregation).
pub fn micro_aggregate(statistic: Statistic, values: &[f64], k: u32) -> Result<f64> {
    if values.len() < k as usize {
        return Err(Error::GroupTooSmall {
            size: values.len(),
            k,
        });
    }
    let sum: f64 = values.iter().sum();
    Ok(match statistic {
        Statistic::Count => values.len() as f64,
        Statistic::Sum => sum,
        Statistic::Mean => sum / values.len() as f64,
    })
}

/// The site's fixed micro-aggregation groups over its twins of one kind (`roster`):
/// sorted by id and cut into disjoint groups of `k`, a short last group merged into the
/// one before. The groups depend on the roster only, never on what a caller asks.
pub fn micro_groups(roster: &[String], k: u32) -> Result<Vec<Vec<String>>> {
    let mut ids: Vec<String> = roster.to_vec();
    ids.sort();
    ids.dedup();
    let k = (k as usize).max(2);
    if ids.len() < k {
        return Err(Error::GroupTooSmall {
            size: ids.len(),
            k: k as u32,
        });
    }
    let mut groups: Vec<Vec<String>> = ids.chunks(k).map(<[String]>::to_vec).collect();
    if groups.last().is_some_and(|g| g.len() < k) {
        let short = groups.pop().expect("a last group");
        groups
            .last_mut()
            .expect("at least k ids make one whole group")
            .extend(short);
    }
    Ok(groups)
}

/// The twins a micro-aggregate over `chosen` covers: every whole group that holds one
/// of them (a group is released whole or not at all). Refuses a twin in no group.
pub fn micro_members(groups: &[Vec<String>], chosen: &[String]) -> Result<Vec<String>> {
    let mut members: Vec<String> = Vec::new();
    for c in chosen {
        let g = groups.iter().find(|g| g.contains(c)).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "twin {c} is not in the site's micro-aggregation groups of its kind"
            ))
        })?;
        if !members.contains(&g[0]) {
            members.extend(g.iter().cloned());
        }
    }
    members.sort();
    Ok(members)
}

/// Keyed pseudonyms (HMAC-SHA256) for identifiers such as Wi-Fi device addresses. The
/// key id is part of the pseudonym, so keys rotate without confusing old and new ones.
#[derive(Clone)]
pub struct Pseudonymiser {
    key_id: String,
    key: Vec<u8>,
}

/// A key id (site keys, at-rest keys, pseudonym prefixes): 1 to 64 of `[A-Za-z0-9._-]`.
pub fn valid_key_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

impl std::fmt::Debug for Pseudonymiser {
    // Never print key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pseudonymiser")
            .field("key_id", &self.key_id)
            .finish()
    }
}

impl Pseudonymiser {
    pub fn new(key_id: &str, key: &[u8]) -> Result<Self> {
        if key.len() < 16 {
            return Err(Error::InvalidArgument(format!(
                "pseudonymisation key {key_id} has {} bytes, at least 16 needed",
                key.len()
            )));
        }
        Ok(Pseudonymiser {
            key_id: key_id.to_owned(),
            key: key.to_vec(),
        })
    }

    /// The site's pseudonymisation key, derived from its site key (HMAC-SHA256 with a
    /// fixed label), so the AES key itself never doubles as an HMAC key. Same id.
    pub fn derive(key_id: &str, site_key: &[u8; 32]) -> Self {
        let mut mac = Hmac::<Sha256>::new_from_slice(site_key).expect("hmac takes any key size");
        mac.update(b"twinmesh/pseudonym/v1");
        Pseudonymiser {
            key_id: key_id.to_owned(),
            key: mac.finalize().into_bytes().to_vec(),
        }
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Whether `s` has the form of a pseudonym (`{key id}:{32 hex digits}`).
    pub fn is_pseudonym(s: &str) -> bool {
        let Some((id, tag)) = s.rsplit_once(':') else {
            return false;
        };
        valid_key_id(id)
            && tag.len() == 32
            && tag.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    }

    /// `{key_id}:{first 16 bytes of HMAC-SHA256(key, identifier), hex}`.
    pub fn pseudonym(&self, identifier: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("hmac takes any key size");
        mac.update(identifier.as_bytes());
        let tag = mac.finalize().into_bytes();
        let hex: String = tag[..16].iter().map(|b| format!("{b:02x}")).collect();
        format!("{}:{hex}", self.key_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(statistic: Statistic, noise: Noise, epsilon: f64) -> ReleaseSpec {
        ReleaseSpec {
            statistic,
            noise,
            lower: 0.0,
            upper: 10.0,
            epsilon,
            delta: 1e-7,
            d_in: 1,
        }
    }

    #[test]
    fn default_policy_follows_the_schema() {
        let p = Policy::default_for(AssetKind::PowerMeter);
        assert!(p.is_protected("household_energy"));
        assert!(!p.is_protected("voltage"));
        let l = Lineage::default();
        assert!(p.is_protected_feature("household_energy.mean", &l));
        assert!(!p.is_protected_feature("voltage.rms", &l));
        assert!(p.is_protected("no_such_signal"));
        assert_eq!(p.protected_signals(), vec!["household_energy".to_owned()]);
        assert_eq!(
            p.signal("household_energy").unwrap().mechanism,
            Mechanism::Dp
        );
    }

    fn history(
        signal: &str,
        start_ns: i64,
        end_ns: i64,
        bucket_ns: i64,
        a: proto::Aggregation,
    ) -> proto::QueryHistoryRequest {
        proto::QueryHistoryRequest {
            twin_id: "site-a/pm-01".into(),
            signal: signal.into(),
            start_ns,
            end_ns,
            bucket_ns,
            aggregation: a as i32,
        }
    }

    fn coarsened(resolution_ns: i64) -> (proto::PrivacyPolicy, Policy) {
        let kind = AssetKind::PowerMeter;
        let mut p = Policy::default_for(kind).to_proto("site-a/pm-01");
        let he = p.signals.get_mut("household_energy").unwrap();
        he.mechanism = "coarsen".into();
        he.resolution_ns = resolution_ns;
        let policy = Policy::validate(&p, kind).unwrap();
        (p, policy)
    }

    #[test]
    fn coarsened_history_leaves_only_in_long_buckets_as_mean_or_count() {
        use proto::Aggregation as A;
        let kind = AssetKind::PowerMeter;
        let r = 900_000_000_000;
        let (p, policy) = coarsened(r);
        let l = Lineage::default();
        let ask = |signal: &str, bucket_ns: i64, a: A| {
            policy.offsite_history("site-a", &l, &history(signal, 0, 4 * r, bucket_ns, a))
        };
        assert!(ask("household_energy", r, A::Mean).is_ok());
        assert!(ask("household_energy", 2 * r, A::Count).is_ok());
        let e = ask("household_energy", r - 1, A::Mean).unwrap_err();
        assert_eq!(e.code(), crate::ErrorCode::PermissionDenied);
        assert!(e.to_string().contains("at least 900 s"), "{e}");
        // Not a whole multiple of the resolution: its edges would cut the grid's cells.
        let e = ask("household_energy", r + 1, A::Mean).unwrap_err();
        assert!(e.to_string().contains("whole multiples"), "{e}");
        for a in [A::Min, A::Max, A::Rms] {
            assert!(ask("household_energy", r, a).is_err());
        }
        // Its features stay on site; public signals are not affected.
        assert!(ask("household_energy.mean", r, A::Mean).is_err());
        assert!(ask("voltage", 1, A::Max).is_ok());
        // The default (dp) serves no history off the site at any resolution.
        let dp = Policy::default_for(kind);
        let e = dp
            .offsite_history(
                "site-a",
                &l,
                &history("household_energy", 0, r, 10 * r, A::Mean),
            )
            .unwrap_err();
        assert!(e.to_string().contains("ReleaseAggregate"), "{e}");
        // Round trip, and the checks of resolution_ns.
        let back = Policy::from_stored(&policy.to_proto("site-a/pm-01"), kind).unwrap();
        assert_eq!(back.signal("household_energy").unwrap().resolution_ns, r);
        let mut bad = p.clone();
        bad.signals
            .get_mut("household_energy")
            .unwrap()
            .resolution_ns = 10;
        let e = Policy::validate(&bad, kind).unwrap_err().to_string();
        assert!(e.contains("at least 1 s"), "{e}");
        let mut bad = p;
        bad.signals.get_mut("household_energy").unwrap().mechanism = "dp".into();
        let e = Policy::validate(&bad, kind).unwrap_err().to_string();
        assert!(e.contains("applies to the coarsen mechanism"), "{e}");
    }

    /// The attack of issue 20: off the site, ask a coarsened signal's history over a
    /// range that holds one sample (one nanosecond, or a few around it, or a whole
    /// bucket shifted off the grid) and read the raw sample back as the bucket's mean.
    #[test]
    fn attack_coarsened_history_over_a_nanosecond_gets_no_sample() {
        use crate::stats::HistoryBuckets;
        use proto::Aggregation as A;
        let r = 900_000_000_000;
        let (_, policy) = coarsened(r);
        let l = Lineage::default();
        // One sample per minute over two hours, and one secret at T, inside bucket 1.
        let t = r + 123_456_789_012;
        let secret = 4242.5;
        let samples: Vec<(i64, f64)> = (0..120)
            .map(|i| (i * 60_000_000_000, 1.0))
            .chain([(t, secret)])
            .collect();
        let answer = |start_ns: i64, end_ns: i64, bucket_ns: i64| {
            let q = policy.offsite_history(
                "site-a",
                &l,
                &history("household_energy", start_ns, end_ns, bucket_ns, A::Mean),
            )?;
            let mut b = HistoryBuckets::new(q.start_ns, q.end_ns, q.bucket_ns);
            for &(at, x) in &samples {
                b.push(at, x);
            }
            Ok::<_, Error>(b.finish(crate::stats::Aggregation::Mean))
        };
        for (start, end) in [
            (t, t + 1),
            (t - 1, t + 1),
            (t - r / 2, t + r / 2),
            (t, t + r),
        ] {
            match answer(start, end, r) {
                Err(e) => assert_eq!(e.code(), crate::ErrorCode::InvalidArgument, "{e}"),
                Ok(buckets) => {
                    for b in &buckets {
                        assert_ne!(b.value, secret, "[{start}, {end}) gave the sample back");
                        assert_eq!(b.start_ns % r, 0, "a bucket off the grid");
                    }
                }
            }
        }
        // The narrowest range that answers at all covers the whole aligned bucket: every
        // value aggregates all of it (15 samples of 1 and the secret).
        let whole = answer(t - r / 2, t + r, r).unwrap();
        assert_eq!(whole.len(), 1);
        assert_eq!(whole[0].start_ns, r);
        assert_eq!(whole[0].count, 16);
        assert_eq!(whole[0].value, (15.0 + secret) / 16.0);
        let e = answer(t, t + 1, r).unwrap_err();
        assert!(e.to_string().contains("holds none"), "{e}");
        // Differencing two bucket lengths cannot cut below the grid: 2r buckets start
        // on multiples of 2r, which are multiples of r.
        let two = answer(0, 2 * r, 2 * r).unwrap();
        assert_eq!(two[0].start_ns, 0);
        assert_eq!(two[0].count, 31);
    }

    #[test]
    fn identifier_streams_are_pseudonymised_suppressed_or_public() {
        let kind = AssetKind::WifiAp;
        let d = Policy::default_for(kind);
        assert_eq!(d.identifier("device_associations"), Mechanism::Pseudonymise);
        // Streams the kind does not have are never sent.
        assert_eq!(d.identifier("other"), Mechanism::Suppress);
        assert_eq!(
            d.identifier_mechanisms()["device_associations"],
            "pseudonymise"
        );
        let set = |sensitivity: proto::Sensitivity, mechanism: &str| {
            let mut p = d.to_proto("site-a/ap-01");
            let sp = p.signals.get_mut("device_associations").unwrap();
            sp.sensitivity = sensitivity as i32;
            sp.mechanism = mechanism.into();
            Policy::validate(&p, kind)
        };
        let p = set(proto::Sensitivity::Personal, "suppress").unwrap();
        assert_eq!(p.identifier("device_associations"), Mechanism::Suppress);
        let back = Policy::from_stored(&p.to_proto("site-a/ap-01"), kind).unwrap();
        assert_eq!(back.identifiers, p.identifiers);
        let p = set(proto::Sensitivity::Public, "").unwrap();
        assert_eq!(p.identifier("device_associations"), Mechanism::None);
        // A personal stream named without a mechanism is pseudonymised, never raw.
        let p = set(proto::Sensitivity::Personal, "").unwrap();
        assert_eq!(p.identifier("device_associations"), Mechanism::Pseudonymise);
        let e = set(proto::Sensitivity::Personal, "dp").unwrap_err();
        assert!(
            e.to_string().contains("does not apply to identifiers"),
            "{e}"
        );
        let e = set(proto::Sensitivity::Public, "pseudonymise").unwrap_err();
        assert!(e.to_string().contains("is public"), "{e}");
        // Measured values are not pseudonymised.
        let mut p = d.to_proto("site-a/ap-01");
        p.signals.get_mut("associated_devices").unwrap().mechanism = "pseudonymise".into();
        let e = Policy::validate(&p, kind).unwrap_err();
        assert!(
            e.to_string().contains("applies to identifier streams"),
            "{e}"
        );
    }

    #[test]
    fn validation_names_what_is_wrong() {
        let mut p = Policy::default_for(AssetKind::PowerMeter).to_proto("site-a/pm-01");
        p.signals.get_mut("voltage").unwrap().mechanism = "dp".into();
        let e = Policy::validate(&p, AssetKind::PowerMeter).unwrap_err();
        assert!(e.to_string().contains("voltage is public"), "{e}");
        let mut p = Policy::default_for(AssetKind::PowerMeter).to_proto("site-a/pm-01");
        p.signals.get_mut("household_energy").unwrap().lower = 5.0;
        p.signals.get_mut("household_energy").unwrap().upper = 1.0;
        let e = Policy::validate(&p, AssetKind::PowerMeter).unwrap_err();
        assert!(e.to_string().contains("bounds [5, 1]"), "{e}");
        let mut p = Policy::default_for(AssetKind::PowerMeter).to_proto("site-a/pm-01");
        p.signals
            .insert("nope".into(), proto::SignalPolicy::default());
        assert!(Policy::validate(&p, AssetKind::PowerMeter).is_err());
        let mut p = Policy::default_for(AssetKind::PowerMeter).to_proto("site-a/pm-01");
        p.noise = "uniform".into();
        assert!(Policy::validate(&p, AssetKind::PowerMeter).is_err());
        // A round trip keeps everything.
        let p = Policy::default_for(AssetKind::TurnstileGate);
        let back = Policy::from_stored(&p.to_proto("x/y"), AssetKind::TurnstileGate).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn gates_remove_protected_values() {
        let p = Policy::default_for(AssetKind::PowerMeter);
        let mut t = proto::Twin::default();
        for s in ["voltage", "household_energy"] {
            t.reported.insert(
                s.into(),
                proto::SignalValue {
                    value: 4242.5,
                    timestamp_ns: 1,
                    seq: 7,
                },
            );
        }
        t.derived.insert("household_energy.max".into(), 4242.5);
        t.derived.insert("voltage.rms".into(), 230.0);
        let mut snap = t.clone();
        p.gate_twin(&mut t, &Lineage::default());
        assert!(t.reported.contains_key("voltage"));
        assert!(!t.reported.contains_key("household_energy"));
        assert_eq!(t.derived.len(), 1);
        assert_eq!(t.withheld, vec!["household_energy".to_owned()]);
        p.gate_snapshot_twin(&mut snap, &Lineage::default());
        let he = &snap.reported["household_energy"];
        assert!(he.value.is_nan());
        assert_eq!(he.seq, 7);
        assert_eq!(snap.reported["voltage"].value, 4242.5);
    }

    #[test]
    fn ledger_refuses_what_does_not_fit_and_rolls_periods() {
        let p = Policy {
            epsilon_per_period: 1.0,
            period_ns: 100,
            ..Policy::default_for(AssetKind::PowerMeter)
        };
        let mut l = Ledger::default();
        l.roll(&p, 250);
        assert_eq!(l.period_start_ns, 200);
        l.check("t", &p, 0.6).unwrap();
        l.charge(0.6, 0.0);
        let e = l.check("t", &p, 0.6).unwrap_err();
        assert_eq!(e.code(), crate::ErrorCode::FailedPrecondition);
        assert_eq!(l.epsilon_spent, 0.6);
        l.refund(0.6, 0.0);
        assert_eq!(l.epsilon_spent, 0.0);
        l.charge(0.4, 0.0);
        l.roll(&p, 299);
        assert_eq!(l.epsilon_spent, 0.4);
        l.roll(&p, 300);
        assert_eq!(l.epsilon_spent, 0.0);
        assert_eq!(l.period_start_ns, 300);
    }

    #[test]
    fn releases_charge_exactly_opendps_privacy_map() {
        let data: Vec<f64> = (0..500).map(|i| (i % 11) as f64).collect();
        for statistic in [Statistic::Count, Statistic::Sum, Statistic::Mean] {
            for noise in [Noise::Laplace, Noise::Gaussian] {
                let s = spec(statistic, noise, 0.5);
                let r = release(&s, &data).unwrap();
                let (eps, delta) = if statistic == Statistic::Mean {
                    // The noisy count's loss plus the mean's at the size it gave.
                    let (count, mean) = mean_parts(&s);
                    let c = plan(&count, 0).unwrap();
                    let (e, d) = privacy_loss(&mean, r.records as usize, r.scale).unwrap();
                    (c.epsilon + e, c.delta + d)
                } else {
                    assert_eq!(r.records, 0, "{statistic:?}: the count is not reported");
                    privacy_loss(&s, data.len(), r.scale).unwrap()
                };
                assert!(
                    (r.epsilon - eps).abs() <= 1e-12 * eps,
                    "{statistic:?} {noise:?}"
                );
                assert_eq!(r.delta, delta);
                assert!(r.epsilon <= 0.5 && r.epsilon > 0.5 * 0.999, "{}", r.epsilon);
                if noise == Noise::Gaussian {
                    assert!(r.delta > 0.0 && r.delta <= 1e-7);
                }
            }
        }
    }

    #[test]
    fn laplace_sum_scale_is_sensitivity_over_epsilon() {
        // Clamped to [0, 10], one record changes the sum by at most 10.
        let r = release(&spec(Statistic::Sum, Noise::Laplace, 1.0), &[1.0, 2.0]).unwrap();
        assert!((r.scale - 10.0).abs() / 10.0 < 1e-3, "scale {}", r.scale);
        let r = release(&spec(Statistic::Count, Noise::Laplace, 0.5), &[1.0]).unwrap();
        assert!((r.scale - 2.0).abs() / 2.0 < 1e-3, "scale {}", r.scale);
    }

    /// Kolmogorov–Smirnov statistic of `xs` against `cdf`.
    fn ks(xs: &mut [f64], cdf: impl Fn(f64) -> f64) -> f64 {
        xs.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let n = xs.len() as f64;
        xs.iter()
            .enumerate()
            .map(|(i, &x)| {
                let f = cdf(x);
                (f - i as f64 / n).abs().max((f - (i + 1) as f64 / n).abs())
            })
            .fold(0.0, f64::max)
    }

    fn laplace_cdf(b: f64) -> impl Fn(f64) -> f64 {
        move |x| {
            if x < 0.0 {
                0.5 * (x / b).exp()
            } else {
                1.0 - 0.5 * (-x / b).exp()
            }
        }
    }

    /// erf by Abramowitz–Stegun 7.1.26 (|error| < 1.5e-7).
    fn erf(x: f64) -> f64 {
        let t = 1.0 / (1.0 + 0.3275911 * x.abs());
        let y = 1.0
            - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t
                + 0.254829592)
                * t
                * (-x * x).exp();
        y.copysign(x)
    }

    fn normal_cdf(sigma: f64) -> impl Fn(f64) -> f64 {
        move |x| 0.5 * (1.0 + erf(x / (sigma * std::f64::consts::SQRT_2)))
    }

    #[test]
    fn released_noise_has_the_configured_distribution_and_scale() {
        // 4,000 releases of the sum of an empty data set are pure noise. KS at
        // α = 1e-6: critical value sqrt(ln(2/α)/2)/sqrt(n).
        const N: usize = 4000;
        let crit = ((2.0f64 / 1e-6).ln() / 2.0).sqrt() / (N as f64).sqrt();
        for noise in [Noise::Laplace, Noise::Gaussian] {
            let s = spec(Statistic::Sum, noise, 1.0);
            let p = plan(&s, 0).unwrap();
            let mut xs: Vec<f64> = (0..N)
                .map(|_| release_planned(&s, &p, &[]).unwrap().value)
                .collect();
            let (right, wrong) = match noise {
                Noise::Laplace => (
                    ks(&mut xs, laplace_cdf(p.scale)),
                    ks(&mut xs, laplace_cdf(p.scale * 1.3)),
                ),
                Noise::Gaussian => (
                    ks(&mut xs, normal_cdf(p.scale)),
                    ks(&mut xs, normal_cdf(p.scale * 1.3)),
                ),
            };
            assert!(
                right < crit,
                "{noise:?}: KS {right} ≥ {crit} at scale {}",
                p.scale
            );
            // The same test tells a 30 % wrong scale apart: it can fail.
            assert!(
                wrong > crit,
                "{noise:?}: KS {wrong} did not reject a wrong scale"
            );
        }
    }

    #[test]
    fn bad_release_requests_are_refused() {
        let mut s = spec(Statistic::Sum, Noise::Laplace, 0.0);
        assert!(release(&s, &[1.0]).is_err());
        s.epsilon = f64::NAN;
        assert!(release(&s, &[1.0]).is_err());
        s.epsilon = 1.0;
        s.lower = 3.0;
        s.upper = 3.0;
        assert!(release(&s, &[1.0]).is_err());
    }

    #[test]
    fn raw_values_only_on_site_from_data_operator_up() {
        let c = |site: &str, role: &str| proto::Caller {
            site: site.into(),
            role: role.into(),
            ..Default::default()
        };
        assert!(sees_raw(Some(&c("site-a", "data_operator")), "site-a"));
        assert!(sees_raw(Some(&c("site-a", "data_owner")), "site-a"));
        assert!(!sees_raw(Some(&c("site-a", "viewer")), "site-a"));
        assert!(!sees_raw(Some(&c("cloud", "data_owner")), "site-a"));
        assert!(!sees_raw(Some(&c("site-a", "root")), "site-a"));
        assert!(!sees_raw(None, "site-a"));
        assert!(Role::Viewer < Role::DataOperator && Role::DataManager < Role::DataOwner);
        assert_eq!(role_of(None), Role::Viewer);
    }

    #[test]
    fn micro_aggregates_need_k_members() {
        assert_eq!(
            micro_aggregate(Statistic::Sum, &[1.0, 2.0, 3.0], 3).unwrap(),
            6.0
        );
        let e = micro_aggregate(Statistic::Mean, &[1.0, 2.0], 3).unwrap_err();
        assert_eq!(e.code(), crate::ErrorCode::FailedPrecondition);
    }

    /// The attack of issue 20: releases of a DP mean over data with n and n + 1
    /// records. Before, `records` was n and the noise scale (b − a)/(n ε): either told
    /// n exactly. Now both come from a noisy count, and the same report comes out of
    /// either data set.
    #[test]
    fn attack_dp_mean_does_not_report_the_exact_count() {
        let n = 40;
        let reports = |n: usize| -> Vec<(u64, u64)> {
            let data: Vec<f64> = (0..n).map(|i| (i % 7) as f64).collect();
            (0..40)
                .map(|_| {
                    let r = release(&spec(Statistic::Mean, Noise::Laplace, 1.0), &data).unwrap();
                    (r.records, r.scale.to_bits())
                })
                .collect()
        };
        let (a, b) = (reports(n), reports(n + 1));
        assert!(
            a.iter().any(|x| b.contains(x)),
            "no report of the n-record data is also one of the n+1-record data: {a:?} {b:?}"
        );
        assert!(a.iter().any(|(records, _)| *records != n as u64));
        // The scale is a function of the reported (noisy) size, not of the data.
        let size_of = |scale: u64| a.iter().chain(&b).filter(move |(_, s)| *s == scale);
        for (records, scale) in a.iter().chain(&b) {
            assert!(size_of(*scale).all(|(r, _)| r == records));
        }
    }

    /// The attack of issue 20: six micro-aggregates (k = 5) over the leave-one-out sets
    /// of six turnstiles. Exact means over the caller's sets gave each twin's value back
    /// (6 × mean(all) − 5 × mean(all but i)). With the site's fixed groups every release
    /// covers the same whole group, so all six answers are one number.
    #[test]
    fn attack_leave_one_out_micro_aggregates_give_no_twin_back() {
        let ids: Vec<String> = (1..=6).map(|i| format!("site-a/gate-0{i}")).collect();
        let value = |id: &String| ids.iter().position(|x| x == id).unwrap() as f64 * 10.0 + 3.0;
        let groups = micro_groups(&ids, 5).unwrap();
        assert_eq!(groups.len(), 1, "six twins with k = 5 make one group");
        let answers: Vec<f64> = (0..6)
            .map(|leave| {
                let chosen: Vec<String> = ids
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != leave)
                    .map(|(_, id)| id.clone())
                    .collect();
                let members = micro_members(&groups, &chosen).unwrap();
                let values: Vec<f64> = members.iter().map(value).collect();
                micro_aggregate(Statistic::Mean, &values, 5).unwrap()
            })
            .collect();
        let all = ids.iter().map(value).sum::<f64>() / 6.0;
        for (i, a) in answers.iter().enumerate() {
            assert_eq!(*a, all);
            // The differencing attack recovers nothing but the group's mean.
            let guess = 6.0 * all - 5.0 * a;
            assert_ne!(guess, value(&ids[i]), "twin {i} recovered");
        }
        // Groups are disjoint, at least k, fixed by the roster whatever the order.
        let mut twelve: Vec<String> = (10..22).map(|i| format!("site-a/g{i}")).collect();
        let g = micro_groups(&twelve, 5).unwrap();
        assert_eq!(g.iter().map(Vec::len).collect::<Vec<_>>(), vec![5, 7]);
        twelve.reverse();
        assert_eq!(micro_groups(&twelve, 5).unwrap(), g);
        // One twin picks its whole group, and only that group.
        let m = micro_members(&g, &["site-a/g17".to_owned()]).unwrap();
        assert_eq!(m, g[1]);
        assert!(micro_groups(&ids[..4], 5).is_err());
        assert!(micro_members(&g, &["site-a/zz".to_owned()]).is_err());
    }

    /// The attack of issue 20: a `bearing` stage on the public `voltage` reads the
    /// personal `household_energy` as its shaft signal, so `voltage.shaft_hz` is
    /// household_energy × ratio / 60. By name it was a voltage feature and left the
    /// site; a model over it published |x| as its anomaly score.
    #[test]
    fn attack_features_and_scores_derived_from_a_personal_signal_stay_on_site() {
        use crate::chain::{Chain, ChainSpec, ParamValue, StageSpec};
        let kind = AssetKind::PowerMeter;
        let p = Policy::default_for(kind);
        let mut spec: ChainSpec = Chain::default_for(kind).spec.clone();
        // Edge stages come before the cloud's archive stage.
        let at = spec
            .stage
            .iter()
            .position(|s| s.tier == "cloud")
            .unwrap_or(spec.stage.len());
        spec.stage.insert(
            at,
            StageSpec {
                op: "bearing".into(),
                tier: "edge".into(),
                signal: Some("voltage".into()),
                params: [
                    (
                        "shaft_signal".to_owned(),
                        ParamValue::Text("household_energy".into()),
                    ),
                    ("band".to_owned(), ParamValue::List(vec![500.0, 2000.0])),
                ]
                .into_iter()
                .collect(),
            },
        );
        let chain = Chain::validate(&spec, kind).unwrap();
        let l = Lineage::of(&chain);
        assert_eq!(
            l.sources("voltage.shaft_hz").collect::<Vec<_>>(),
            vec!["voltage", "household_energy"]
        );
        let mut features: BTreeMap<String, f64> = [
            ("voltage.shaft_hz".to_owned(), 4242.5 / 60.0),
            ("voltage.bpfo_amp".to_owned(), 1.0),
            ("household_energy.mean".to_owned(), 4242.5),
        ]
        .into_iter()
        .collect();
        assert_eq!(p.gate_features(&mut features, &l), 3);
        assert!(features.is_empty());
        // Without the bearing stage, voltage's features are public.
        let plain = Lineage::of(&Chain::default_for(kind));
        assert!(!p.is_protected_feature("voltage.shaft_hz", &plain));
        // The model's score inherits the lineage of its features.
        let model = l.clone().with_model(&["voltage.shaft_hz".to_owned()]);
        assert!(p.is_protected_model(&model));
        assert!(!p.is_protected_model(&plain.clone().with_model(&["voltage.rms".to_owned()])));
        let mut t = proto::Twin {
            health: Some(proto::Health {
                anomaly_score: 4242.5,
                status: "alarm".into(),
                model_id: "m".into(),
                model_version: 1,
                last_alarm: "1: score 4242.5".into(),
                reason: String::new(),
            }),
            ..Default::default()
        };
        t.derived.insert("voltage.shaft_hz".into(), 70.7);
        let mut snap = t.clone();
        p.gate_twin(&mut t, &model);
        let h = t.health.as_ref().unwrap();
        assert_eq!(h.anomaly_score, 0.0);
        assert_eq!(h.status, HEALTH_WITHHELD);
        assert!(h.last_alarm.is_empty());
        assert!(t.derived.is_empty());
        assert!(t.withheld.contains(&HEALTH_WITHHELD.to_owned()));
        p.gate_snapshot_twin(&mut snap, &model);
        assert_eq!(snap.health.as_ref().unwrap().anomaly_score, 0.0);
        assert!(snap.derived.is_empty());
        // Nor does its history leave: the feature is personal by lineage.
        let e = p
            .offsite_history(
                "site-a",
                &l,
                &history("voltage.shaft_hz", 0, 1, 1, proto::Aggregation::Mean),
            )
            .unwrap_err();
        assert_eq!(e.code(), crate::ErrorCode::PermissionDenied);
    }

    #[test]
    fn pseudonyms_are_keyed_and_stable() {
        let a = Pseudonymiser::new("k1", &[7u8; 32]).unwrap();
        let b = Pseudonymiser::new("k2", &[8u8; 32]).unwrap();
        let mac = "02:00:00:00:00:2a";
        assert_eq!(a.pseudonym(mac), a.pseudonym(mac));
        assert!(a.pseudonym(mac).starts_with("k1:"));
        assert_ne!(a.pseudonym(mac)[3..], b.pseudonym(mac)[3..]);
        assert_ne!(a.pseudonym(mac), a.pseudonym("02:00:00:00:00:2b"));
        assert!(!a.pseudonym(mac).contains("2a"));
        assert!(Pseudonymiser::new("short", &[1u8; 8]).is_err());
        assert!(Pseudonymiser::is_pseudonym(&a.pseudonym(mac)));
        assert!(!Pseudonymiser::is_pseudonym(mac));
        assert!(!Pseudonymiser::is_pseudonym("k1:0123"));
        assert!(!Pseudonymiser::is_pseudonym(
            ":00112233445566778899aabbccddeeff"
        ));
        // Derived from a site key: stable, keyed, and not the site key itself.
        let d = Pseudonymiser::derive("site-2026", &[7u8; 32]);
        assert_eq!(
            d.pseudonym(mac),
            Pseudonymiser::derive("site-2026", &[7u8; 32]).pseudonym(mac)
        );
        assert_ne!(d.pseudonym(mac)[10..], a.pseudonym(mac)[3..]);
        assert_ne!(
            d.pseudonym(mac),
            Pseudonymiser::derive("site-2026", &[8u8; 32]).pseudonym(mac)
        );
        assert!(!format!("{d:?}").contains("07"));
    }
}
