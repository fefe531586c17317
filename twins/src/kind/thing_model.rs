//! Reading an asset kind from a W3C WoT Thing Model (TD 1.1 `tm:ThingModel`).
//!
//! Number properties are what a twin knows: `readOnly: true` ones are signals, writable
//! ones set-points, with WoT's `unit`, `minimum`, `maximum`, `title`, `description` and
//! (set-points) `default`. What WoT has no word for are twinmesh terms, under a prefix
//! the model's `@context` declares (`{"twinmesh": "urn:twinmesh:vocab#"}`):
//!
//! | where | term | meaning |
//! |---|---|---|
//! | model | `twinmesh:kind` | the kind's name (required, `[a-z0-9][a-z0-9_-]{0,62}`) |
//! | model | `twinmesh:trainingSpanSeconds` | healthy history a model should train on (default a day) |
//! | model | `twinmesh:defaultChain` | the default processing chain, a list of stages (default: `stats` of each signal at the edge, `archive` of features in the cloud) |
//! | model | `twinmesh:identifiers` | identifier streams, `{name: {"description": ...}}` |
//! | signal | `twinmesh:sensitivity` | `public`, `site_only` or `personal` (required) |
//! | signal | `twinmesh:rateHz` | nominal sample rate (required) |
//! | signal | `twinmesh:waveform` | a high-rate waveform (default false) |
//! | signal | `twinmesh:resolution` | reporting resolution (default: range / 65536 for waveforms, 0.001 otherwise) |
//!
//! WoT `events` are the kind's events. Anything else WoT allows (`links`, `version`,
//! `tm:required`...) is accepted and ignored; an unknown `twinmesh:` term is refused (a
//! misspelt `twinmesh:sensitivty` must not silently make a signal public). Every refusal
//! names the model, the property and the reason.

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

use crate::chain::{ChainSpec, ParamValue, StageSpec};
use crate::id::is_valid_segment;

use super::Sensitivity;

/// Largest Thing Model accepted, in bytes.
pub const MAX_MODEL_BYTES: usize = 64 * 1024;
/// Most properties (signals and set-points) of one kind.
pub const MAX_PROPERTIES: usize = 256;
/// Most events, and most identifier streams, of one kind.
pub const MAX_EVENTS: usize = 64;
/// Longest text (title, description, unit) in a model.
pub const MAX_TEXT: usize = 1024;
/// Highest sample rate a signal may declare, in Hz.
pub const MAX_RATE_HZ: f64 = 1_000_000.0;

const TM_TYPE: &str = "tm:ThingModel";
const PREFIX: &str = "twinmesh:";
const MODEL_TERMS: [&str; 4] = [
    "twinmesh:kind",
    "twinmesh:trainingSpanSeconds",
    "twinmesh:defaultChain",
    "twinmesh:identifiers",
];
const SIGNAL_TERMS: [&str; 4] = [
    "twinmesh:sensitivity",
    "twinmesh:rateHz",
    "twinmesh:waveform",
    "twinmesh:resolution",
];

/// A model refused: which model, which property (when one is at fault), and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{origin}: {}{reason}", property.as_ref().map(|p| format!("property {p:?}: ")).unwrap_or_default())]
pub struct ModelError {
    /// The model: a file path, or where it came from.
    pub origin: String,
    pub property: Option<String>,
    pub reason: String,
}

impl ModelError {
    pub fn new(origin: &str, property: Option<&str>, reason: impl Into<String>) -> Self {
        ModelError {
            origin: origin.to_owned(),
            property: property.map(str::to_owned),
            reason: reason.into(),
        }
    }
}

