//! Spectral operators with cached FFT plans and reused buffers: magnitude spectrum
//! (`abs(numpy.fft.rfft(x))`), Welch PSD (`scipy.signal.welch` defaults), analytic
//! signal and envelope (`scipy.signal.hilbert`), envelope spectrum, band energies,
//! spectral peaks and THD.

use std::collections::HashMap;
use std::sync::Arc;

use rustfft::num_complex::Complex64;
use rustfft::{Fft, FftPlanner};

use super::DspError;

/// Harmonics counted by [`Spectral::thd`] (2..=40).
pub const THD_MAX_HARMONIC: usize = 40;
/// Half-width, in bins, of the band summed around each harmonic of the Hann-windowed
/// spectrum in [`Spectral::thd`].
pub const THD_HALF_WIDTH: usize = 3;

/// FFT plans and scratch buffers, reused across windows: create one per worker and keep
/// it (no allocation per window once the sizes have been seen).
pub struct Spectral {
    planner: FftPlanner<f64>,
    forward: HashMap<usize, Arc<dyn Fft<f64>>>,
    inverse: HashMap<usize, Arc<dyn Fft<f64>>>,
    windows: HashMap<usize, Vec<f64>>,
    buf: Vec<Complex64>,
    scratch: Vec<Complex64>,
    /// Prefix sums of the signal (segment means in O(1)).
    prefix: Vec<f64>,
    /// Accumulated |Z|² of paired Welch segments; power spectrum of `thd`.
    scratch_power: Vec<f64>,
    /// A real work buffer (windowed samples, envelopes).
    work: Vec<f64>,
}

impl Default for Spectral {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Spectral {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spectral")
            .field("sizes", &self.forward.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Periodic Hann window (`scipy.signal.get_window("hann", n)`).
pub fn hann(n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| 0.5 - 0.5 * (std::f64::consts::TAU * i as f64 / n as f64).cos())
        .collect()
}

/// `numpy.fft.rfftfreq(n, 1 / fs)`.
pub fn rfft_freqs(n: usize, fs: f64) -> Vec<f64> {
    (0..n / 2 + 1).map(|k| k as f64 * fs / n as f64).collect()
}

/// One spectral peak.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Peak {
    pub frequency_hz: f64,
    pub magnitude: f64,
}

impl Spectral {
    pub fn new() -> Self {
        Spectral {
            planner: FftPlanner::new(),
            forward: HashMap::new(),
            inverse: HashMap::new(),
            windows: HashMap::new(),
            buf: Vec::new(),
            scratch: Vec::new(),
            prefix: Vec::new(),
            scratch_power: Vec::new(),
            work: Vec::new(),
        }
    }

    fn plans(&mut self, n: usize) -> (Arc<dyn Fft<f64>>, Arc<dyn Fft<f64>>) {
        let fwd = self
            .forward
            .entry(n)
            .or_insert_with(|| self.planner.plan_fft_forward(n))
            .clone();
        let inv = self
            .inverse
            .entry(n)
            .or_insert_with(|| self.planner.plan_fft_inverse(n))
            .clone();
        let need = fwd
            .get_inplace_scratch_len()
            .max(inv.get_inplace_scratch_len());
        if self.scratch.len() < need {
            self.scratch.resize(need, Complex64::default());
        }
        (fwd, inv)
    }

    fn window(&mut self, n: usize) -> &[f64] {
        self.windows.entry(n).or_insert_with(|| hann(n))
    }

    /// Forward FFT of a real signal into `self.buf` (length `x.len()`).
    fn fft_real(&mut self, x: &[f64]) {
        let (fwd, _) = self.plans(x.len());
        self.buf.clear();
        self.buf.extend(x.iter().map(|&v| Complex64::new(v, 0.0)));
        fwd.process_with_scratch(&mut self.buf, &mut self.scratch);
    }

    /// `abs(numpy.fft.rfft(x))`, unscaled, into `out`.
    pub fn rfft_magnitude_into(&mut self, x: &[f64], out: &mut Vec<f64>) -> Result<(), DspError> {
        if x.is_empty() {
            return Err(DspError::Input("empty signal".into()));
        }
        self.fft_real(x);
        out.clear();
        out.extend(self.buf[..x.len() / 2 + 1].iter().map(|c| c.norm()));
        Ok(())
    }

    pub fn rfft_magnitude(&mut self, x: &[f64]) -> Result<Vec<f64>, DspError> {
        let mut out = Vec::new();
        self.rfft_magnitude_into(x, &mut out)?;
        Ok(out)
    }

