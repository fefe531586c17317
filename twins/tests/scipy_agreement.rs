//! Every DSP operator against NumPy/SciPy fixtures (`scripts/fixtures/generate.py`).
//! Tolerances: ≤ 1e-9 relative for transforms and statistics, ≤ 1e-6 for filters; a
//! vector's relative error is its largest absolute error over its largest magnitude.

use serde_json::Value;
use twinmesh_twins::dsp::{butter, decimate, signal_stats, sosfilt, BandType, Spectral};

fn fixtures() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/dsp.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture file"))
        .expect("fixture json")
}

fn vec(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want
        .iter()
        .fold(0.0f64, |m, v| m.max(v.abs()))
        .max(f64::MIN_POSITIVE);
    let err = got
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        err <= tol * scale,
        "{what}: relative error {:e} > {tol:e}",
        err / scale
    );
}

#[test]
fn butterworth_sos_and_sosfilt_match_scipy() {
    let f = fixtures();
    let x = vec(&f["signals"]["x"]);
    for case in f["filters"].as_array().unwrap() {
        let cutoff = vec(&case["cutoff"]);
        let band: BandType = case["btype"].as_str().unwrap().parse().unwrap();
        let order = case["order"].as_u64().unwrap() as usize;
        let fs = case["fs"].as_f64().unwrap();
        let what = format!("butter({order}, {cutoff:?}, {band:?}, fs={fs})");
        let sos = butter(order, &cutoff, band, fs).unwrap();
        let want: Vec<Vec<f64>> = case["sos"].as_array().unwrap().iter().map(vec).collect();
        assert_eq!(sos.nrows(), want.len(), "{what}: sections");
        for (i, row) in want.iter().enumerate() {
            let got: Vec<f64> = sos.row(i).to_vec();
            assert_close(&format!("{what} section {i}"), &got, row, 1e-6);
        }
        assert_close(
            &format!("{what} sosfilt"),
            &sosfilt(&sos, &x),
            &vec(&case["y"]),
            1e-6,
        );
    }
}

#[test]
fn decimate_matches_its_documented_definition() {
    let f = fixtures();
    let x = vec(&f["signals"]["x"]);
    for case in f["decimate"].as_array().unwrap() {
        let q = case["q"].as_u64().unwrap() as usize;
        assert_close(
            &format!("decimate q={q}"),
            &decimate(&x, q).unwrap(),
            &vec(&case["y"]),
            1e-6,
        );
    }
}

#[test]
fn statistics_match_numpy() {
    let f = fixtures();
    for name in ["x", "x_odd"] {
        let s = signal_stats(&vec(&f["signals"][name])).unwrap();
        for (stat, got) in s.named() {
            let want = f["stats"][name][stat].as_f64().unwrap();
            assert!(
                (got - want).abs() <= 1e-9 * want.abs().max(1e-300),
                "{name}.{stat}: {got} vs {want}"
            );
        }
    }
}

#[test]
fn spectra_match_numpy_and_scipy() {
    let f = fixtures();
    let fs = f["signals"]["fs"].as_f64().unwrap();
    let mut sp = Spectral::new();
    for name in ["x", "x_odd"] {
        let x = vec(&f["signals"][name]);
        assert_close(
            &format!("rfft {name}"),
            &sp.rfft_magnitude(&x).unwrap(),
            &vec(&f["fft"][name]),
            1e-9,
        );
        assert_close(
            &format!("hilbert {name}"),
            &sp.envelope(&x).unwrap(),
            &vec(&f["envelope"][name]["envelope"]),
            1e-9,
        );
        assert_close(
            &format!("envelope spectrum {name}"),
            &sp.envelope_spectrum(&x).unwrap(),
            &vec(&f["envelope"][name]["envelope_spectrum"]),
            1e-9,
        );
    }
    for case in f["welch"].as_array().unwrap() {
        let x = vec(&f["signals"][case["signal"].as_str().unwrap()]);
        let x = &x[..case["len"].as_u64().unwrap() as usize];
        let nperseg = case["nperseg"].as_u64().unwrap() as usize;
        let (freqs, psd) = sp.welch(x, fs, nperseg).unwrap();
        let what = format!("welch len={} nperseg={nperseg}", x.len());
        assert_close(&format!("{what} f"), &freqs, &vec(&case["f"]), 1e-12);
        assert_close(&what, &psd, &vec(&case["psd"]), 1e-9);
    }
}

#[test]
fn thd_matches_its_reference_definition() {
    let f = fixtures();
    let t = &f["thd"];
    let fs = t["fs"].as_f64().unwrap();
    let mut sp = Spectral::new();
    let wave = vec(&t["wave"]);
    for (got, key) in [
        (sp.thd(&wave, fs, Some(50.0)).unwrap(), "thd_given"),
        (sp.thd(&wave, fs, None).unwrap(), "thd_estimated"),
        (sp.thd(&vec(&t["wave_off"]), fs, None).unwrap(), "thd_off"),
    ] {
        let want = t[key].as_f64().unwrap();
        assert!((got - want).abs() <= 1e-9 * want, "{key}: {got} vs {want}");
    }
    // The configured content: sqrt(0.05² + 0.03² + 0.02² + 0.01²).
    let configured = (0.05f64.powi(2) + 0.03f64.powi(2) + 0.02f64.powi(2) + 0.01f64.powi(2)).sqrt();
    assert!((sp.thd(&wave, fs, Some(50.0)).unwrap() - configured).abs() < 0.001);
}

#[test]
fn band_energy_and_peaks_match_their_references() {
    let f = fixtures();
    let x = vec(&f["signals"]["x"]);
    let fs = f["signals"]["fs"].as_f64().unwrap();
    let mut sp = Spectral::new();
    let be = &f["band_energy"];
    let nperseg = be["nperseg"].as_u64().unwrap() as usize;
    let (_, psd) = sp.welch(&x, fs, nperseg).unwrap();
    for (band, want) in be["bands"]
        .as_array()
        .unwrap()
        .iter()
        .zip(vec(&be["energy"]))
    {
        let b = vec(band);
        let got = twinmesh_twins::dsp::band_energy(&psd, fs, nperseg, b[0], b[1]);
        assert!(
            (got - want).abs() <= 1e-9 * want.abs().max(1e-300),
            "band {b:?}: {got} vs {want}"
        );
    }
    let pk = &f["peaks"];
    let mag = sp.rfft_magnitude(&x).unwrap();
    let got = twinmesh_twins::dsp::peaks(&mag, pk["df"].as_f64().unwrap(), 5);
    let want_f = vec(&pk["frequency_hz"]);
    let want_m = vec(&pk["magnitude"]);
    assert_eq!(got.len(), want_f.len());
    for (p, (wf, wm)) in got.iter().zip(want_f.iter().zip(&want_m)) {
        assert!((p.frequency_hz - wf).abs() < 1e-9, "{p:?} vs {wf}");
        assert!((p.magnitude - wm).abs() <= 1e-9 * wm, "{p:?} vs {wm}");
    }
}
