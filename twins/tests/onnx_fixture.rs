//! An ONNX model trained elsewhere (scikit-learn, `scripts/models/make_onnx_fixture.py`)
//! gives the scores Python computed, within 1e-5, through our model file and back.

use serde_json::Value;
use twinmesh_twins::model::{Algorithm, Model, ModelError};

const ONNX: &[u8] = include_bytes!("fixtures/pca_autoencoder.onnx");
const EXPECTED: &str = include_str!("fixtures/pca_autoencoder.json");

/// Feature names, probe rows, onnxruntime's scores, scikit-learn's scores, threshold.
type Fixture = (Vec<String>, Vec<Vec<f64>>, Vec<f64>, Vec<f64>, f64);

fn fixture() -> Fixture {
    let v: Value = serde_json::from_str(EXPECTED).unwrap();
    let strings = |k: &str| -> Vec<String> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect()
    };
    let floats = |x: &Value| -> Vec<f64> {
        x.as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_f64().unwrap())
            .collect()
    };
    let rows = v["rows"].as_array().unwrap().iter().map(floats).collect();
    (
        strings("features"),
        rows,
        floats(&v["onnxruntime_scores"]),
        floats(&v["sklearn_scores"]),
        v["threshold"].as_f64().unwrap(),
    )
}

#[test]
fn onnx_scores_match_python_within_1e_5() {
    let (features, rows, ort, sklearn, threshold) = fixture();
    let model = Model::from_onnx(&features, ONNX, "score", false, threshold).unwrap();
    assert_eq!(model.algorithm, Algorithm::Onnx);
    // Through the model file, as a twin gets it.
    let model = Model::from_bytes(&model.to_bytes()).unwrap();
    let mut alarms = 0;
    for ((row, want_ort), want_sk) in rows.iter().zip(&ort).zip(&sklearn) {
        let got = model.score(row).unwrap();
        let tol = 1e-5 * want_ort.abs().max(1.0);
        assert!(
            (got - want_ort).abs() <= tol,
            "tract {got} vs onnxruntime {want_ort}"
        );
        assert!(
            (got - want_sk).abs() <= tol,
            "tract {got} vs scikit-learn {want_sk}"
        );
        alarms += usize::from(model.is_alarm(row).unwrap());
    }
    // The fixture's last eight rows break the features' correlations.
    assert!(alarms >= 6, "{alarms} of 8 broken rows alarm");
    assert!(model.contributions(&rows[0]).unwrap().is_empty());
}

#[test]
fn broken_or_mismatched_onnx_models_are_refused() {
    let (features, _, _, _, threshold) = fixture();
    let mut corrupt = ONNX.to_vec();
    corrupt.truncate(ONNX.len() / 2);
    let e = Model::from_onnx(&features, &corrupt, "score", false, threshold).unwrap_err();
    assert!(matches!(e, ModelError::Corrupt(_)), "{e}");
    let e = Model::from_onnx(&features, ONNX, "nope", false, threshold).unwrap_err();
    assert!(e.to_string().contains("no output named"), "{e}");
    // Three names for a four-column model: it cannot run.
    let e = Model::from_onnx(&features[..3], ONNX, "score", false, threshold).unwrap_err();
    assert!(matches!(e, ModelError::Corrupt(_)), "{e}");
    // Negation flips the score.
    let m = Model::from_onnx(&features, ONNX, "score", true, -threshold).unwrap();
    let plain = Model::from_onnx(&features, ONNX, "score", false, threshold).unwrap();
    let x = [1.0, 0.9, 50.0, 45.0];
    assert_eq!(m.score(&x).unwrap(), -plain.score(&x).unwrap());
}