    /// `scipy.signal.welch(x, fs, nperseg=nperseg)`: Hann window, 50 % overlap, constant
    /// detrend, density scaling, one-sided, mean over segments. Writes the PSD (length
    /// `nperseg / 2 + 1`) into `out`; frequencies are [`rfft_freqs`]`(nperseg, fs)`.
    /// A signal shorter than `nperseg` uses its own length, as SciPy does.
    pub fn welch_into(
        &mut self,
        x: &[f64],
        fs: f64,
        nperseg: usize,
        out: &mut Vec<f64>,
    ) -> Result<usize, DspError> {
        if x.is_empty() {
            return Err(DspError::Input("empty signal".into()));
        }
        if nperseg < 2 {
            return Err(DspError::Param(format!(
                "nperseg {nperseg} must be at least 2"
            )));
        }
        if !(fs.is_finite() && fs > 0.0) {
            return Err(DspError::Param(format!(
                "sample rate {fs} must be positive"
            )));
        }
        let n = nperseg.min(x.len());
        let step = n - n / 2;
        let segments = (x.len() - n) / step + 1;
        let (fwd, _) = self.plans(n);
        self.window(n);
        let win = &self.windows[&n];
        let win_ss: f64 = win.iter().map(|w| w * w).sum();
        let bins = n / 2 + 1;
        out.clear();
        out.resize(bins, 0.0);
        // Segment means from prefix sums (constant detrend).
        self.prefix.resize(x.len() + 1, 0.0);
        let mut acc = 0.0;
        for (p, &v) in self.prefix[1..].iter_mut().zip(x) {
            acc += v;
            *p = acc;
        }
        let prefix = &self.prefix;
        let mean = |start: usize| (prefix[start + n] - prefix[start]) / n as f64;
        // Two real segments per complex FFT, z = a + i b. Since A[k] = (Z[k] + conj Z[n-k]) / 2
        // and B[k] = (Z[k] - conj Z[n-k]) / 2i, |A[k]|² + |B[k]|² = (|Z[k]|² + |Z[n-k]|²) / 2:
        // accumulate |Z|² over all n bins and fold once at the end.
        self.scratch_power.clear();
        self.scratch_power.resize(n, 0.0);
        self.buf.resize(n, Complex64::default());
        let win = &win[..n];
        let mut s = 0;
        while s + 1 < segments {
            let a = &x[s * step..s * step + n];
            let b = &x[(s + 1) * step..(s + 1) * step + n];
            let (ma, mb) = (mean(s * step), mean((s + 1) * step));
            let buf = &mut self.buf[..n];
            for i in 0..n {
                buf[i] = Complex64::new((a[i] - ma) * win[i], (b[i] - mb) * win[i]);
            }
            fwd.process_with_scratch(buf, &mut self.scratch);
            for (p, z) in self.scratch_power.iter_mut().zip(buf.iter()) {
                *p += z.re * z.re + z.im * z.im;
            }
            s += 2;
        }
        let power = &self.scratch_power;
        out[0] = power[0];
        for (k, o) in out.iter_mut().enumerate().skip(1) {
            *o = 0.5 * (power[k] + power[n - k]);
        }
        if s < segments {
            let a = &x[s * step..s * step + n];
            let ma = mean(s * step);
            let buf = &mut self.buf[..n];
            for i in 0..n {
                buf[i] = Complex64::new((a[i] - ma) * win[i], 0.0);
            }
            fwd.process_with_scratch(buf, &mut self.scratch);
            for (o, z) in out.iter_mut().zip(buf.iter()) {
                *o += z.re * z.re + z.im * z.im;
            }
        }
        let scale = 1.0 / (fs * win_ss) / segments as f64;
        let last = if n.is_multiple_of(2) { bins - 1 } else { bins };
        for (k, o) in out.iter_mut().enumerate() {
            *o *= scale;
            if k >= 1 && k < last {
                *o *= 2.0;
            }
        }
        Ok(n)
    }

    pub fn welch(
        &mut self,
        x: &[f64],
        fs: f64,
        nperseg: usize,
    ) -> Result<(Vec<f64>, Vec<f64>), DspError> {
        let mut psd = Vec::new();
        let n = self.welch_into(x, fs, nperseg, &mut psd)?;
        Ok((rfft_freqs(n, fs), psd))
    }

    /// The analytic signal `scipy.signal.hilbert(x)` into `out`.
    pub fn analytic_into(&mut self, x: &[f64], out: &mut Vec<Complex64>) -> Result<(), DspError> {
        self.analytic_in_buf(x)?;
        out.clear();
        out.extend_from_slice(&self.buf);
        Ok(())
    }

