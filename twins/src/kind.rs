//! Asset kinds (DESIGN §4) and their schemas: which signals a twin of that kind reports,
//! which set-points it accepts, and which events it raises.
//!
//! A kind is data: a W3C WoT Thing Model ([`thing_model`]). The eight built-in kinds are
//! Thing Models embedded in the binary (`twins/models/*.tm.json`) and loaded by the same
//! code as a user's models; more are added at run time with [`register`] (a node's
//! `--models DIR`, or a definition that reached it over the fabric).
//!
//! [`AssetKind`] is a `Copy` index into a process-wide, append-only registry: schemas are
//! interned once (leaked: kinds are few, bounded by [`MAX_KINDS`], and never change once
//! registered), so `kind.schema()` is a lock-free array read and every `&'static str` of
//! a schema stays valid for the life of the process. A kind name means one definition:
//! registering the same name again with the same definition returns the same kind; a
//! different definition, or any definition of a built-in name, is refused.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, LazyLock, OnceLock, RwLock};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::chain::ChainSpec;
use crate::error::{Error, Result};

pub mod thing_model;

pub use thing_model::{ModelError, ThingModel};

/// How far a signal's raw values may travel (DESIGN §10). The privacy issue builds the
/// mechanisms; here the schema records the default classification per signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sensitivity {
    Public,
    SiteOnly,
    Personal,
}

impl Sensitivity {
    pub fn as_str(self) -> &'static str {
        match self {
            Sensitivity::Public => "public",
            Sensitivity::SiteOnly => "site_only",
            Sensitivity::Personal => "personal",
        }
    }
}

/// One measured signal of an asset kind.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SignalSpec {
    pub name: &'static str,
    pub unit: &'static str,
    pub description: &'static str,
    /// Nominal sample rate of the signal in Hz.
    pub rate_hz: f64,
    /// A high-rate waveform (vibration, voltage) rather than a slow process value.
    pub waveform: bool,
    pub sensitivity: Sensitivity,
    /// Physical range of plausible values.
    pub min: f64,
    pub max: f64,
    /// Reporting resolution: every reported value is an integer multiple of it (16-bit
    /// ADC over the range for waveforms, 0.001 units for process values, unless the
    /// model says otherwise), which is what makes frames compress losslessly.
    pub resolution: f64,
}

/// One set-point an operator may command through `SetDesired`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PropertySpec {
    pub name: &'static str,
    pub unit: &'static str,
    pub description: &'static str,
    pub min: f64,
    pub max: f64,
    pub default: f64,
}

/// A stream of identifiers a device reports (DESIGN §4: device associations).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IdentifierSpec {
    pub name: &'static str,
    pub description: &'static str,
}

/// Where a kind's definition came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KindSource {
    /// Embedded in twinmesh.
    BuiltIn,
    /// A Thing Model file this node loaded (`--models DIR`).
    File(String),
    /// A definition that reached this node over the fabric, in a registration of a
    /// gateway of `site` (checked under the site's control key) or from the mesh.
    Fabric { site: String },
}

impl KindSource {
    /// `built-in`, `file` or `fabric`.
    pub fn label(&self) -> &'static str {
        match self {
            KindSource::BuiltIn => "built-in",
            KindSource::File(_) => "file",
            KindSource::Fabric { .. } => "fabric",
        }
    }
}

impl fmt::Display for KindSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KindSource::BuiltIn => f.write_str("built-in"),
            KindSource::File(path) => write!(f, "file {path}"),
            KindSource::Fabric { site } => write!(f, "fabric (site {site})"),
        }
    }
}

/// Everything the platform knows about an asset kind.
#[derive(Debug)]
pub struct KindSchema {
    pub kind: AssetKind,
    /// The kind's name (`twinmesh:kind`).
    pub name: &'static str,
    pub title: &'static str,
    pub description: &'static str,
    pub signals: &'static [SignalSpec],
    pub properties: &'static [PropertySpec],
    /// Event kinds a twin of this kind can raise (besides the platform's own).
    pub events: &'static [&'static str],
    /// Identifier streams (e.g. the addresses of devices associating with an access
    /// point): records of identifiers, not samples. They are personal data and leave
    /// the device only pseudonymised (keyed HMAC) unless the policy says otherwise.
    pub identifiers: &'static [IdentifierSpec],
    /// Healthy history a model of this kind should be trained on at least, in seconds:
    /// long enough to see the asset's normal operating regimes (a day for assets with a
    /// daily cycle). A model trained on less alarms on the regimes it has not seen.
    /// `twinmesh eval` trains on it; a training over less data gets a warning.
    pub training_span_s: i64,
    /// The chain a twin of this kind runs until it is given another.
    pub default_chain: ChainSpec,
    pub source: KindSource,
    /// The Thing Model the kind was read from, as written (what travels to other nodes).
    pub thing_model: &'static str,
    /// The parsed model (to compare a definition with another).
    model: ThingModel,
}

