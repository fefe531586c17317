//! Descriptive statistics of a window (NumPy conventions: population standard deviation,
//! Pearson kurtosis = fourth central moment over the squared variance).

use super::DspError;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SignalStats {
    pub count: usize,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    /// Population standard deviation (`numpy.std`).
    pub std: f64,
    pub rms: f64,
    /// Largest absolute value.
    pub peak: f64,
    /// Peak over RMS.
    pub crest_factor: f64,
    /// Pearson kurtosis (3 for a Gaussian; `scipy.stats.kurtosis(fisher=False)`).
    pub kurtosis: f64,
    /// Share of consecutive samples that repeat the one before (`mean(diff(x) == 0)`):
    /// near 0 for a live, noisy sensor, 1 for a stuck one or a dead feed. 0 for a single
    /// sample.
    pub flat: f64,
}

impl SignalStats {
    /// (name, value) pairs in the order of `twinmesh dsp stats`.
    pub fn named(&self) -> [(&'static str, f64); 10] {
        [
            ("count", self.count as f64),
            ("min", self.min),
            ("max", self.max),
            ("mean", self.mean),
            ("std", self.std),
            ("rms", self.rms),
            ("peak", self.peak),
            ("crest_factor", self.crest_factor),
            ("kurtosis", self.kurtosis),
            ("flat", self.flat),
        ]
    }
}

pub fn signal_stats(x: &[f64]) -> Result<SignalStats, DspError> {
    if x.is_empty() {
        return Err(DspError::Input("empty signal".into()));
    }
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let (mut m2, mut m4, mut sq) = (0.0, 0.0, 0.0);
    let (mut min, mut max, mut peak) = (f64::INFINITY, f64::NEG_INFINITY, 0.0f64);
    for &v in x {
        let d = v - mean;
        let d2 = d * d;
        m2 += d2;
        m4 += d2 * d2;
        sq += v * v;
        min = min.min(v);
        max = max.max(v);
        peak = peak.max(v.abs());
    }
    let repeats = x.windows(2).filter(|w| w[0] == w[1]).count();
    let var = m2 / n;
    let rms = (sq / n).sqrt();
    Ok(SignalStats {
        count: x.len(),
        min,
        max,
        mean,
        std: var.sqrt(),
        rms,
        peak,
        crest_factor: if rms > 0.0 { peak / rms } else { f64::NAN },
        kurtosis: if var > 0.0 {
            (m4 / n) / (var * var)
        } else {
            f64::NAN
        },
        flat: if x.len() > 1 {
            repeats as f64 / (x.len() - 1) as f64
        } else {
            0.0
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        let s = signal_stats(&[1.0, -1.0, 1.0, -1.0]).unwrap();
        assert_eq!(
            (s.mean, s.std, s.rms, s.peak, s.crest_factor, s.kurtosis),
            (0.0, 1.0, 1.0, 1.0, 1.0, 1.0)
        );
        assert_eq!(s.flat, 0.0);
        assert_eq!(signal_stats(&[2.0, 2.0, 2.0]).unwrap().flat, 1.0);
        assert_eq!(signal_stats(&[1.0, 1.0, 2.0, 3.0, 3.0]).unwrap().flat, 0.5);
        assert_eq!(signal_stats(&[4.0]).unwrap().flat, 0.0);
        assert!(signal_stats(&[]).is_err());
    }
}