    /// `abs(scipy.signal.hilbert(x))` into `out`.
    pub fn envelope_into(&mut self, x: &[f64], out: &mut Vec<f64>) -> Result<(), DspError> {
        self.analytic_in_buf(x)?;
        out.clear();
        out.extend(self.buf.iter().map(|c| c.norm()));
        Ok(())
    }

    /// Leaves the analytic signal of `x` in `self.buf`.
    fn analytic_in_buf(&mut self, x: &[f64]) -> Result<(), DspError> {
        let n = x.len();
        if n == 0 {
            return Err(DspError::Input("empty signal".into()));
        }
        let (_, inv) = self.plans(n);
        self.fft_real(x);
        // h: 1 at DC (and Nyquist for even n), 2 for positive frequencies, 0 otherwise.
        let half = if n.is_multiple_of(2) {
            n / 2
        } else {
            n.div_ceil(2)
        };
        for (k, c) in self.buf.iter_mut().enumerate() {
            let h = if k == 0 || (n.is_multiple_of(2) && k == n / 2) {
                1.0
            } else if k < half {
                2.0
            } else {
                0.0
            };
            *c *= h / n as f64;
        }
        inv.process_with_scratch(&mut self.buf, &mut self.scratch);
        Ok(())
    }

    pub fn envelope(&mut self, x: &[f64]) -> Result<Vec<f64>, DspError> {
        let mut out = Vec::new();
        self.envelope_into(x, &mut out)?;
        Ok(out)
    }

    /// Envelope spectrum: single-sided amplitude spectrum of the envelope with its mean
    /// removed, `2 |rfft(env - mean(env))| / n`; used to find bearing defect frequencies.
    pub fn envelope_spectrum(&mut self, x: &[f64]) -> Result<Vec<f64>, DspError> {
        let mut out = Vec::new();
        self.envelope_spectrum_into(x, &mut out)?;
        Ok(out)
    }

    /// [`Spectral::envelope_spectrum`] into `out`, without allocating once warm.
    pub fn envelope_spectrum_into(
        &mut self,
        x: &[f64],
        out: &mut Vec<f64>,
    ) -> Result<(), DspError> {
        let mut env = std::mem::take(&mut self.work);
        let result = self.envelope_into(x, &mut env).and_then(|()| {
            let mean = env.iter().sum::<f64>() / env.len() as f64;
            env.iter_mut().for_each(|v| *v -= mean);
            let n = env.len() as f64;
            self.rfft_magnitude_into(&env, out)?;
            out.iter_mut().for_each(|m| *m *= 2.0 / n);
            Ok(())
        });
        self.work = env;
        result
    }