impl KindSchema {
    /// The signal chains apply to when a stage names none: the first waveform, else the
    /// first signal.
    pub fn primary_signal(&self) -> &SignalSpec {
        self.signals
            .iter()
            .find(|s| s.waveform)
            .unwrap_or(&self.signals[0])
    }

    pub fn signal(&self, name: &str) -> Result<&SignalSpec> {
        self.signals
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| Error::UnknownSignal {
                kind: self.name.to_owned(),
                signal: name.to_owned(),
            })
    }

    pub fn identifier(&self, name: &str) -> Option<&IdentifierSpec> {
        self.identifiers.iter().find(|s| s.name == name)
    }

    pub fn property(&self, name: &str) -> Result<&PropertySpec> {
        self.properties
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| Error::UnknownProperty {
                kind: self.name.to_owned(),
                property: name.to_owned(),
                allowed: self
                    .properties
                    .iter()
                    .map(|p| p.name)
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Checks a commanded set-point against the property's range.
    pub fn validate_desired(&self, property: &str, value: f64) -> Result<&PropertySpec> {
        let spec = self.property(property)?;
        if !value.is_finite() || value < spec.min || value > spec.max {
            return Err(Error::ValueOutOfRange {
                property: property.to_owned(),
                value,
                min: spec.min,
                max: spec.max,
            });
        }
        Ok(spec)
    }

    /// The parsed Thing Model of the kind.
    pub fn model(&self) -> &ThingModel {
        &self.model
    }
}

/// An asset kind: a cheap handle on a registered [`KindSchema`]. The built-in kinds
/// have constants (`AssetKind::WindTurbine`, ...), named as the enum they replace was.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AssetKind(u16);

/// Most kinds one process knows (built-in ones included).
pub const MAX_KINDS: usize = 1024;

/// The embedded Thing Models of the built-in kinds, in the order of [`AssetKind::ALL`].
pub const BUILTIN_MODELS: [(&str, &str); 8] = [
    (
        "wind_turbine",
        include_str!("../models/wind_turbine.tm.json"),
    ),
    ("spindle", include_str!("../models/spindle.tm.json")),
    (
        "crankshaft_line",
        include_str!("../models/crankshaft_line.tm.json"),
    ),
    (
        "closure_line",
        include_str!("../models/closure_line.tm.json"),
    ),
    (
        "turnstile_gate",
        include_str!("../models/turnstile_gate.tm.json"),
    ),
    ("wifi_ap", include_str!("../models/wifi_ap.tm.json")),
    ("power_meter", include_str!("../models/power_meter.tm.json")),
    ("hpc_node", include_str!("../models/hpc_node.tm.json")),
];

#[allow(non_upper_case_globals)]
impl AssetKind {
    pub const WindTurbine: AssetKind = AssetKind(0);
    pub const Spindle: AssetKind = AssetKind(1);
    pub const CrankshaftLine: AssetKind = AssetKind(2);
    pub const ClosureLine: AssetKind = AssetKind(3);
    pub const TurnstileGate: AssetKind = AssetKind(4);
    pub const WifiAp: AssetKind = AssetKind(5);
    pub const PowerMeter: AssetKind = AssetKind(6);
    pub const HpcNode: AssetKind = AssetKind(7);

    /// The built-in kinds (the ones with simulators). [`AssetKind::registered`] lists
    /// every kind this process knows.
    pub const ALL: [AssetKind; 8] = [
        AssetKind::WindTurbine,
        AssetKind::Spindle,
        AssetKind::CrankshaftLine,
        AssetKind::ClosureLine,
        AssetKind::TurnstileGate,
        AssetKind::WifiAp,
        AssetKind::PowerMeter,
        AssetKind::HpcNode,
    ];
}

impl AssetKind {
    /// One shared value per kind, built on first use into `cache` by `make` (the default
    /// chain and policy every twin of a kind shares until it changes its own).
    pub fn shared<T: Send + Sync>(
        self,
        cache: &'static KindCache<T>,
        make: fn(AssetKind) -> T,
    ) -> Arc<T> {
        if let Some(v) = cache.0.read().expect("kind cache lock").get(&self) {
            return v.clone();
        }
        let made = Arc::new(make(self));
        cache
            .0
            .write()
            .expect("kind cache lock")
            .entry(self)
            .or_insert(made)
            .clone()
    }

    /// Every kind this process knows: the built-in ones first, then the others in the
    /// order they were registered.
    pub fn registered() -> Vec<AssetKind> {
        let n = registry().read().expect("kind registry lock").len;
        (0..n as u16).map(AssetKind).collect()
    }

    /// The kind's position in the registry: 0..8 for the built-in kinds, in the order
    /// of [`AssetKind::ALL`] (what the enum's discriminant was); stable only within one
    /// process for other kinds.
    pub fn index(self) -> usize {
        self.0 as usize
    }

    /// Whether this is one of the eight kinds twinmesh ships (and simulates).
    pub fn is_builtin(self) -> bool {
        (self.0 as usize) < AssetKind::ALL.len()
    }

    pub fn as_str(self) -> &'static str {
        self.schema().name
    }

    /// Prefix of simulated asset names (`{prefix}-{nn}`); a kind without a simulator
    /// uses its name.
    pub fn prefix(self) -> &'static str {
        match self {
            AssetKind::WindTurbine => "wt",
            AssetKind::Spindle => "sp",
            AssetKind::CrankshaftLine => "cs",
            AssetKind::ClosureLine => "cl",
            AssetKind::TurnstileGate => "tg",
            AssetKind::WifiAp => "ap",
            AssetKind::PowerMeter => "pm",
            AssetKind::HpcNode => "hpc",
            other => other.as_str(),
        }
    }

    pub fn schema(self) -> &'static KindSchema {
        LazyLock::force(&REGISTRY);
        SLOTS[self.0 as usize]
            .get()
            .expect("an AssetKind is only made for a registered kind")
    }
}

