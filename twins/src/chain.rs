//! Processing chains (DESIGN §5): a declarative list of stages, each placed on a tier.
//!
//! A [`ChainSpec`] is what users write (TOML `[[stage]]` tables or the proto `Chain`);
//! [`Chain::validate`] checks it against the twin's kind and returns a [`Chain`] of typed
//! [`Stage`]s, or a [`ChainError`] naming the stage and what is wrong — nothing is applied
//! half-way. Executors: [`StreamPipeline`] runs the filtering/decimation stages of one
//! tier over a stream (the gateway runs the IoT ones before publishing); [`Analyzer`]
//! cuts a twin's streams into windows and [`run_window`] computes the edge features.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::bearing::{BearingGeometry, WIND_TURBINE_GEAR_RATIO, WIND_TURBINE_HSS_BEARING};
use crate::dsp::{self, BandType, Decimator, SosFilter, Spectral};
use crate::id::Tier;
use crate::kind::{AssetKind, KindCache, KindSchema, ThingModel};
use crate::proto;

/// Operators a chain may use, with the tiers that can run them.
pub const OPERATORS: [(&str, &[Tier]); 13] = [
    ("lowpass", &[Tier::Iot, Tier::Edge]),
    ("highpass", &[Tier::Iot, Tier::Edge]),
    ("bandpass", &[Tier::Iot, Tier::Edge]),
    ("decimate", &[Tier::Iot, Tier::Edge]),
    ("rate", &[Tier::Iot, Tier::Edge]),
    ("compress", &[Tier::Iot]),
    ("stats", &[Tier::Edge]),
    ("fft", &[Tier::Edge]),
    ("psd", &[Tier::Edge]),
    ("envelope", &[Tier::Edge]),
    ("bearing", &[Tier::Edge]),
    ("thd", &[Tier::Edge]),
    ("archive", &[Tier::Cloud]),
];

/// Most stages in one chain.
pub const MAX_STAGES: usize = 32;
/// Smallest window a spectral stage accepts, in samples.
pub const MIN_SPECTRAL_WINDOW: usize = 64;
/// Largest analysis window, in samples.
pub const MAX_WINDOW: usize = 1 << 20;

/// A parameter value as written in TOML or carried (as text) in the proto.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ParamValue {
    Number(f64),
    List(Vec<f64>),
    Text(String),
}

impl fmt::Display for ParamValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamValue::Number(n) => write!(f, "{n}"),
            ParamValue::List(l) => write!(
                f,
                "{}",
                l.iter()
                    .map(|v| v.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            ParamValue::Text(t) => f.write_str(t),
        }
    }
}

impl ParamValue {
    /// Reads the text form used in the proto: a number, a comma-separated list, or text.
    pub fn parse(s: &str) -> ParamValue {
        if let Ok(n) = s.trim().parse::<f64>() {
            return ParamValue::Number(n);
        }
        if s.contains(',') {
            if let Ok(l) = s.split(',').map(|p| p.trim().parse::<f64>()).collect() {
                return ParamValue::List(l);
            }
        }
        ParamValue::Text(s.to_owned())
    }
}

/// One stage as written by a user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageSpec {
    pub op: String,
    pub tier: String,
    /// The signal it applies to; the kind's primary signal when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    #[serde(flatten)]
    pub params: BTreeMap<String, ParamValue>,
}

/// A chain as written by a user: TOML `[[stage]]` tables.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ChainSpec {
    #[serde(default)]
    pub stage: Vec<StageSpec>,
}

impl From<&ChainSpec> for proto::Chain {
    fn from(c: &ChainSpec) -> Self {
        proto::Chain {
            stages: c
                .stage
                .iter()
                .map(|s| proto::ChainStage {
                    op: s.op.clone(),
                    tier: s.tier.clone(),
                    signal: s.signal.clone().unwrap_or_default(),
                    params: s
                        .params
                        .iter()
                        .map(|(k, v)| (k.clone(), v.to_string()))
                        .collect(),
                })
                .collect(),
        }
    }
}

impl From<&proto::Chain> for ChainSpec {
    fn from(c: &proto::Chain) -> Self {
        ChainSpec {
            stage: c
                .stages
                .iter()
                .map(|s| StageSpec {
                    op: s.op.clone(),
                    tier: s.tier.clone(),
                    signal: (!s.signal.is_empty()).then(|| s.signal.clone()),
                    params: s
                        .params
                        .iter()
                        .map(|(k, v)| (k.clone(), ParamValue::parse(v)))
                        .collect(),
                })
                .collect(),
        }
    }
}

/// Why a chain was refused. `stage` numbers stages from 1.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum ChainError {
    #[error("chain has {0} stages, at most {MAX_STAGES} are allowed")]
    TooLong(usize),
    #[error("stage {stage}: unknown operator {op:?} (known: {known})")]
    UnknownOperator {
        stage: usize,
        op: String,
        known: String,
    },
    #[error("stage {stage} ({op}): invalid tier {tier:?}: expected iot, edge or cloud")]
    BadTier {
        stage: usize,
        op: String,
        tier: String,
    },
    #[error("stage {stage} ({op}): {op} cannot run on the {tier} tier (allowed: {allowed})")]
    WrongTier {
        stage: usize,
        op: String,
        tier: Tier,
        allowed: String,
    },
    #[error("stage {stage} ({op}) runs on {tier} after a stage on {previous}: stages go iot, then edge, then cloud")]
    TierOrder {
        stage: usize,
        op: String,
        tier: Tier,
        previous: Tier,
    },
    #[error("stage {stage} ({op}): unknown signal {signal:?} of {kind}")]
    UnknownSignal {
        stage: usize,
        op: String,
        signal: String,
        kind: String,
    },
    #[error("stage {stage} ({op}): {op} needs a waveform signal, {signal} is a {rate_hz} Hz process value")]
    NotWaveform {
        stage: usize,
        op: String,
        signal: String,
        rate_hz: f64,
    },
    #[error("stage {stage} ({op}): unknown parameter {param:?} (allowed: {allowed})")]
    UnknownParam {
        stage: usize,
        op: String,
        param: String,
        allowed: String,
    },
    #[error("stage {stage} ({op}): parameter {param}: {message}")]
    BadParam {
        stage: usize,
        op: String,
        param: String,
        message: String,
    },
    #[error("stage {stage} ({op}): {message}")]
    SampleRate {
        stage: usize,
        op: String,
        message: String,
    },
}