impl From<ModelError> for crate::Error {
    fn from(e: ModelError) -> Self {
        crate::Error::InvalidArgument(e.to_string())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Signal {
    pub name: String,
    pub unit: String,
    pub description: String,
    pub rate_hz: f64,
    pub waveform: bool,
    pub sensitivity: Sensitivity,
    pub min: f64,
    pub max: f64,
    pub resolution: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Setpoint {
    pub name: String,
    pub unit: String,
    pub description: String,
    pub min: f64,
    pub max: f64,
    pub default: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Identifier {
    pub name: String,
    pub description: String,
}

/// A checked Thing Model: a kind definition ready to register.
#[derive(Debug, Clone)]
pub struct ThingModel {
    /// Where it was read from (errors name it).
    pub origin: String,
    pub kind: String,
    pub title: String,
    pub description: String,
    pub signals: Vec<Signal>,
    pub setpoints: Vec<Setpoint>,
    pub events: Vec<String>,
    pub identifiers: Vec<Identifier>,
    pub training_span_s: i64,
    pub default_chain: ChainSpec,
}

/// A JSON object with its keys in written order, duplicates kept (serde_json's map
/// would sort them and keep the last of two equal keys silently).
struct Ordered(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Ordered {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Ordered;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Ordered, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = m.next_entry::<String, Value>()? {
                    out.push((k, v));
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(Deserialize)]
struct Raw {
    #[serde(default)]
    properties: Option<Ordered>,
    #[serde(default)]
    events: Option<Ordered>,
    #[serde(default, rename = "twinmesh:identifiers")]
    identifiers: Option<Ordered>,
}

impl ThingModel {
    /// Reads and checks a Thing Model; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<ThingModel, ModelError> {
        let err =
            |property: Option<&str>, reason: String| ModelError::new(origin, property, reason);
        if text.len() > MAX_MODEL_BYTES {
            return Err(err(
                None,
                format!("model is {} bytes, at most {MAX_MODEL_BYTES}", text.len()),
            ));
        }
        let top: Map<String, Value> =
            serde_json::from_str(text).map_err(|e| err(None, format!("not a JSON object: {e}")))?;
        let raw: Raw =
            serde_json::from_str(text).map_err(|e| err(None, format!("not a Thing Model: {e}")))?;

        let is_tm = match top.get("@type") {
            Some(Value::String(t)) => t == TM_TYPE,
            Some(Value::Array(ts)) => ts.iter().any(|t| t == TM_TYPE),
            _ => false,
        };
        if !is_tm {
            return Err(err(None, format!("\"@type\" must include {TM_TYPE:?}")));
        }
        let declares_prefix = match top.get("@context") {
            Some(Value::Array(cs)) => cs
                .iter()
                .any(|c| c.as_object().is_some_and(|o| o.contains_key("twinmesh"))),
            Some(Value::Object(o)) => o.contains_key("twinmesh"),
            _ => false,
        };
        if !declares_prefix {
            return Err(err(
                None,
                "\"@context\" must declare the twinmesh prefix, e.g. {\"twinmesh\": \"urn:twinmesh:vocab#\"}".into(),
            ));
        }
        for key in top.keys().filter(|k| k.starts_with(PREFIX)) {
            if !MODEL_TERMS.contains(&key.as_str()) {
                return Err(err(
                    None,
                    format!(
                        "unknown term {key:?}; twinmesh terms of a model are {}",
                        MODEL_TERMS.join(", ")
                    ),
                ));
            }
        }

        let kind = match top.get("twinmesh:kind") {
            Some(Value::String(k)) if is_valid_segment(k) => k.clone(),
            Some(Value::String(k)) => {
                return Err(err(
                    None,
                    format!(
                        "\"twinmesh:kind\" {k:?} is not a valid name: [a-z0-9][a-z0-9_-]{{0,62}}"
                    ),
                ))
            }
            Some(_) => return Err(err(None, "\"twinmesh:kind\" must be a string".into())),
            None => {
                return Err(err(
                    None,
                    "missing \"twinmesh:kind\" (the kind's name)".into(),
                ))
            }
        };
        let title = text_field(&top, "title", origin, None)?.unwrap_or_else(|| kind.clone());
        let description = text_field(&top, "description", origin, None)?.unwrap_or_default();
        let training_span_s = match top.get("twinmesh:trainingSpanSeconds") {
            None => 86_400,
            Some(v) => match v.as_i64() {
                Some(s) if s > 0 && s <= 366 * 86_400 => s,
                _ => {
                    return Err(err(
                        None,
                        format!("\"twinmesh:trainingSpanSeconds\" must be a whole number of seconds in 1..={}, not {v}", 366 * 86_400),
                    ))
                }
            },
        };

        let properties = raw.properties.map(|o| o.0).unwrap_or_default();
        if properties.len() > MAX_PROPERTIES {
            return Err(err(
                None,
                format!("{} properties, at most {MAX_PROPERTIES}", properties.len()),
            ));
        }
        let mut names: Vec<String> = Vec::new();
        let mut unique = |name: &str, what: &str| -> Result<(), ModelError> {
            if !is_valid_segment(name) {
                return Err(ModelError::new(
                    origin,
                    Some(name),
                    format!("not a valid {what} name: [a-z0-9][a-z0-9_-]{{0,62}}"),
                ));
            }
            if names.iter().any(|n| n == name) {
                return Err(ModelError::new(
                    origin,
                    Some(name),
                    "defined twice (signals, set-points and identifier streams share one name space)",
                ));
            }
            names.push(name.to_owned());
            Ok(())
        };
        let mut signals = Vec::new();
        let mut setpoints = Vec::new();
        for (name, value) in &properties {
            unique(name, "property")?;
            let perr = |reason: String| ModelError::new(origin, Some(name), reason);
            let Value::Object(p) = value else {
                return Err(perr("must be an object".into()));
            };
            match p.get("type").and_then(Value::as_str) {
                Some("number" | "integer") => {}
                Some(t) => {
                    return Err(perr(format!(
                        "type {t:?} is not a number: a kind's signals and set-points are numbers"
                    )))
                }
                None => return Err(perr("missing \"type\": \"number\"".into())),
            }
            let read_only = match p.get("readOnly") {
                None => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err(perr("\"readOnly\" must be true or false".into())),
            };
            let description = match text_field(p, "description", origin, Some(name))? {
                Some(d) => d,
                None => text_field(p, "title", origin, Some(name))?.unwrap_or_default(),
            };
            let unit = text_field(p, "unit", origin, Some(name))?.unwrap_or_else(|| "1".into());
            let min = number(p, "minimum", origin, name)?;
            let max = number(p, "maximum", origin, name)?;
            if min > max || (read_only && min == max) {
                return Err(perr(format!("minimum {min} must be below maximum {max}")));
            }
            if read_only {
                for key in p.keys().filter(|k| k.starts_with(PREFIX)) {
                    if !SIGNAL_TERMS.contains(&key.as_str()) {
                        return Err(perr(format!(
                            "unknown term {key:?}; twinmesh terms of a signal are {}",
                            SIGNAL_TERMS.join(", ")
                        )));
                    }
                }
                let sensitivity = match p.get("twinmesh:sensitivity") {
                    Some(Value::String(s)) => match s.as_str() {
                        "public" => Sensitivity::Public,
                        "site_only" => Sensitivity::SiteOnly,
                        "personal" => Sensitivity::Personal,
                        other => {
                            return Err(perr(format!(
                                "\"twinmesh:sensitivity\" {other:?} is not public, site_only or personal"
                            )))
                        }
                    },
                    Some(_) => {
                        return Err(perr(
                            "\"twinmesh:sensitivity\" must be public, site_only or personal".into(),
                        ))
                    }
                    None => {
                        return Err(perr(
                            "missing \"twinmesh:sensitivity\" (public, site_only or personal)".into(),
                        ))
                    }
                };
                let rate_hz = number(p, "twinmesh:rateHz", origin, name)?;
                if !(rate_hz > 0.0 && rate_hz <= MAX_RATE_HZ) {
                    return Err(perr(format!(
                        "\"twinmesh:rateHz\" {rate_hz} must be in (0, {MAX_RATE_HZ}]"
                    )));
                }
                let waveform = match p.get("twinmesh:waveform") {
                    None => false,
                    Some(Value::Bool(b)) => *b,
                    Some(_) => {
                        return Err(perr("\"twinmesh:waveform\" must be true or false".into()))
                    }
                };
                let resolution = match p.get("twinmesh:resolution") {
                    None if waveform => (max - min) / 65536.0,
                    None => 0.001,
                    Some(_) => {
                        let r = number(p, "twinmesh:resolution", origin, name)?;
                        if r <= 0.0 {
                            return Err(perr(format!(
                                "\"twinmesh:resolution\" {r} must be positive"
                            )));
                        }
                        r
                    }
                };
                signals.push(Signal {
                    name: name.clone(),
                    unit,
                    description,
                    rate_hz,
                    waveform,
                    sensitivity,
                    min,
                    max,
                    resolution,
                });
            } else {
                if let Some(key) = p.keys().find(|k| k.starts_with(PREFIX)) {
                    return Err(perr(format!(
                        "{key:?} applies to signals (readOnly properties) only"
                    )));
                }
                let default = match p.get("default") {
                    None => return Err(perr("a set-point needs a \"default\" value".into())),
                    Some(_) => number(p, "default", origin, name)?,
                };
                if default < min || default > max {
                    return Err(perr(format!("default {default} is outside [{min}, {max}]")));
                }
                setpoints.push(Setpoint {
                    name: name.clone(),
                    unit,
                    description,
                    min,
                    max,
                    default,
                });
            }
        }
        if signals.is_empty() {
            return Err(err(
                None,
                "no signals: a kind needs at least one readOnly number property".into(),
            ));
        }

        let mut identifiers = Vec::new();
        let raw_ids = raw.identifiers.map(|o| o.0).unwrap_or_default();
        if raw_ids.len() > MAX_EVENTS {
            return Err(err(
                None,
                format!("{} identifier streams, at most {MAX_EVENTS}", raw_ids.len()),
            ));
        }
        for (name, value) in &raw_ids {
            unique(name, "identifier stream")?;
            let Value::Object(o) = value else {
                return Err(ModelError::new(
                    origin,
                    Some(name),
                    "an identifier stream must be an object",
                ));
            };
            identifiers.push(Identifier {
                name: name.clone(),
                description: text_field(o, "description", origin, Some(name))?.unwrap_or_default(),
            });
        }

        let raw_events = raw.events.map(|o| o.0).unwrap_or_default();
        if raw_events.len() > MAX_EVENTS {
            return Err(err(
                None,
                format!("{} events, at most {MAX_EVENTS}", raw_events.len()),
            ));
        }
        let mut events: Vec<String> = Vec::new();
        for (name, _) in &raw_events {
            if !is_valid_segment(name) {
                return Err(ModelError::new(
                    origin,
                    Some(name),
                    "not a valid event name: [a-z0-9][a-z0-9_-]{0,62}",
                ));
            }
            if events.contains(name) {
                return Err(ModelError::new(origin, Some(name), "event defined twice"));
            }
            events.push(name.clone());
        }

        let default_chain = match top.get("twinmesh:defaultChain") {
            None => generated_chain(&signals),
            Some(v) => {
                let stage: Vec<StageSpec> = serde_json::from_value(v.clone()).map_err(|e| {
                    err(
                        Some("twinmesh:defaultChain"),
                        format!("not a list of stages: {e}"),
                    )
                })?;
                ChainSpec { stage }
            }
        };

        let model = ThingModel {
            origin: origin.to_owned(),
            kind,
            title,
            description,
            signals,
            setpoints,
            events,
            identifiers,
            training_span_s,
            default_chain,
        };
        crate::chain::Chain::check_for_model(&model.default_chain, &model)
            .map_err(|e| err(Some("twinmesh:defaultChain"), e.to_string()))?;
        Ok(model)
    }

    /// Whether two models define the same kind (wherever and however they were written).
    pub fn same_definition(&self, other: &ThingModel) -> bool {
        self.kind == other.kind
            && self.title == other.title
            && self.description == other.description
            && self.signals == other.signals
            && self.setpoints == other.setpoints
            && self.events == other.events
            && self.identifiers == other.identifiers
            && self.training_span_s == other.training_span_s
            && self.default_chain == other.default_chain
    }

    /// The signal chains apply to when a stage names none (as [`super::KindSchema`]).
    pub fn primary_signal(&self) -> &Signal {
        self.signals
            .iter()
            .find(|s| s.waveform)
            .unwrap_or(&self.signals[0])
    }
}

/// The default chain of a model that gives none: statistics of each signal at the edge
/// (as many as a chain holds), features archived in the cloud.
fn generated_chain(signals: &[Signal]) -> ChainSpec {
    let mut stage: Vec<StageSpec> = signals
        .iter()
        .take(crate::chain::MAX_STAGES - 1)
        .map(|s| StageSpec {
            op: "stats".into(),
            tier: "edge".into(),
            signal: Some(s.name.clone()),
            params: [("window_s".to_owned(), ParamValue::Number(60.0))]
                .into_iter()
                .collect(),
        })
        .collect();
    stage.push(StageSpec {
        op: "archive".into(),
        tier: "cloud".into(),
        signal: None,
        params: [("keep".to_owned(), ParamValue::Text("features".into()))]
            .into_iter()
            .collect(),
    });
    ChainSpec { stage }
}

fn text_field(
    o: &Map<String, Value>,
    key: &str,
    origin: &str,
    property: Option<&str>,
) -> Result<Option<String>, ModelError> {
    match o.get(key) {
        None => Ok(None),
        Some(Value::String(s)) if s.len() <= MAX_TEXT => Ok(Some(s.clone())),
        Some(Value::String(_)) => Err(ModelError::new(
            origin,
            property,
            format!("{key:?} is longer than {MAX_TEXT} bytes"),
        )),
        Some(_) => Err(ModelError::new(
            origin,
            property,
            format!("{key:?} must be a string"),
        )),
    }
}

fn number(
    o: &Map<String, Value>,
    key: &str,
    origin: &str,
    property: &str,
) -> Result<f64, ModelError> {
    match o.get(key) {
        Some(Value::Number(n)) => n.as_f64().filter(|v| v.is_finite()).ok_or_else(|| {
            ModelError::new(
                origin,
                Some(property),
                format!("{key:?} is not a finite number"),
            )
        }),
        Some(v) => Err(ModelError::new(
            origin,
            Some(property),
            format!("{key:?} must be a number, not {v}"),
        )),
        None => Err(ModelError::new(
            origin,
            Some(property),
            format!("missing {key:?}"),
        )),
    }
}