/// Per-kind shared values (see [`AssetKind::shared`]).
pub struct KindCache<T>(RwLock<BTreeMap<AssetKind, Arc<T>>>);

impl<T> KindCache<T> {
    pub const fn new() -> Self {
        KindCache(RwLock::new(BTreeMap::new()))
    }
}

impl<T> Default for KindCache<T> {
    fn default() -> Self {
        KindCache::new()
    }
}

struct Registry {
    by_name: HashMap<&'static str, AssetKind>,
    len: usize,
}

static SLOTS: [OnceLock<&'static KindSchema>; MAX_KINDS] = [const { OnceLock::new() }; MAX_KINDS];

static REGISTRY: LazyLock<RwLock<Registry>> = LazyLock::new(|| {
    let mut reg = Registry {
        by_name: HashMap::new(),
        len: 0,
    };
    for (i, (name, text)) in BUILTIN_MODELS.iter().enumerate() {
        let origin = format!("built-in {name}.tm.json");
        let model = ThingModel::parse(text, &origin)
            .unwrap_or_else(|e| panic!("embedded Thing Model does not load: {e}"));
        assert_eq!(model.kind, *name, "{origin} names another kind");
        let kind = insert(&mut reg, model, KindSource::BuiltIn, text);
        assert_eq!(kind, AssetKind::ALL[i], "built-in kinds load in order");
    }
    RwLock::new(reg)
});

fn registry() -> &'static RwLock<Registry> {
    &REGISTRY
}

fn leak(s: &str) -> &'static str {
    Box::leak(s.to_owned().into_boxed_str())
}