/// What archived features keep in the cloud.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    Features,
}

/// A validated operator with its parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Filter {
        band: BandType,
        order: usize,
        cutoff: Vec<f64>,
    },
    Decimate {
        factor: usize,
    },
    /// A counter's change per second (first differences over the sample period): its
    /// level grows for ever, its rate is what a window can compare with training.
    Rate,
    Compress,
    Stats,
    Fft {
        peaks: usize,
    },
    Psd {
        nperseg: usize,
        band: Option<(f64, f64)>,
    },
    Envelope {
        band: (f64, f64),
        peaks: usize,
    },
    Bearing {
        band: (f64, f64),
        shaft_signal: String,
        ratio: f64,
        geometry: BearingGeometry,
    },
    Thd {
        fundamental_hz: Option<f64>,
    },
    Archive {
        keep: Keep,
    },
}

impl Op {
    fn is_stream(&self) -> bool {
        matches!(self, Op::Filter { .. } | Op::Decimate { .. } | Op::Rate)
    }
}

/// A validated stage.
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    pub op: Op,
    pub name: String,
    pub tier: Tier,
    pub signal: String,
    /// Sample rate of the signal entering this stage.
    pub rate_hz: f64,
    /// Analysis window (edge analysis stages), in samples at `rate_hz`.
    pub window: usize,
}

/// A validated chain.
#[derive(Debug, Clone, PartialEq)]
pub struct Chain {
    pub kind: AssetKind,
    pub stages: Vec<Stage>,
    pub spec: ChainSpec,
}

struct Params<'a> {
    stage: usize,
    op: &'a str,
    map: &'a BTreeMap<String, ParamValue>,
    used: Vec<&'static str>,
}

impl<'a> Params<'a> {
    fn bad(&self, param: &str, message: String) -> ChainError {
        ChainError::BadParam {
            stage: self.stage,
            op: self.op.to_owned(),
            param: param.to_owned(),
            message,
        }
    }

    fn number(&mut self, key: &'static str) -> Result<Option<f64>, ChainError> {
        self.used.push(key);
        match self.map.get(key) {
            None => Ok(None),
            Some(ParamValue::Number(n)) if n.is_finite() => Ok(Some(*n)),
            Some(v) => Err(self.bad(key, format!("expected a number, got {v:?}"))),
        }
    }

    fn int(
        &mut self,
        key: &'static str,
        default: usize,
        lo: usize,
        hi: usize,
    ) -> Result<usize, ChainError> {
        match self.number(key)? {
            None => Ok(default),
            Some(n) if n.fract() == 0.0 && n >= lo as f64 && n <= hi as f64 => Ok(n as usize),
            Some(n) => Err(self.bad(key, format!("{n} must be a whole number in {lo}..={hi}"))),
        }
    }

    fn positive(&mut self, key: &'static str) -> Result<Option<f64>, ChainError> {
        match self.number(key)? {
            Some(n) if n <= 0.0 => Err(self.bad(key, format!("{n} must be positive"))),
            other => Ok(other),
        }
    }

    fn band(&mut self, key: &'static str) -> Result<Option<(f64, f64)>, ChainError> {
        self.used.push(key);
        match self.map.get(key) {
            None => Ok(None),
            Some(ParamValue::List(l)) if l.len() == 2 && l[0] > 0.0 && l[0] < l[1] => {
                Ok(Some((l[0], l[1])))
            }
            Some(v) => Err(self.bad(
                key,
                format!("expected [low, high] with 0 < low < high, got {v}"),
            )),
        }
    }

    fn text(&mut self, key: &'static str) -> Result<Option<String>, ChainError> {
        self.used.push(key);
        match self.map.get(key) {
            None => Ok(None),
            Some(ParamValue::Text(t)) => Ok(Some(t.clone())),
            Some(v) => Err(self.bad(key, format!("expected text, got {v}"))),
        }
    }

    fn finish(self) -> Result<(), ChainError> {
        if let Some(k) = self.map.keys().find(|k| !self.used.contains(&k.as_str())) {
            return Err(ChainError::UnknownParam {
                stage: self.stage,
                op: self.op.to_owned(),
                param: k.clone(),
                allowed: if self.used.is_empty() {
                    "none".to_owned()
                } else {
                    self.used.join(", ")
                },
            });
        }
        Ok(())
    }
}

/// Per-signal sample rate as stages change it.
fn rate_error(stage: usize, op: &str, what: String) -> ChainError {
    ChainError::SampleRate {
        stage,
        op: op.to_owned(),
        message: what,
    }
}

impl Chain {
    /// Checks `spec` for a twin of `kind`.
    pub fn validate(spec: &ChainSpec, kind: AssetKind) -> Result<Chain, ChainError> {
        let stages = Chain::validate_stages(spec, kind.schema())?;
        Ok(Chain {
            kind,
            stages,
            spec: spec.clone(),
        })
    }

    /// Checks a Thing Model's default chain against the model's signals, before the
    /// model is a kind.
    pub(crate) fn check_for_model(spec: &ChainSpec, model: &ThingModel) -> Result<(), ChainError> {
        Chain::validate_stages(spec, model).map(|_| ())
    }

