//! Models trained elsewhere, run through ONNX (issue 6 point 5) with `tract-onnx`, in
//! pure Rust. The model takes one `[1, d]` float tensor (the feature vector, in the
//! order of the model's feature names) and gives a score per row on the named output
//! (higher is more anomalous; `negate` flips scores such as scikit-learn's
//! `decision_function`, where lower is more anomalous).
//!
//! A compiled plan is kept per model (by checksum) for the life of the process, so
//! twins that share a model share one plan.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use tract_onnx::prelude::*;

use crate::model::ModelError;

type Plan = Arc<TypedSimplePlan>;

pub struct OnnxScorer {
    plan: Plan,
    width: usize,
    output: usize,
}

impl std::fmt::Debug for OnnxScorer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxScorer")
            .field("width", &self.width)
            .field("output", &self.output)
            .finish()
    }
}

fn bad(e: impl std::fmt::Display) -> ModelError {
    ModelError::Corrupt(format!("onnx: {e}"))
}

impl OnnxScorer {
    /// Loads and compiles `bytes` for `width` features; `output` names the score output.
    pub fn load(bytes: &[u8], width: usize, output: &str) -> Result<Self, ModelError> {
        let model = tract_onnx::onnx()
            .model_for_read(&mut std::io::Cursor::new(bytes))
            .map_err(bad)?;
        let index = model
            .output_outlets()
            .map_err(bad)?
            .iter()
            .position(|o| {
                model.node(o.node).name == output || model.outlet_label(*o) == Some(output)
            })
            .ok_or_else(|| bad(format!("no output named {output:?}")))?;
        let plan = model
            .with_input_fact(0, f32::fact([1, width]).into())
            .map_err(bad)?
            .into_optimized()
            .map_err(bad)?
            .into_runnable()
            .map_err(bad)?;
        let scorer = OnnxScorer {
            plan,
            width,
            output: index,
        };
        // A model that cannot score a vector of the right width is refused now.
        scorer.score(&vec![0.0; width])?;
        Ok(scorer)
    }

    pub fn score(&self, x: &[f64]) -> Result<f64, ModelError> {
        if x.len() != self.width {
            return Err(ModelError::WrongWidth {
                got: x.len(),
                expected: self.width,
            });
        }
        let input: Tensor =
            tract_ndarray::Array2::from_shape_fn((1, self.width), |(_, j)| x[j] as f32).into();
        let out = self.plan.run(tvec!(input.into())).map_err(bad)?;
        let t = out
            .get(self.output)
            .ok_or_else(|| bad("missing output"))?
            .cast_to::<f32>()
            .map_err(bad)?;
        let view = t.to_plain_array_view::<f32>().map_err(bad)?;
        let v: Vec<f32> = view.iter().copied().collect();
        match v.as_slice() {
            [s] => Ok(f64::from(*s)),
            _ => Err(bad(format!(
                "the score output has {} values for one row; expected 1",
                v.len()
            ))),
        }
    }
}

/// The compiled scorer of a model file, compiled once per process.
pub fn scorer(bytes: &[u8], width: usize, output: &str) -> Result<Arc<OnnxScorer>, ModelError> {
    cached(crc32fast::hash(bytes), width, output, || Ok(bytes.to_vec()))
}

/// The scorer cached under `key` (a checksum of the model as stored), loaded with
/// `bytes` on first use.
pub fn cached(
    key: u32,
    width: usize,
    output: &str,
    bytes: impl FnOnce() -> Result<Vec<u8>, ModelError>,
) -> Result<Arc<OnnxScorer>, ModelError> {
    type Plans = Mutex<HashMap<(u32, usize, String), Arc<OnnxScorer>>>;
    static PLANS: OnceLock<Plans> = OnceLock::new();
    let key = (key, width, output.to_owned());
    let plans = PLANS.get_or_init(Default::default);
    if let Some(s) = plans.lock().expect("onnx plans").get(&key) {
        return Ok(s.clone());
    }
    let s = Arc::new(OnnxScorer::load(&bytes()?, width, output)?);
    plans.lock().expect("onnx plans").insert(key, s.clone());
    Ok(s)
}