/// Interns a checked model in the next slot.
fn insert(reg: &mut Registry, model: ThingModel, source: KindSource, text: &str) -> AssetKind {
    let kind = AssetKind(reg.len as u16);
    let signals: Vec<SignalSpec> = model
        .signals
        .iter()
        .map(|s| SignalSpec {
            name: leak(&s.name),
            unit: leak(&s.unit),
            description: leak(&s.description),
            rate_hz: s.rate_hz,
            waveform: s.waveform,
            sensitivity: s.sensitivity,
            min: s.min,
            max: s.max,
            resolution: s.resolution,
        })
        .collect();
    let properties: Vec<PropertySpec> = model
        .setpoints
        .iter()
        .map(|p| PropertySpec {
            name: leak(&p.name),
            unit: leak(&p.unit),
            description: leak(&p.description),
            min: p.min,
            max: p.max,
            default: p.default,
        })
        .collect();
    let events: Vec<&'static str> = model.events.iter().map(|e| leak(e)).collect();
    let identifiers: Vec<IdentifierSpec> = model
        .identifiers
        .iter()
        .map(|i| IdentifierSpec {
            name: leak(&i.name),
            description: leak(&i.description),
        })
        .collect();
    let schema = KindSchema {
        kind,
        name: leak(&model.kind),
        title: leak(&model.title),
        description: leak(&model.description),
        signals: Box::leak(signals.into_boxed_slice()),
        properties: Box::leak(properties.into_boxed_slice()),
        events: Box::leak(events.into_boxed_slice()),
        identifiers: Box::leak(identifiers.into_boxed_slice()),
        training_span_s: model.training_span_s,
        default_chain: model.default_chain.clone(),
        source,
        thing_model: leak(text),
        model,
    };
    let schema: &'static KindSchema = Box::leak(Box::new(schema));
    SLOTS[kind.0 as usize]
        .set(schema)
        .unwrap_or_else(|_| panic!("kind slot {} is taken", kind.0));
    reg.by_name.insert(schema.name, kind);
    reg.len += 1;
    kind
}

/// Makes `model` (read from `text`) a kind of this process. The same definition again
/// returns the kind it already is; a built-in name, or a name defined differently
/// already, is refused (a model must not change what a kind means to twins that exist).
pub fn register(
    model: ThingModel,
    text: &str,
    source: KindSource,
) -> Result<AssetKind, ModelError> {
    let mut reg = registry().write().expect("kind registry lock");
    if let Some(&known) = reg.by_name.get(model.kind.as_str()) {
        let schema = SLOTS[known.0 as usize]
            .get()
            .expect("a named kind has a slot");
        if known.is_builtin() {
            return Err(ModelError::new(
                &model.origin,
                None,
                format!("kind {} is built in and cannot be redefined", model.kind),
            ));
        }
        if schema.model.same_definition(&model) {
            return Ok(known);
        }
        return Err(ModelError::new(
            &model.origin,
            None,
            format!(
                "kind {} is already defined differently (by {}); a changed model needs a new kind name",
                model.kind, schema.source
            ),
        ));
    }
    if reg.len >= MAX_KINDS {
        return Err(ModelError::new(
            &model.origin,
            None,
            format!("too many kinds: at most {MAX_KINDS}"),
        ));
    }
    Ok(insert(&mut reg, model, source, text))
}

/// Parses and registers a Thing Model (`origin` names it in errors: a file, a site).
pub fn register_text(
    text: &str,
    origin: &str,
    source: KindSource,
) -> Result<AssetKind, ModelError> {
    let model = ThingModel::parse(text, origin)?;
    register(model, text, source)
}

/// The kind named `name`, if this process knows it.
pub fn lookup(name: &str) -> Option<AssetKind> {
    registry()
        .read()
        .expect("kind registry lock")
        .by_name
        .get(name)
        .copied()
}

impl FromStr for AssetKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        lookup(s).ok_or_else(|| Error::UnknownKind(s.to_owned()))
    }
}

impl fmt::Display for AssetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for AssetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AssetKind({})", self.as_str())
    }
}

impl Serialize for AssetKind {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for AssetKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
pub(crate) mod legacy;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_and_has_a_schema() {
        for kind in AssetKind::ALL {
            assert_eq!(kind.as_str().parse::<AssetKind>().unwrap(), kind);
            let schema = kind.schema();
            assert_eq!(schema.kind, kind);
            assert!(!schema.signals.is_empty(), "{kind} has no signals");
            assert!(!schema.properties.is_empty(), "{kind} has no set-points");
            for s in schema.signals {
                assert!(crate::id::is_valid_segment(s.name), "{kind}.{}", s.name);
                assert!(s.min < s.max && s.rate_hz > 0.0);
            }
            for p in schema.properties {
                assert!(
                    p.min <= p.default && p.default <= p.max,
                    "{kind}.{}",
                    p.name
                );
            }
        }
    }

    #[test]
    fn desired_values_are_checked_against_the_schema() {
        let s = AssetKind::WindTurbine.schema();
        assert!(s.validate_desired("power_limit", 1500.0).is_ok());
        let err = s.validate_desired("power_limit", 9000.0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "value 9000 of property power_limit is outside [0, 3000]"
        );
        let err = s.validate_desired("warp_drive", 1.0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown property \"warp_drive\" of wind_turbine: settable properties are power_limit, yaw_offset"
        );
        assert!(s.validate_desired("power_limit", f64::NAN).is_err());
    }