    fn validate_stages(
        spec: &ChainSpec,
        schema: &dyn SignalTable,
    ) -> Result<Vec<Stage>, ChainError> {
        if spec.stage.len() > MAX_STAGES {
            return Err(ChainError::TooLong(spec.stage.len()));
        }
        let mut rates: BTreeMap<String, (f64, bool)> = BTreeMap::new(); // (rate, decimated)
        let mut last_tier = Tier::Iot;
        let mut stages = Vec::new();
        for (i, s) in spec.stage.iter().enumerate() {
            let n = i + 1;
            let op_name = s.op.as_str();
            let Some((_, allowed)) = OPERATORS.iter().find(|(o, _)| *o == op_name) else {
                return Err(ChainError::UnknownOperator {
                    stage: n,
                    op: s.op.clone(),
                    known: OPERATORS
                        .iter()
                        .map(|(o, _)| *o)
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            };
            let tier: Tier = s.tier.parse().map_err(|_| ChainError::BadTier {
                stage: n,
                op: s.op.clone(),
                tier: s.tier.clone(),
            })?;
            if !allowed.contains(&tier) {
                return Err(ChainError::WrongTier {
                    stage: n,
                    op: s.op.clone(),
                    tier,
                    allowed: allowed
                        .iter()
                        .map(|t| t.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
            if tier < last_tier {
                return Err(ChainError::TierOrder {
                    stage: n,
                    op: s.op.clone(),
                    tier,
                    previous: last_tier,
                });
            }
            last_tier = tier;
            let signal = match &s.signal {
                Some(sig) => schema.find(sig).ok_or_else(|| ChainError::UnknownSignal {
                    stage: n,
                    op: s.op.clone(),
                    signal: sig.clone(),
                    kind: schema.kind_name().to_owned(),
                })?,
                None => schema.primary(),
            };
            let needs_waveform = !matches!(op_name, "stats" | "archive" | "rate");
            if needs_waveform && !signal.waveform {
                return Err(ChainError::NotWaveform {
                    stage: n,
                    op: s.op.clone(),
                    signal: signal.name.to_owned(),
                    rate_hz: signal.rate_hz,
                });
            }
            let (rate, decimated) = *rates
                .entry(signal.name.to_owned())
                .or_insert((signal.rate_hz, false));
            let nyquist = rate / 2.0;
            let after = if decimated { " left by decimation" } else { "" };
            let mut p = Params {
                stage: n,
                op: op_name,
                map: &s.params,
                used: Vec::new(),
            };
            let window_s = if matches!(
                op_name,
                "stats" | "fft" | "psd" | "envelope" | "bearing" | "thd"
            ) {
                p.positive("window_s")?
                    .unwrap_or(if signal.waveform { 1.0 } else { 60.0 })
            } else {
                0.0
            };
            let check_below_nyquist = |what: &str, f: f64| -> Result<(), ChainError> {
                if f >= nyquist {
                    Err(rate_error(
                        n,
                        op_name,
                        format!(
                            "{what} {f} Hz is not below the Nyquist frequency {nyquist} Hz{after}"
                        ),
                    ))
                } else {
                    Ok(())
                }
            };
            let op = match op_name {
                "lowpass" | "highpass" | "bandpass" => {
                    let band: BandType = op_name.parse().expect("listed");
                    let order = p.int("order", 4, 1, dsp::filter::MAX_ORDER)?;
                    let cutoff = if band == BandType::Bandpass {
                        let (lo, hi) = p.band("band")?.ok_or_else(|| p.bad("band", "is required: [low_hz, high_hz]".into()))?;
                        vec![lo, hi]
                    } else {
                        vec![p.positive("cutoff_hz")?.ok_or_else(|| p.bad("cutoff_hz", "is required".into()))?]
                    };
                    for &c in &cutoff {
                        check_below_nyquist("cutoff", c)?;
                    }
                    Op::Filter { band, order, cutoff }
                }
                "decimate" => {
                    let factor = p.int("factor", 2, 2, 64)?;
                    rates.insert(signal.name.to_owned(), (rate / factor as f64, true));
                    Op::Decimate { factor }
                }
                "rate" => Op::Rate,
                "compress" => Op::Compress,
                "stats" => Op::Stats,
                "fft" => Op::Fft { peaks: p.int("peaks", 3, 1, 32)? },
                "psd" => {
                    let nperseg = p.int("nperseg", 256, 2, MAX_WINDOW)?;
                    let band = p.band("band")?;
                    if let Some((_, hi)) = band {
                        check_below_nyquist("band edge", hi)?;
                    }
                    Op::Psd { nperseg, band }
                }
                "envelope" => {
                    let band = p.band("band")?.ok_or_else(|| p.bad("band", "is required: [low_hz, high_hz]".into()))?;
                    check_below_nyquist("band edge", band.1)?;
                    Op::Envelope { band, peaks: p.int("peaks", 3, 1, 32)? }
                }
                "bearing" => {
                    let band = p.band("band")?.ok_or_else(|| p.bad("band", "is required: [low_hz, high_hz]".into()))?;
                    check_below_nyquist("band edge", band.1)?;
                    let shaft_signal = p.text("shaft_signal")?.unwrap_or_else(|| "rotor_speed".to_owned());
                    if schema.find(&shaft_signal).is_none() {
                        return Err(p.bad("shaft_signal", format!("unknown signal {shaft_signal:?} of {}", schema.kind_name())));
                    }
                    let ratio = p.positive("ratio")?.unwrap_or(WIND_TURBINE_GEAR_RATIO);
                    let g = WIND_TURBINE_HSS_BEARING;
                    let balls = p.int("balls", g.balls as usize, 3, 100)? as u32;
                    let ball_diameter = p.positive("ball_diameter_m")?.unwrap_or(g.ball_diameter);
                    let pitch_diameter = p.positive("pitch_diameter_m")?.unwrap_or(g.pitch_diameter);
                    if ball_diameter >= pitch_diameter {
                        return Err(p.bad("ball_diameter_m", "must be smaller than pitch_diameter_m".into()));
                    }
                    let contact_angle = p.number("contact_angle_deg")?.unwrap_or(0.0).to_radians();
                    Op::Bearing {
                        band,
                        shaft_signal,
                        ratio,
                        geometry: BearingGeometry { balls, ball_diameter, pitch_diameter, contact_angle },
                    }
                }
                "thd" => {
                    let f = p.positive("fundamental_hz")?;
                    if let Some(f) = f {
                        check_below_nyquist("fundamental", f)?;
                    }
                    Op::Thd { fundamental_hz: f }
                }
                "archive" => {
                    match p.text("keep")?.as_deref() {
                        None | Some("features") => Op::Archive { keep: Keep::Features },
                        Some(other) => return Err(p.bad("keep", format!("{other:?}: only \"features\" can be archived (raw data stays at the edge)"))),
                    }
                }
                _ => unreachable!("operator list is exhaustive"),
            };
            p.finish()?;
            let window = (window_s * rate).round() as usize;
            let spectral = matches!(
                op,
                Op::Fft { .. }
                    | Op::Psd { .. }
                    | Op::Envelope { .. }
                    | Op::Bearing { .. }
                    | Op::Thd { .. }
            );
            if window_s > 0.0 {
                let min = if spectral { MIN_SPECTRAL_WINDOW } else { 2 };
                if window < min || window > MAX_WINDOW {
                    return Err(rate_error(n, op_name, format!("window of {window_s} s is {window} samples at {rate} Hz{after}; it must hold {min}..={MAX_WINDOW}")));
                }
            }
            if let Op::Psd { nperseg, .. } = op {
                if nperseg > window {
                    return Err(rate_error(
                        n,
                        op_name,
                        format!("nperseg {nperseg} is longer than the {window}-sample window"),
                    ));
                }
            }
            stages.push(Stage {
                op,
                name: op_name.to_owned(),
                tier,
                signal: signal.name.to_owned(),
                rate_hz: rate,
                window,
            });
        }
        Ok(stages)
    }

    /// The default chain of `kind` (always valid).
    pub fn default_for(kind: AssetKind) -> Chain {
        Chain::validate(&default_spec(kind), kind).expect("default chains are valid")
    }

    /// The default chain of `kind`, one copy shared by every twin of the kind that has
    /// not changed its chain (a live twin must stay small).
    pub fn shared_default(kind: AssetKind) -> std::sync::Arc<Chain> {
        static DEFAULTS: KindCache<Chain> = KindCache::new();
        kind.shared(&DEFAULTS, Chain::default_for)
    }

    /// [`Chain::validate`], sharing the kind's default when `spec` is that.
    pub fn validate_shared(
        spec: &ChainSpec,
        kind: AssetKind,
    ) -> Result<std::sync::Arc<Chain>, ChainError> {
        let default = Chain::shared_default(kind);
        if default.spec == *spec {
            Ok(default)
        } else {
            Chain::validate(spec, kind).map(std::sync::Arc::new)
        }
    }

    pub fn archives(&self) -> bool {
        self.stages
            .iter()
            .any(|s| matches!(s.op, Op::Archive { .. }))
    }

    /// Whether frames of `signal` leave the gateway compressed.
    pub fn compresses(&self, signal: &str) -> bool {
        self.stages
            .iter()
            .any(|s| s.tier == Tier::Iot && s.signal == signal && matches!(s.op, Op::Compress))
    }
}

/// The default chain of each kind, as a spec (from its Thing Model).
pub fn default_spec(kind: AssetKind) -> ChainSpec {
    kind.schema().default_chain.clone()
}

/// A signal as chain validation sees it.
struct SignalRef<'a> {
    name: &'a str,
    rate_hz: f64,
    waveform: bool,
}

/// What chain validation needs of a kind: a registered kind's schema, or a Thing Model
/// being checked before it becomes one.
trait SignalTable {
    fn kind_name(&self) -> &str;
    fn find(&self, name: &str) -> Option<SignalRef<'_>>;
    fn primary(&self) -> SignalRef<'_>;
}

impl SignalTable for KindSchema {
    fn kind_name(&self) -> &str {
        self.name
    }
    fn find(&self, name: &str) -> Option<SignalRef<'_>> {
        self.signal(name).ok().map(|s| SignalRef {
            name: s.name,
            rate_hz: s.rate_hz,
            waveform: s.waveform,
        })
    }
    fn primary(&self) -> SignalRef<'_> {
        let s = self.primary_signal();
        SignalRef {
            name: s.name,
            rate_hz: s.rate_hz,
            waveform: s.waveform,
        }
    }
}

impl SignalTable for ThingModel {
    fn kind_name(&self) -> &str {
        &self.kind
    }
    fn find(&self, name: &str) -> Option<SignalRef<'_>> {
        self.signals
            .iter()
            .find(|s| s.name == name)
            .map(|s| SignalRef {
                name: &s.name,
                rate_hz: s.rate_hz,
                waveform: s.waveform,
            })
    }
    fn primary(&self) -> SignalRef<'_> {
        let s = self.primary_signal();
        SignalRef {
            name: &s.name,
            rate_hz: s.rate_hz,
            waveform: s.waveform,
        }
    }
}

/// The stream stages (filters, decimation) of one tier for one signal.
#[derive(Debug, Clone)]
pub struct StreamPipeline {
    steps: Vec<StreamStep>,
}

#[derive(Debug, Clone)]
enum StreamStep {
    Filter(SosFilter),
    Decimate(Decimator),
    /// The time and value of the stream's previous sample, once one has passed.
    Rate(Option<(i64, f64)>),
}

/// A run of equally spaced samples.
#[derive(Debug, Clone, PartialEq)]
pub struct Block {
    pub start_ns: i64,
    pub period_ns: i64,
    pub samples: Vec<f64>,
}

impl StreamPipeline {
    pub fn new(chain: &Chain, signal: &str, tier: Tier) -> Self {
        let steps = chain
            .stages
            .iter()
            .filter(|s| s.tier == tier && s.signal == signal && s.op.is_stream())
            .map(|s| match &s.op {
                Op::Filter {
                    band,
                    order,
                    cutoff,
                } => StreamStep::Filter(SosFilter::new(
                    dsp::butter(*order, cutoff, *band, s.rate_hz).expect("validated design"),
                )),
                Op::Decimate { factor } => {
                    StreamStep::Decimate(Decimator::new(*factor).expect("validated factor"))
                }
                Op::Rate => StreamStep::Rate(None),
                _ => unreachable!("filtered to stream stages"),
            })
            .collect();
        StreamPipeline { steps }
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Runs the stages over the next block of the stream; `None` when decimation kept
    /// no sample of it.
    pub fn process(&mut self, mut block: Block) -> Option<Block> {
        for step in &mut self.steps {
            match step {
                StreamStep::Filter(f) => f.process(&mut block.samples),
                StreamStep::Decimate(d) => {
                    let mut out = Vec::with_capacity(block.samples.len() / d.factor() + 1);
                    let first = d.process(&mut block.samples, &mut out)?;
                    block = Block {
                        start_ns: block.start_ns + first as i64 * block.period_ns,
                        period_ns: block.period_ns * d.factor() as i64,
                        samples: out,
                    };
                }
                StreamStep::Rate(prev) => {
                    // The stream's first sample, and the first after a gap, have no
                    // difference over one period: the block starts one period later.
                    let period = block.period_ns;
                    let mut last = prev
                        .filter(|(t, _)| t + period == block.start_ns)
                        .map(|(_, v)| v);
                    let start_ns = block.start_ns + if last.is_some() { 0 } else { period };
                    if let Some(&x) = block.samples.last() {
                        let n = block.samples.len() as i64;
                        *prev = Some((block.start_ns + (n - 1) * period, x));
                    }
                    let per_s = 1e9 / period.max(1) as f64;
                    let mut out = Vec::with_capacity(block.samples.len());
                    for &x in &block.samples {
                        if let Some(p) = last.replace(x) {
                            out.push((x - p) * per_s);
                        }
                    }
                    block = Block {
                        start_ns,
                        period_ns: period,
                        samples: out,
                    };
                }
            }
        }
        (!block.samples.is_empty()).then_some(block)
    }
}

/// A full analysis window and the stages to run on it.
#[derive(Debug, Clone)]
pub struct WindowJob {
    pub signal: String,
    pub start_ns: i64,
    pub end_ns: i64,
    pub rate_hz: f64,
    pub samples: Vec<f64>,
    pub stages: Vec<Stage>,
    /// Current reported values of the twin (e.g. shaft speed for bearing analysis).
    pub context: BTreeMap<String, f64>,
    /// Seconds from the signal's last change of value to the window's end, at least
    /// [`STALE_FLOOR_S`]: spans windows, so a stuck sensor or a dead feed shows as a
    /// growing value even where the signal is sampled faster than it changes (a count
    /// per second that is mostly 0, a cycle time held for a whole cycle).
    pub stale_s: f64,
}

/// The name of the staleness feature of every `stats` stage (`{signal}.stale`).
pub const STALE_FEATURE: &str = "stale";

/// Whether `feature` (`{signal}.{name}`) is a staleness feature.
pub fn is_staleness(feature: &str) -> bool {
    feature
        .rsplit_once('.')
        .is_some_and(|(_, name)| name == STALE_FEATURE)
}

/// The resolution of the `stale` feature: staleness under a second is not what it is
/// for, and a noisy sensor's occasional repeated sample must not look like a change of
/// its distribution.
pub const STALE_FLOOR_S: f64 = 1.0;

struct WindowBuf {
    window: usize,
    period_ns: i64,
    start_ns: i64,
    samples: Vec<f64>,
    stages: Vec<Stage>,
    /// The last sample and when the signal last changed value (across windows).
    last: Option<f64>,
    changed_ns: i64,
}

/// Cuts a twin's streams into the windows its edge stages need.
pub struct Analyzer {
    pipelines: BTreeMap<String, StreamPipeline>,
    windows: BTreeMap<(String, usize), WindowBuf>,
}

impl Analyzer {
    pub fn new(chain: &Chain) -> Self {
        let mut windows: BTreeMap<(String, usize), WindowBuf> = BTreeMap::new();
        let mut pipelines = BTreeMap::new();
        for s in chain.stages.iter().filter(|s| s.tier == Tier::Edge) {
            if s.op.is_stream() {
                pipelines
                    .entry(s.signal.clone())
                    .or_insert_with(|| StreamPipeline::new(chain, &s.signal, Tier::Edge));
                continue;
            }
            windows
                .entry((s.signal.clone(), s.window))
                .or_insert_with(|| WindowBuf {
                    window: s.window,
                    period_ns: 0,
                    start_ns: 0,
                    samples: Vec::new(),
                    stages: Vec::new(),
                    last: None,
                    changed_ns: 0,
                })
                .stages
                .push(s.clone());
        }
        Analyzer { pipelines, windows }
    }