    /// Total harmonic distortion: the RMS of harmonics 2..=40 over the RMS of the
    /// fundamental, each taken as the energy of the Hann-windowed spectrum within
    /// ±3 bins of the harmonic's frequency. The fundamental is `fundamental_hz` or, when
    /// `None`, the strongest non-DC bin.
    pub fn thd(
        &mut self,
        x: &[f64],
        fs: f64,
        fundamental_hz: Option<f64>,
    ) -> Result<f64, DspError> {
        let n = x.len();
        if n < 64 {
            return Err(DspError::Input(format!(
                "thd needs at least 64 samples, got {n}"
            )));
        }
        if !(fs.is_finite() && fs > 0.0) {
            return Err(DspError::Param(format!(
                "sample rate {fs} must be positive"
            )));
        }
        self.window(n);
        let windowed: Vec<f64> = x
            .iter()
            .zip(&self.windows[&n])
            .map(|(v, w)| v * w)
            .collect();
        self.fft_real(&windowed);
        let bins = n / 2 + 1;
        let power: Vec<f64> = self.buf[..bins].iter().map(|c| c.norm_sqr()).collect();
        let df = fs / n as f64;
        let f0 = match fundamental_hz {
            Some(f) => f,
            None => {
                let k = (1..bins)
                    .max_by(|&a, &b| power[a].total_cmp(&power[b]))
                    .unwrap_or(1);
                k as f64 * df
            }
        };
        if !(f0 > 0.0 && f0 < fs / 2.0) {
            return Err(DspError::Param(format!(
                "fundamental {f0} Hz must be between 0 and {} Hz",
                fs / 2.0
            )));
        }
        if f0 / df < (2 * THD_HALF_WIDTH + 1) as f64 {
            return Err(DspError::Input(format!(
                "window too short for thd: the fundamental {f0} Hz is {:.1} bins from DC, need at least {}",
                f0 / df,
                2 * THD_HALF_WIDTH + 1
            )));
        }
        let band = |h: usize| -> f64 {
            let k = (h as f64 * f0 / df).round() as usize;
            let lo = k.saturating_sub(THD_HALF_WIDTH).max(1);
            let hi = (k + THD_HALF_WIDTH).min(bins - 1);
            power[lo..=hi].iter().sum()
        };
        let fundamental = band(1);
        if fundamental <= 0.0 {
            return Err(DspError::Input("no energy at the fundamental".into()));
        }
        let harmonics: f64 = (2..=THD_MAX_HARMONIC)
            .take_while(|&h| (h as f64 * f0 / df).round() as usize + THD_HALF_WIDTH < bins)
            .map(band)
            .sum();
        Ok((harmonics / fundamental).sqrt())
    }
}

/// Energy of a one-sided PSD between `lo_hz` and `hi_hz` (rectangle rule, bins whose
/// centre lies in `[lo, hi)`).
pub fn band_energy(psd: &[f64], fs: f64, nperseg: usize, lo_hz: f64, hi_hz: f64) -> f64 {
    let df = fs / nperseg as f64;
    psd.iter()
        .enumerate()
        .filter(|(k, _)| {
            let f = *k as f64 * df;
            f >= lo_hz && f < hi_hz
        })
        .map(|(_, p)| p * df)
        .sum()
}

/// The `count` largest local maxima of a spectrum (excluding DC), strongest first.
pub fn peaks(spectrum: &[f64], df: f64, count: usize) -> Vec<Peak> {
    let mut found: Vec<Peak> = (1..spectrum.len().saturating_sub(1))
        .filter(|&k| spectrum[k] > spectrum[k - 1] && spectrum[k] >= spectrum[k + 1])
        .map(|k| Peak {
            frequency_hz: k as f64 * df,
            magnitude: spectrum[k],
        })
        .collect();
    found.sort_by(|a, b| b.magnitude.total_cmp(&a.magnitude));
    found.truncate(count);
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(n: usize, fs: f64, f: f64, a: f64) -> Vec<f64> {
        (0..n)
            .map(|i| a * (std::f64::consts::TAU * f * i as f64 / fs).sin())
            .collect()
    }

    #[test]
    fn parseval_for_welch() {
        // A unit-amplitude tone has power 0.5: the PSD integrates to it.
        let fs = 1000.0;
        let x = tone(8192, fs, 125.0, 1.0);
        let mut sp = Spectral::new();
        let (f, p) = sp.welch(&x, fs, 256).unwrap();
        assert_eq!(f.len(), 129);
        let total = band_energy(&p, fs, 256, 0.0, fs);
        assert!((total - 0.5).abs() < 1e-3, "{total}");
        let pk = peaks(&p, fs / 256.0, 1)[0];
        assert_eq!(pk.frequency_hz, 125.0);
    }

    #[test]
    fn envelope_of_am_signal_is_its_modulation() {
        let fs = 10_000.0;
        let n = 10_000;
        let x: Vec<f64> = (0..n)
            .map(|i| {
                let t = i as f64 / fs;
                (1.0 + 0.5 * (std::f64::consts::TAU * 10.0 * t).cos())
                    * (std::f64::consts::TAU * 1000.0 * t).sin()
            })
            .collect();
        let mut sp = Spectral::new();
        let env = sp.envelope(&x).unwrap();
        for (i, e) in env.iter().enumerate().skip(500).take(9000) {
            let t = i as f64 / fs;
            let want = 1.0 + 0.5 * (std::f64::consts::TAU * 10.0 * t).cos();
            assert!((e - want).abs() < 1e-6, "{i}: {e} vs {want}");
        }
        let es = sp.envelope_spectrum(&x).unwrap();
        let pk = peaks(&es, fs / n as f64, 1)[0];
        assert_eq!(pk.frequency_hz, 10.0);
        assert!((pk.magnitude - 0.5).abs() < 1e-6);
    }

    #[test]
    fn thd_of_known_harmonics() {
        let fs = 6400.0;
        let n = 6400;
        let x: Vec<f64> = (0..n)
            .map(|i| {
                let w = std::f64::consts::TAU * 50.0 * i as f64 / fs;
                w.sin() + 0.03 * (3.0 * w).sin() + 0.04 * (5.0 * w).sin()
            })
            .collect();
        let mut sp = Spectral::new();
        let thd = sp.thd(&x, fs, Some(50.0)).unwrap();
        assert!((thd - 0.05).abs() < 1e-9, "{thd}");
        let auto = sp.thd(&x, fs, None).unwrap();
        assert!((auto - 0.05).abs() < 1e-9);
        assert!(sp.thd(&x[..100], fs, Some(50.0)).is_err());
    }
}