    #[test]
    fn unknown_kind_is_named() {
        assert_eq!(
            "toaster".parse::<AssetKind>().unwrap_err().to_string(),
            "unknown asset kind \"toaster\""
        );
    }

    #[test]
    fn built_in_models_reproduce_the_rust_constants_they_replace() {
        assert_eq!(legacy::ALL.len(), AssetKind::ALL.len());
        for (old, kind) in legacy::ALL.iter().zip(AssetKind::ALL) {
            let new = kind.schema();
            assert_eq!(new.name, old.kind);
            assert_eq!(kind.as_str(), old.kind);
            assert_eq!(new.source, KindSource::BuiltIn);
            assert_eq!(new.title, old.title, "{kind}");
            assert_eq!(new.description, old.description, "{kind}");
            assert_eq!(new.training_span_s, old.training_span_s, "{kind}");
            assert_eq!(new.events, old.events, "{kind}");
            assert_eq!(new.signals.len(), old.signals.len(), "{kind}");
            for (n, o) in new.signals.iter().zip(old.signals) {
                let o = SignalSpec {
                    name: o.name,
                    unit: o.unit,
                    description: o.description,
                    rate_hz: o.rate_hz,
                    waveform: o.waveform,
                    sensitivity: o.sensitivity,
                    min: o.min,
                    max: o.max,
                    resolution: o.resolution,
                };
                // Bit for bit: the resolution decides how frames quantise and compress.
                assert_eq!(
                    n.resolution.to_bits(),
                    o.resolution.to_bits(),
                    "{kind}.{}",
                    o.name
                );
                assert_eq!(*n, o, "{kind}");
            }
            assert_eq!(new.properties.len(), old.properties.len(), "{kind}");
            for (n, o) in new.properties.iter().zip(old.properties) {
                assert_eq!(
                    (n.name, n.unit, n.description, n.min, n.max, n.default),
                    (o.name, o.unit, o.description, o.min, o.max, o.default),
                    "{kind}"
                );
            }
            let ids: Vec<_> = new
                .identifiers
                .iter()
                .map(|i| (i.name, i.description))
                .collect();
            let old_ids: Vec<_> = old
                .identifiers
                .iter()
                .map(|i| (i.name, i.description))
                .collect();
            assert_eq!(ids, old_ids, "{kind}");
            assert_eq!(new.default_chain, legacy::default_spec(old.kind), "{kind}");
            assert_eq!(
                crate::chain::default_spec(kind),
                legacy::default_spec(old.kind)
            );
        }
    }

    const COMPRESSOR: &str = include_str!("../../examples/models/compressor.tm.json");

    /// The example model with its kind renamed (tests share one registry).
    fn compressor(name: &str) -> serde_json::Value {
        let mut v: serde_json::Value = serde_json::from_str(COMPRESSOR).unwrap();
        v["twinmesh:kind"] = name.into();
        v
    }

    fn refusal(v: &serde_json::Value) -> ModelError {
        ThingModel::parse(&v.to_string(), "models/bad.tm.json").unwrap_err()
    }