    /// Whether any edge stage consumes `signal`.
    pub fn wants(&self, signal: &str) -> bool {
        self.pipelines.contains_key(signal) || self.windows.keys().any(|(s, _)| s == signal)
    }

    /// Feeds a block of `signal`; returns the windows it completed (with an empty
    /// `context`, for the caller to fill).
    pub fn push(&mut self, signal: &str, block: Block) -> Vec<WindowJob> {
        let block = match self.pipelines.get_mut(signal) {
            Some(p) => match p.process(block) {
                Some(b) => b,
                None => return Vec::new(),
            },
            None => block,
        };
        let mut jobs = Vec::new();
        for ((sig, _), w) in self.windows.iter_mut() {
            if sig != signal {
                continue;
            }
            // A change of rate or a hole in time starts a new window.
            let expected = w.start_ns + w.samples.len() as i64 * w.period_ns;
            if w.period_ns != block.period_ns
                || (!w.samples.is_empty() && block.start_ns != expected)
            {
                w.samples.clear();
                w.period_ns = block.period_ns;
            }
            for (i, &x) in block.samples.iter().enumerate() {
                let t_ns = block.start_ns + i as i64 * block.period_ns;
                if w.samples.is_empty() {
                    w.start_ns = t_ns;
                }
                if w.last != Some(x) {
                    w.last = Some(x);
                    w.changed_ns = t_ns;
                }
                w.samples.push(x);
                if w.samples.len() == w.window {
                    let samples = std::mem::replace(&mut w.samples, Vec::with_capacity(w.window));
                    let end_ns = w.start_ns + w.window as i64 * w.period_ns;
                    jobs.push(WindowJob {
                        signal: signal.to_owned(),
                        start_ns: w.start_ns,
                        end_ns,
                        rate_hz: 1e9 / w.period_ns as f64,
                        samples,
                        stages: w.stages.clone(),
                        context: BTreeMap::new(),
                        stale_s: ((end_ns - w.changed_ns) as f64 / 1e9).max(STALE_FLOOR_S),
                    });
                }
            }
        }
        jobs
    }
}

/// Per-thread analysis state: FFT plans, filter designs and sample buffers, reused from
/// window to window (no sample buffer is allocated per window once warm).
#[derive(Default)]
struct Workspace {
    sp: Spectral,
    /// Band-pass designs by (fs, low, high) bit patterns.
    designs: std::collections::HashMap<(u64, u64, u64), SosFilter>,
    filtered: Vec<f64>,
    spectrum: Vec<f64>,
    sorted: Vec<f64>,
    psd: Vec<f64>,
}

impl Workspace {
    /// Envelope spectrum of `x` band-passed to `band` (order-4 Butterworth) into
    /// `self.spectrum`.
    fn envelope_spectrum(&mut self, x: &[f64], fs: f64, band: (f64, f64)) -> bool {
        let key = (fs.to_bits(), band.0.to_bits(), band.1.to_bits());
        let filter = match self.designs.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                match dsp::butter(4, &[band.0, band.1], BandType::Bandpass, fs) {
                    Ok(sos) => v.insert(SosFilter::new(sos)),
                    Err(_) => return false,
                }
            }
        };
        filter.reset();
        self.filtered.clear();
        self.filtered.extend_from_slice(x);
        filter.process(&mut self.filtered);
        self.sp
            .envelope_spectrum_into(&self.filtered, &mut self.spectrum)
            .is_ok()
    }
}