    #[test]
    fn a_custom_model_becomes_a_kind_with_everything_a_built_in_one_has() {
        let text = compressor("compressor_rt").to_string();
        let kind = register_text(
            &text,
            "models/c.tm.json",
            KindSource::File("models/c.tm.json".into()),
        )
        .unwrap();
        assert!(!kind.is_builtin());
        assert_eq!(kind.as_str(), "compressor_rt");
        assert_eq!("compressor_rt".parse::<AssetKind>().unwrap(), kind);
        assert!(AssetKind::registered().contains(&kind));
        assert_eq!(kind.prefix(), "compressor_rt");
        let s = kind.schema();
        assert_eq!(s.title, "Air compressor");
        assert_eq!(s.training_span_s, 21_600);
        assert_eq!(s.thing_model, text);
        let names: Vec<_> = s.signals.iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            ["discharge_pressure", "motor_current", "operator_badges"]
        );
        let sens: Vec<_> = s.signals.iter().map(|s| s.sensitivity).collect();
        assert_eq!(
            sens,
            [
                Sensitivity::Public,
                Sensitivity::SiteOnly,
                Sensitivity::Personal
            ]
        );
        let p = s.signal("motor_current").unwrap();
        assert_eq!(
            (p.unit, p.min, p.max, p.rate_hz, p.resolution, p.waveform),
            ("A", 0.0, 400.0, 1.0, 0.001, false)
        );
        assert_eq!(s.properties.len(), 1);
        assert_eq!(s.properties[0].default, 10.0);
        assert_eq!(s.events, ["alarm", "overpressure"]);
        assert!(s.validate_desired("pressure_limit", 12.0).is_ok());
        assert!(s.validate_desired("pressure_limit", 15.0).is_err());
        // The chain, the policy and serde work from the model.
        let chain = crate::chain::Chain::default_for(kind);
        assert_eq!(chain.stages.len(), 3);
        assert!(chain.archives());
        let policy = crate::privacy::Policy::default_for(kind);
        assert_eq!(
            policy.protected_signals(),
            ["motor_current", "operator_badges"]
        );
        assert_eq!(serde_json::to_string(&kind).unwrap(), "\"compressor_rt\"");
        assert_eq!(
            serde_json::from_str::<AssetKind>("\"compressor_rt\"").unwrap(),
            kind
        );