thread_local! {
    static WORKSPACE: RefCell<Workspace> = RefCell::new(Workspace::default());
}

/// Time-weighted mean over `[start_ns, end_ns)` of a sample-and-hold series (each value
/// holds until the next point, the last one until `end_ns`); the last value when no point
/// covers the range.
pub fn hold_average(points: &[(i64, f64)], start_ns: i64, end_ns: i64) -> Option<f64> {
    let mut acc = 0.0;
    let mut covered = 0i64;
    for (i, &(t0, v)) in points.iter().enumerate() {
        let t1 = points.get(i + 1).map_or(end_ns, |p| p.0);
        let (a, b) = (t0.max(start_ns), t1.min(end_ns));
        if b > a {
            acc += v * (b - a) as f64;
            covered += b - a;
        }
    }
    if covered > 0 {
        Some(acc / covered as f64)
    } else {
        points.last().map(|p| p.1)
    }
}

/// Envelope-spectrum peaks at or above `min_hz` (the lowest bins hold the window's slow
/// trend, not a defect).
fn peaks_above(spectrum: &[f64], df: f64, min_hz: f64, count: usize) -> Vec<dsp::Peak> {
    let lo = ((min_hz / df).ceil() as usize).clamp(1, spectrum.len()) - 1;
    dsp::peaks(&spectrum[lo..], df, count)
        .into_iter()
        .map(|p| dsp::Peak {
            frequency_hz: p.frequency_hz + lo as f64 * df,
            magnitude: p.magnitude,
        })
        .collect()
}