        // The same definition, written differently, is the same kind.
        let pretty = serde_json::to_string_pretty(&compressor("compressor_rt")).unwrap();
        assert_eq!(
            register_text(
                &pretty,
                "site-b",
                KindSource::Fabric {
                    site: "site-b".into()
                }
            )
            .unwrap(),
            kind
        );
        // A different one is refused: a personal signal made public.
        let mut v = compressor("compressor_rt");
        v["properties"]["operator_badges"]["twinmesh:sensitivity"] = "public".into();
        let e = register_text(
            &v.to_string(),
            "site-b",
            KindSource::Fabric {
                site: "site-b".into(),
            },
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "site-b: kind compressor_rt is already defined differently (by file models/c.tm.json); a changed model needs a new kind name"
        );
        assert_eq!(
            kind.schema().signal("operator_badges").unwrap().sensitivity,
            Sensitivity::Personal
        );
    }

    #[test]
    fn a_built_in_kind_cannot_be_redefined_even_identically() {
        for (name, text) in BUILTIN_MODELS {
            let e = register_text(text, "models/mine.tm.json", KindSource::File("x".into()))
                .unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("models/mine.tm.json: kind {name} is built in and cannot be redefined")
            );
        }
        let mut v = compressor("power_meter");
        v["properties"]["operator_badges"]["twinmesh:sensitivity"] = "public".into();
        assert!(register_text(
            &v.to_string(),
            "gw",
            KindSource::Fabric { site: "a".into() }
        )
        .is_err());
        assert_eq!(AssetKind::PowerMeter.schema().signals.len(), 3);
    }

    #[test]
    fn bad_models_are_refused_with_the_file_the_property_and_the_reason() {
        let mut v = compressor("c1");
        v.as_object_mut().unwrap().remove("twinmesh:kind");
        assert_eq!(
            refusal(&v).to_string(),
            "models/bad.tm.json: missing \"twinmesh:kind\" (the kind's name)"
        );

        let mut v = compressor("c1");
        v["properties"]["motor_current"]["twinmesh:sensitivity"] = "site-only".into();
        let e = refusal(&v);
        assert_eq!(e.property.as_deref(), Some("motor_current"));
        assert_eq!(
            e.to_string(),
            "models/bad.tm.json: property \"motor_current\": \"twinmesh:sensitivity\" \"site-only\" is not public, site_only or personal"
        );

        let mut v = compressor("c1");
        v["properties"]["discharge_pressure"]["minimum"] = 20.into();
        assert_eq!(
            refusal(&v).to_string(),
            "models/bad.tm.json: property \"discharge_pressure\": minimum 20 must be below maximum 16"
        );

        let mut v = compressor("c1");
        v["properties"]["serial"] = serde_json::json!({"type": "string", "readOnly": true});
        assert_eq!(
            refusal(&v).to_string(),
            "models/bad.tm.json: property \"serial\": type \"string\" is not a number: a kind's signals and set-points are numbers"
        );

        // A JSON object with the same key twice (serde_json's map would keep the last).
        let text = COMPRESSOR.replacen(
            "\"motor_current\": {",
            "\"discharge_pressure\": {\"type\": \"number\", \"readOnly\": true, \"minimum\": 0, \"maximum\": 1, \"twinmesh:rateHz\": 1, \"twinmesh:sensitivity\": \"public\"},\n    \"motor_current\": {",
            1,
        );
        let e = ThingModel::parse(&text, "m.tm.json").unwrap_err();
        assert_eq!(
            e.to_string(),
            "m.tm.json: property \"discharge_pressure\": defined twice (signals, set-points and identifier streams share one name space)"
        );

        let mut v = compressor("c1");
        v["properties"]["motor_current"]["twinmesh:sensitivty"] = "public".into();
        assert!(refusal(&v)
            .reason
            .starts_with("unknown term \"twinmesh:sensitivty\""));

        let mut v = compressor("c1");
        v["properties"]["motor_current"]
            .as_object_mut()
            .unwrap()
            .remove("twinmesh:sensitivity");
        assert_eq!(
            refusal(&v).reason,
            "missing \"twinmesh:sensitivity\" (public, site_only or personal)"
        );

        let mut v = compressor("c1");
        v["properties"]["pressure_limit"]["default"] = 20.into();
        assert_eq!(refusal(&v).reason, "default 20 is outside [4, 14]");

        let mut v = compressor("c1");
        v["twinmesh:defaultChain"][0]["signal"] = "flow".into();
        let e = refusal(&v);
        assert_eq!(e.property.as_deref(), Some("twinmesh:defaultChain"));
        assert_eq!(e.reason, "stage 1 (stats): unknown signal \"flow\" of c1");

        let mut v = compressor("c1");
        v["twinmesh:defaultChain"][0]["op"] = "psd".into();
        assert!(refusal(&v).reason.contains("needs a waveform signal"));

        let mut v = compressor("Bad Name");
        assert!(refusal(&v).reason.contains("is not a valid name"));
        v = compressor("c1");
        v["@type"] = "Thing".into();
        assert_eq!(
            refusal(&v).reason,
            "\"@type\" must include \"tm:ThingModel\""
        );
        v = compressor("c1");
        v["@context"] = "https://www.w3.org/2022/wot/td/v1.1".into();
        assert!(refusal(&v).reason.contains("twinmesh prefix"));
        v = compressor("c1");
        v["properties"]["discharge_pressure"]["twinmesh:rateHz"] = 0.into();
        assert!(refusal(&v).reason.contains("must be in (0, 1000000]"));
        v = compressor("c1");
        v["description"] = "x".repeat(70_000).into();
        assert!(refusal(&v).reason.contains("at most 65536"));
        assert!(ThingModel::parse("[1, 2]", "f")
            .unwrap_err()
            .reason
            .starts_with("not a JSON object"));
        v = compressor("c1");
        for p in ["discharge_pressure", "motor_current", "operator_badges"] {
            v["properties"].as_object_mut().unwrap().remove(p);
        }
        assert!(refusal(&v).reason.starts_with("no signals"));
        v = compressor("c1");
        v["properties"]["pressure_limit"]["twinmesh:sensitivity"] = "public".into();
        assert!(refusal(&v).reason.contains("applies to signals"));
    }

    #[test]
    fn a_model_without_a_chain_gets_statistics_of_every_signal() {
        let mut v = compressor("compressor_nochain");
        v.as_object_mut().unwrap().remove("twinmesh:defaultChain");
        let m = ThingModel::parse(&v.to_string(), "x").unwrap();
        let ops: Vec<_> = m
            .default_chain
            .stage
            .iter()
            .map(|s| (s.op.as_str(), s.signal.as_deref().unwrap_or("")))
            .collect();
        assert_eq!(
            ops,
            [
                ("stats", "discharge_pressure"),
                ("stats", "motor_current"),
                ("stats", "operator_badges"),
                ("archive", "")
            ]
        );
        assert_eq!(m.training_span_s, 21_600);
    }

    /// README.md's "Your own asset kinds" shows the example model verbatim.
    #[test]
    fn the_readme_shows_the_tested_example_model() {
        let readme = include_str!("../../README.md");
        let section = readme
            .split("### Your own asset kinds")
            .nth(1)
            .expect("README has a \"Your own asset kinds\" section");
        let block = section
            .split("```json\n")
            .nth(1)
            .and_then(|b| b.split("```").next())
            .expect("the section shows a JSON model");
        assert_eq!(block, COMPRESSOR);
        ThingModel::parse(block, "README.md").unwrap();
    }
}