/// Lowest envelope-spectrum frequency reported as a peak, Hz.
pub const ENVELOPE_MIN_HZ: f64 = 2.0;

/// Amplitude of `spectrum` at `f` (largest bin within ±1 bin).
fn amplitude_at(spectrum: &[f64], df: f64, f: f64) -> f64 {
    let k = (f / df).round() as usize;
    (k.saturating_sub(1)..=(k + 1).min(spectrum.len().saturating_sub(1)))
        .map(|i| spectrum[i])
        .fold(0.0, f64::max)
}

/// Computes the features of one window: `{signal}.{feature}` → value. CPU-heavy: call
/// it off async executors (the twin uses a blocking pool). FFT plans are cached per thread.
pub fn run_window(job: &WindowJob) -> BTreeMap<String, f64> {
    WORKSPACE.with(|ws| {
        let ws = &mut *ws.borrow_mut();
        let mut out = BTreeMap::new();
        let mut put = |name: &str, v: f64| {
            if v.is_finite() {
                out.insert(format!("{}.{name}", job.signal), v);
            }
        };
        let fs = job.rate_hz;
        for stage in &job.stages {
            match &stage.op {
                Op::Stats => {
                    if let Ok(s) = dsp::signal_stats(&job.samples) {
                        for (name, v) in s.named() {
                            if name != "count" {
                                put(name, v);
                            }
                        }
                        put(STALE_FEATURE, job.stale_s);
                    }
                }
                Op::Fft { peaks } => {
                    if ws
                        .sp
                        .rfft_magnitude_into(&job.samples, &mut ws.spectrum)
                        .is_ok()
                    {
                        let df = fs / job.samples.len() as f64;
                        for (i, p) in peaks_above(&ws.spectrum, df, ENVELOPE_MIN_HZ, *peaks)
                            .iter()
                            .enumerate()
                        {
                            put(&format!("fft_peak{}_hz", i + 1), p.frequency_hz);
                            put(&format!("fft_peak{}_mag", i + 1), p.magnitude);
                        }
                    }
                }
                Op::Psd { nperseg, band } => {
                    if let Ok(n) = ws.sp.welch_into(&job.samples, fs, *nperseg, &mut ws.psd) {
                        let psd = &ws.psd;
                        let total = dsp::band_energy(psd, fs, n.max(2), 0.0, f64::INFINITY);
                        put("psd_total_power", total);
                        if let Some(p) = dsp::peaks(psd, fs / n.max(2) as f64, 1).first() {
                            put("psd_peak_hz", p.frequency_hz);
                        }
                        if let Some((lo, hi)) = band {
                            put(
                                "psd_band_power",
                                dsp::band_energy(psd, fs, n.max(2), *lo, *hi),
                            );
                        }
                    }
                }
                Op::Envelope { band, peaks } => {
                    if ws.envelope_spectrum(&job.samples, fs, *band) {
                        let df = fs / job.samples.len() as f64;
                        for (i, p) in peaks_above(&ws.spectrum, df, ENVELOPE_MIN_HZ, *peaks)
                            .iter()
                            .enumerate()
                        {
                            put(&format!("env_peak{}_hz", i + 1), p.frequency_hz);
                            put(&format!("env_peak{}_amp", i + 1), p.magnitude);
                        }
                    }
                }
                Op::Bearing {
                    band,
                    shaft_signal,
                    ratio,
                    geometry,
                } => {
                    if !ws.envelope_spectrum(&job.samples, fs, *band) {
                        continue;
                    }
                    let spec = &ws.spectrum;
                    let df = fs / job.samples.len() as f64;
                    if let Some(p) = peaks_above(spec, df, ENVELOPE_MIN_HZ, 1).first() {
                        put("env_peak_hz", p.frequency_hz);
                        put("env_peak_amp", p.magnitude);
                    }
                    // Shaft speed from the twin's reported value (rpm at the rotor).
                    if let Some(rpm) = job.context.get(shaft_signal) {
                        let shaft_hz = rpm * ratio / 60.0;
                        let d = geometry.defect_frequencies(shaft_hz);
                        ws.sorted.clear();
                        ws.sorted.extend_from_slice(spec);
                        ws.sorted.sort_by(f64::total_cmp);
                        let floor = ws.sorted[ws.sorted.len() / 2].max(f64::MIN_POSITIVE);
                        put("shaft_hz", shaft_hz);
                        for (name, f) in [
                            ("bpfo", d.bpfo),
                            ("bpfi", d.bpfi),
                            ("bsf", d.bsf),
                            ("ftf", d.ftf),
                        ] {
                            put(&format!("{name}_hz"), f);
                            let a = amplitude_at(spec, df, f);
                            put(&format!("{name}_amp"), a);
                            put(&format!("{name}_ratio"), a / floor);
                        }
                    }
                }
                Op::Thd { fundamental_hz } => {
                    if let Ok(t) = ws.sp.thd(&job.samples, fs, *fundamental_hz) {
                        put("thd", t);
                    }
                }
                Op::Filter { .. }
                | Op::Decimate { .. }
                | Op::Rate
                | Op::Compress
                | Op::Archive { .. } => {}
            }
        }
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kind::legacy::{band, num, stage};

    fn spec(toml_like: Vec<StageSpec>) -> ChainSpec {
        ChainSpec { stage: toml_like }
    }

    #[test]
    fn hold_average_weights_by_time() {
        let pts = [(0, 10.0), (100, 20.0)];
        assert_eq!(hold_average(&pts, 50, 150), Some(15.0));
        assert_eq!(hold_average(&pts, 100, 200), Some(20.0));
        assert_eq!(hold_average(&pts, -100, -50), Some(20.0));
        assert_eq!(hold_average(&[], 0, 1), None);
        let spec = [5.0, 0.0, 3.0, 0.0, 1.0, 0.0];
        let p = peaks_above(&spec, 1.0, 2.0, 3);
        assert_eq!(
            p.iter().map(|p| p.frequency_hz).collect::<Vec<_>>(),
            vec![2.0, 4.0]
        );
    }

    #[test]
    fn every_default_chain_is_valid() {
        for kind in AssetKind::ALL {
            let c = Chain::default_for(kind);
            assert!(c.archives(), "{kind}");
            let back = ChainSpec::from(&proto::Chain::from(&c.spec));
            assert_eq!(
                Chain::validate(&back, kind).unwrap(),
                c,
                "{kind} proto round trip"
            );
        }
    }

    #[test]
    fn errors_name_the_stage_and_the_problem() {
        let wt = AssetKind::WindTurbine;
        let err =
            |stages: Vec<StageSpec>| Chain::validate(&spec(stages), wt).unwrap_err().to_string();
        assert_eq!(
            err(vec![stage("fftx", "edge", None, &[])]),
            "stage 1: unknown operator \"fftx\" (known: lowpass, highpass, bandpass, decimate, rate, compress, stats, fft, psd, envelope, bearing, thd, archive)"
        );
        assert_eq!(
            err(vec![stage("psd", "iot", None, &[])]),
            "stage 1 (psd): psd cannot run on the iot tier (allowed: edge)"
        );
        assert_eq!(
            err(vec![stage("psd", "fog", None, &[])]),
            "stage 1 (psd): invalid tier \"fog\": expected iot, edge or cloud"
        );
        assert_eq!(
            err(vec![stage("stats", "edge", None, &[]), stage("decimate", "iot", None, &[])]),
            "stage 2 (decimate) runs on iot after a stage on edge: stages go iot, then edge, then cloud"
        );
        assert_eq!(
            err(vec![stage("psd", "edge", None, &[("nperseg", num(1.0))])]),
            "stage 1 (psd): parameter nperseg: 1 must be a whole number in 2..=1048576"
        );
        assert_eq!(
            err(vec![stage("psd", "edge", None, &[("npreseg", num(256.0))])]),
            "stage 1 (psd): unknown parameter \"npreseg\" (allowed: window_s, nperseg, band)"
        );
        assert_eq!(
            err(vec![stage("psd", "edge", Some("power"), &[])]),
            "stage 1 (psd): psd needs a waveform signal, power is a 1 Hz process value"
        );
        assert_eq!(
            err(vec![stage("stats", "edge", Some("flux"), &[])]),
            "stage 1 (stats): unknown signal \"flux\" of wind_turbine"
        );
        assert_eq!(
            err(vec![
                stage("decimate", "iot", None, &[("factor", num(4.0))]),
                stage("bearing", "edge", None, &[("band", band(2000.0, 4900.0))]),
            ]),
            "stage 2 (bearing): band edge 4900 Hz is not below the Nyquist frequency 1250 Hz left by decimation"
        );
        assert_eq!(
            err(vec![stage(
                "lowpass",
                "iot",
                None,
                &[("cutoff_hz", num(6000.0))]
            )]),
            "stage 1 (lowpass): cutoff 6000 Hz is not below the Nyquist frequency 5000 Hz"
        );
        assert_eq!(
            err(vec![stage("archive", "cloud", None, &[("keep", ParamValue::Text("raw".into()))])]),
            "stage 1 (archive): parameter keep: \"raw\": only \"features\" can be archived (raw data stays at the edge)"
        );
        assert!(err(vec![stage(
            "bandpass",
            "iot",
            None,
            &[("band", band(300.0, 100.0))]
        )])
        .contains("parameter band"));
        assert!(err(vec![stage(
            "psd",
            "edge",
            None,
            &[("nperseg", num(20000.0))]
        )])
        .contains("longer than the 10000-sample window"));
    }

    #[test]
    fn iot_decimation_changes_rate_and_keeps_time() {
        let s = spec(vec![
            stage("lowpass", "iot", None, &[("cutoff_hz", num(2000.0))]),
            stage("decimate", "iot", None, &[("factor", num(4.0))]),
        ]);
        let c = Chain::validate(&s, AssetKind::WindTurbine).unwrap();
        let mut p = StreamPipeline::new(&c, "bearing_vibration", Tier::Iot);
        let mut total = 0;
        let mut next = None;
        for k in 0..10 {
            let b = Block {
                start_ns: k * 1000 * 100_000,
                period_ns: 100_000,
                samples: vec![1.0; 1000],
            };
            let out = p.process(b).unwrap();
            assert_eq!(out.period_ns, 400_000);
            if let Some(n) = next {
                assert_eq!(out.start_ns, n);
            }
            next = Some(out.start_ns + out.samples.len() as i64 * out.period_ns);
            total += out.samples.len();
        }
        assert_eq!(total, 2500);
        assert!(StreamPipeline::new(&c, "power", Tier::Iot).is_empty());
    }

    #[test]
    fn analyzer_windows_and_features() {
        let c = Chain::default_for(AssetKind::PowerMeter);
        let mut a = Analyzer::new(&c);
        let fs = 6400.0;
        let period = (1e9 / fs) as i64;
        let mut jobs = Vec::new();
        for k in 0..10 {
            let samples: Vec<f64> = (0..1280)
                .map(|i| {
                    let t = (k * 1280 + i) as f64 / fs;
                    let w = std::f64::consts::TAU * 50.0 * t;
                    325.0 * (w.sin() + 0.04 * (3.0 * w).sin())
                })
                .collect();
            let b = Block {
                start_ns: k as i64 * 1280 * period,
                period_ns: period,
                samples,
            };
            jobs.extend(a.push("voltage", b));
        }
        // 12,800 samples: two 1-second windows (thd and stats share the window size).
        assert_eq!(jobs.len(), 2);
        let f = run_window(&jobs[0]);
        assert!((f["voltage.thd"] - 0.04).abs() < 1e-6, "{f:?}");
        assert!(f.contains_key("voltage.rms"));
        assert_eq!(jobs[1].start_ns, jobs[0].end_ns);
        // A live waveform changes every sample: its staleness is the floor.
        assert_eq!(f["voltage.stale"], STALE_FLOOR_S);
    }

    #[test]
    fn staleness_spans_windows_and_grows_while_a_signal_holds_its_value() {
        let c = Chain::default_for(AssetKind::HpcNode);
        let mut a = Analyzer::new(&c);
        let s = 1_000_000_000i64;
        // cpu_temperature at 1 Hz: changing for 90 s, then held at 71.0 for 300 s.
        let mut stale = Vec::new();
        for t in 0..390i64 {
            let v = if t < 90 { 40.0 + t as f64 * 0.25 } else { 71.0 };
            let b = Block {
                start_ns: t * s,
                period_ns: s,
                samples: vec![v],
            };
            for job in a.push("cpu_temperature", b) {
                stale.push(run_window(&job)["cpu_temperature.stale"]);
            }
        }
        // Windows end at 60, 120, ..., 360 s; the last change was at 90 s (the first
        // 71.0), before that every second.
        assert_eq!(stale, vec![1.0, 30.0, 90.0, 150.0, 210.0, 270.0]);
    }

    #[test]
    fn a_counter_is_analysed_by_its_rate() {
        let c = Chain::default_for(AssetKind::ClosureLine);
        let mut a = Analyzer::new(&c);
        let s = 1_000_000_000i64;
        // An energy counter at 1 Hz, in blocks of 10 samples: 45 kW (0.0125 kW.h/s) for
        // 100 s, then 8 kW, from a large reading (a long-running meter); the feed is
        // cut from 200 s to 300 s while the meter goes on counting.
        let mut level = 123_456.0;
        let mut windows = Vec::new();
        let mut resumed = 0;
        for blk in 0..40i64 {
            let samples: Vec<f64> = (0..10)
                .map(|i| {
                    level += if blk * 10 + i <= 100 { 45.0 } else { 8.0 } / 3600.0;
                    level
                })
                .collect();
            if (20..30).contains(&blk) {
                resumed = windows.len();
                continue;
            }
            let b = Block {
                start_ns: blk * 10 * s,
                period_ns: s,
                samples,
            };
            for job in a.push("energy", b) {
                windows.push((job.start_ns / s, job.end_ns / s, run_window(&job)));
            }
        }
        // The first sample has no difference: the windows start 1 s in.
        assert_eq!(resumed, 3);
        assert_eq!((windows[0].0, windows[0].1), (1, 61));
        let mean = |w: &BTreeMap<String, f64>| w["energy.mean"];
        assert!((mean(&windows[0].2) - 45.0 / 3600.0).abs() < 1e-9);
        assert!((windows[0].2["energy.std"]).abs() < 1e-9);
        // 40 s at 45 kW, 20 s at 8 kW.
        assert!((mean(&windows[1].2) - (40.0 * 45.0 + 20.0 * 8.0) / 60.0 / 3600.0).abs() < 1e-9);
        assert!((mean(&windows[2].2) - 8.0 / 3600.0).abs() < 1e-9);
        // No difference spans the gap: the next window starts 1 s after the feed resumes.
        assert_eq!(windows.len(), resumed + 1);
        assert_eq!((windows[resumed].0, windows[resumed].1), (301, 361));
        assert!((mean(&windows[resumed].2) - 8.0 / 3600.0).abs() < 1e-9);
    }
}
