//! Butterworth IIR design as second-order sections and their filtering, following
//! `scipy.signal.butter(N, Wn, btype, fs=fs, output="sos")` and `scipy.signal.sosfilt`
//! step by step (analog prototype → frequency transform → bilinear → zpk2sos with
//! SciPy's "nearest" pairing), so coefficients agree with SciPy's, not just responses.

use ndarray::Array2;
use rustfft::num_complex::Complex64;

use super::DspError;

/// Band type of a filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BandType {
    Lowpass,
    Highpass,
    Bandpass,
}

impl std::str::FromStr for BandType {
    type Err = DspError;
    fn from_str(s: &str) -> Result<Self, DspError> {
        match s {
            "lowpass" => Ok(BandType::Lowpass),
            "highpass" => Ok(BandType::Highpass),
            "bandpass" => Ok(BandType::Bandpass),
            _ => Err(DspError::Param(format!(
                "unknown filter kind {s:?}: expected lowpass, highpass or bandpass"
            ))),
        }
    }
}

/// Most filter order accepted.
pub const MAX_ORDER: usize = 24;

struct Zpk {
    z: Vec<Complex64>,
    p: Vec<Complex64>,
    k: f64,
}

fn prod(v: &[Complex64]) -> Complex64 {
    v.iter().fold(Complex64::new(1.0, 0.0), |a, b| a * b)
}

/// Butterworth design in second-order sections: an `n_sections × 6` array of
/// `[b0, b1, b2, 1, a1, a2]` rows. `cutoff_hz` has one frequency (low/high-pass) or two
/// (band-pass), each strictly between 0 and `fs / 2`.
pub fn butter(
    order: usize,
    cutoff_hz: &[f64],
    band: BandType,
    fs: f64,
) -> Result<Array2<f64>, DspError> {
    if order == 0 || order > MAX_ORDER {
        return Err(DspError::Param(format!(
            "filter order {order} must be in 1..={MAX_ORDER}"
        )));
    }
    if !(fs.is_finite() && fs > 0.0) {
        return Err(DspError::Param(format!(
            "sample rate {fs} must be positive"
        )));
    }
    let want = if band == BandType::Bandpass { 2 } else { 1 };
    if cutoff_hz.len() != want {
        return Err(DspError::Param(
            format!(
                "{band:?} filter needs {want} cutoff frequenc{}, got {}",
                if want == 1 { "y" } else { "ies" },
                cutoff_hz.len()
            )
            .to_lowercase(),
        ));
    }
    let nyquist = fs / 2.0;
    for &c in cutoff_hz {
        if !(c > 0.0 && c < nyquist) {
            return Err(DspError::Param(format!(
                "cutoff {c} Hz must be between 0 and the Nyquist frequency {nyquist} Hz"
            )));
        }
    }
    if band == BandType::Bandpass && cutoff_hz[0] >= cutoff_hz[1] {
        return Err(DspError::Param(format!(
            "band-pass cutoffs {} Hz and {} Hz must be increasing",
            cutoff_hz[0], cutoff_hz[1]
        )));
    }
    // Analog prototype (buttap): poles -exp(j*pi*m/(2N)), m = -N+1, -N+3, ..., N-1.
    let n = order as f64;
    let mut zpk = Zpk {
        z: Vec::new(),
        p: (0..order)
            .map(|i| {
                let m = -(n - 1.0) + 2.0 * i as f64;
                -Complex64::from_polar(1.0, std::f64::consts::PI * m / (2.0 * n))
            })
            .collect(),
        k: 1.0,
    };
    // Pre-warp with SciPy's normalised sample rate of 2.
    const FS: f64 = 2.0;
    let warped: Vec<f64> = cutoff_hz
        .iter()
        .map(|c| 2.0 * FS * (std::f64::consts::PI * (c / nyquist) / FS).tan())
        .collect();
    zpk = match band {
        BandType::Lowpass => lp2lp(zpk, warped[0]),
        BandType::Highpass => lp2hp(zpk, warped[0]),
        BandType::Bandpass => {
            let bw = warped[1] - warped[0];
            let wo = (warped[0] * warped[1]).sqrt();
            lp2bp(zpk, wo, bw)
        }
    };
    let zpk = bilinear(zpk, FS);
    zpk2sos(zpk)
}

fn lp2lp(zpk: Zpk, wo: f64) -> Zpk {
    let degree = (zpk.p.len() - zpk.z.len()) as i32;
    Zpk {
        z: zpk.z.iter().map(|z| z * wo).collect(),
        p: zpk.p.iter().map(|p| p * wo).collect(),
        k: zpk.k * wo.powi(degree),
    }
}

fn lp2hp(zpk: Zpk, wo: f64) -> Zpk {
    let degree = zpk.p.len() - zpk.z.len();
    let k = zpk.k
        * (prod(&zpk.z.iter().map(|z| -z).collect::<Vec<_>>())
            / prod(&zpk.p.iter().map(|p| -p).collect::<Vec<_>>()))
        .re;
    let mut z: Vec<Complex64> = zpk.z.iter().map(|z| wo / z).collect();
    z.extend(std::iter::repeat_n(Complex64::new(0.0, 0.0), degree));
    Zpk {
        z,
        p: zpk.p.iter().map(|p| wo / p).collect(),
        k,
    }
}

fn lp2bp(zpk: Zpk, wo: f64, bw: f64) -> Zpk {
    let degree = zpk.p.len() - zpk.z.len();
    let split = |v: &[Complex64]| -> Vec<Complex64> {
        let lp: Vec<Complex64> = v.iter().map(|x| x * (bw / 2.0)).collect();
        let plus = lp.iter().map(|x| x + (x * x - wo * wo).sqrt());
        let minus = lp.iter().map(|x| x - (x * x - wo * wo).sqrt());
        plus.chain(minus).collect()
    };
    let mut z = split(&zpk.z);
    z.extend(std::iter::repeat_n(Complex64::new(0.0, 0.0), degree));
    Zpk {
        z,
        p: split(&zpk.p),
        k: zpk.k * bw.powi(degree as i32),
    }
}

fn bilinear(zpk: Zpk, fs: f64) -> Zpk {
    let degree = zpk.p.len() - zpk.z.len();
    let fs2 = 2.0 * fs;
    let mut z: Vec<Complex64> = zpk.z.iter().map(|z| (fs2 + z) / (fs2 - z)).collect();
    z.extend(std::iter::repeat_n(Complex64::new(-1.0, 0.0), degree));
    let k = zpk.k
        * (prod(&zpk.z.iter().map(|z| fs2 - z).collect::<Vec<_>>())
            / prod(&zpk.p.iter().map(|p| fs2 - p).collect::<Vec<_>>()))
        .re;
    Zpk {
        z,
        p: zpk.p.iter().map(|p| (fs2 + p) / (fs2 - p)).collect(),
        k,
    }
}

/// SciPy's `_cplxreal`: the complex values with positive imaginary part (one per
/// conjugate pair, averaged with its partner) followed by the real values, each sorted.
fn cplxreal(v: &[Complex64]) -> Vec<Complex64> {
    let tol = 100.0 * f64::EPSILON;
    let mut v = v.to_vec();
    v.sort_by(|a, b| {
        a.re.total_cmp(&b.re)
            .then(a.im.abs().total_cmp(&b.im.abs()))
    });
    let is_real = |x: &Complex64| x.im.abs() <= tol * x.norm();
    let real: Vec<Complex64> = v
        .iter()
        .filter(|x| is_real(x))
        .map(|x| Complex64::new(x.re, 0.0))
        .collect();
    let cplx: Vec<Complex64> = v.iter().filter(|x| !is_real(x)).copied().collect();
    let mut zp: Vec<Complex64> = cplx.iter().filter(|x| x.im > 0.0).copied().collect();
    let mut zn: Vec<Complex64> = cplx.iter().filter(|x| x.im < 0.0).copied().collect();
    // Runs of equal real part are ordered by |imag| (as SciPy does).
    let mut start = 0;
    while start < zp.len() {
        let mut stop = start + 1;
        while stop < zp.len() && zp[stop].re - zp[stop - 1].re <= tol * zp[stop - 1].norm() {
            stop += 1;
        }
        zp[start..stop].sort_by(|a, b| a.im.abs().total_cmp(&b.im.abs()));
        let end = stop.min(zn.len());
        zn[start..end].sort_by(|a, b| a.im.abs().total_cmp(&b.im.abs()));
        start = stop;
    }
    let mut out: Vec<Complex64> = zp
        .iter()
        .zip(&zn)
        .map(|(a, b)| (a + b.conj()) / 2.0)
        .collect();
    out.extend(real);
    out
}

fn is_real(x: &Complex64) -> bool {
    x.im == 0.0
}

#[derive(Clone, Copy, PartialEq)]
enum Which {
    Real,
    Complex,
    Any,
}

/// SciPy's `_nearest_real_complex_idx` (stable argsort by distance).
fn nearest(from: &[Complex64], to: Complex64, which: Which) -> usize {
    let mut order: Vec<usize> = (0..from.len()).collect();
    order.sort_by(|&a, &b| (from[a] - to).norm().total_cmp(&(from[b] - to).norm()));
    *order
        .iter()
        .find(|&&i| match which {
            Which::Any => true,
            Which::Real => is_real(&from[i]),
            Which::Complex => !is_real(&from[i]),
        })
        .expect("a matching root exists")
}

/// Coefficients of prod(x - r) for up to two roots, real part (conjugates cancel).
fn poly(roots: &[Complex64]) -> Vec<f64> {
    let mut c = vec![Complex64::new(1.0, 0.0)];
    for r in roots {
        let mut next = vec![Complex64::new(0.0, 0.0); c.len() + 1];
        for (i, ci) in c.iter().enumerate() {
            next[i] += ci;
            next[i + 1] -= ci * r;
        }
        c = next;
    }
    c.iter().map(|x| x.re).collect()
}

fn single_sos(z: &[Complex64], p: &[Complex64]) -> [f64; 6] {
    let b = poly(z);
    let a = poly(p);
    let mut sos = [0.0; 6];
    sos[3 - b.len()..3].copy_from_slice(&b);
    sos[6 - a.len()..6].copy_from_slice(&a);
    sos
}

/// SciPy's `zpk2sos` with `pairing="nearest"` for digital filters.
fn zpk2sos(zpk: Zpk) -> Result<Array2<f64>, DspError> {
    let Zpk { mut z, mut p, k } = zpk;
    let zero = Complex64::new(0.0, 0.0);
    while p.len() < z.len() {
        p.push(zero);
    }
    while z.len() < p.len() {
        z.push(zero);
    }
    let n_sections = p.len().div_ceil(2);
    if p.len() % 2 == 1 {
        p.push(zero);
        z.push(zero);
    }
    let mut z = cplxreal(&z);
    let mut p = cplxreal(&p);
    let worst = |v: &[Complex64]| -> usize {
        let mut best = 0;
        for (i, x) in v.iter().enumerate() {
            if (1.0 - x.norm()).abs() < (1.0 - v[best].norm()).abs() {
                best = i;
            }
        }
        best
    };
    let mut sos = Array2::<f64>::zeros((n_sections, 6));
    for si in (0..n_sections).rev() {
        let p1 = p.remove(worst(&p));
        let reals_left = p.iter().filter(|x| is_real(x)).count();
        let row = if is_real(&p1) && reals_left == 0 {
            let z1 = z.remove(nearest(&z, p1, Which::Real));
            single_sos(&[z1, zero], &[p1, zero])
        } else if p.len() + 1 == z.len()
            && !is_real(&p1)
            && reals_left == 1
            && z.iter().filter(|x| is_real(x)).count() == 1
        {
            let z1 = z.remove(nearest(&z, p1, Which::Complex));
            single_sos(&[z1, z1.conj()], &[p1, p1.conj()])
        } else {
            let p2 = if is_real(&p1) {
                let real_idx: Vec<usize> = (0..p.len()).filter(|&i| is_real(&p[i])).collect();
                let reals: Vec<Complex64> = real_idx.iter().map(|&i| p[i]).collect();
                p.remove(real_idx[worst(&reals)])
            } else {
                p1.conj()
            };
            if z.is_empty() {
                single_sos(&[], &[p1, p2])
            } else {
                let z1 = z.remove(nearest(&z, p1, Which::Any));
                if !is_real(&z1) {
                    single_sos(&[z1, z1.conj()], &[p1, p2])
                } else if !z.is_empty() {
                    let z2 = z.remove(nearest(&z, p1, Which::Real));
                    single_sos(&[z1, z2], &[p1, p2])
                } else {
                    single_sos(&[z1], &[p1, p2])
                }
            }
        };
        sos.row_mut(si).assign(&ndarray::ArrayView1::from(&row));
    }
    if !(p.is_empty() && z.is_empty()) {
        return Err(DspError::Param("internal: unpaired poles or zeros".into()));
    }
    for j in 0..3 {
        sos[[0, j]] *= k;
    }
    Ok(sos)
}

/// A cascade of second-order sections with its state, so a stream can be filtered frame
/// by frame with the same result as filtering it whole (`sosfilt` with zero initial
/// state, direct form II transposed).
#[derive(Debug, Clone)]
pub struct SosFilter {
    sos: Array2<f64>,
    state: Vec<[f64; 2]>,
}

impl SosFilter {
    pub fn new(sos: Array2<f64>) -> Self {
        let n = sos.nrows();
        SosFilter {
            sos,
            state: vec![[0.0; 2]; n],
        }
    }

    pub fn sos(&self) -> &Array2<f64> {
        &self.sos
    }

    pub fn reset(&mut self) {
        self.state.iter_mut().for_each(|s| *s = [0.0; 2]);
    }

    /// Filters `x` in place, continuing from the previous call.
    pub fn process(&mut self, x: &mut [f64]) {
        for (s, zi) in self.sos.rows().into_iter().zip(self.state.iter_mut()) {
            let (b0, b1, b2, a1, a2) = (s[0], s[1], s[2], s[4], s[5]);
            let (mut z0, mut z1) = (zi[0], zi[1]);
            for v in x.iter_mut() {
                let xin = *v;
                let y = b0 * xin + z0;
                z0 = b1 * xin - a1 * y + z1;
                z1 = b2 * xin - a2 * y;
                *v = y;
            }
            *zi = [z0, z1];
        }
    }
}

/// `scipy.signal.sosfilt(sos, x)` (zero initial state).
pub fn sosfilt(sos: &Array2<f64>, x: &[f64]) -> Vec<f64> {
    let mut y = x.to_vec();
    SosFilter::new(sos.clone()).process(&mut y);
    y
}

/// Order of the anti-alias filter of [`Decimator`].
pub const DECIMATE_ORDER: usize = 8;

/// Decimation by an integer factor `q`: an order-8 Butterworth low-pass at 80 % of the
/// new Nyquist frequency (`butter(8, 0.8 / q)` normalised, applied causally with
/// `sosfilt`), then every `q`-th sample starting with the first. Streams keep their
/// filter state and phase across calls.
#[derive(Debug, Clone)]
pub struct Decimator {
    q: usize,
    filter: SosFilter,
    /// Samples to skip before the next kept one.
    phase: usize,
}

impl Decimator {
    pub fn new(q: usize) -> Result<Self, DspError> {
        if !(2..=64).contains(&q) {
            return Err(DspError::Param(format!(
                "decimation factor {q} must be in 2..=64"
            )));
        }
        // Normalised design (fs = 2): cutoff 0.8 / q of the Nyquist frequency.
        let sos = butter(DECIMATE_ORDER, &[0.8 / q as f64], BandType::Lowpass, 2.0)?;
        Ok(Decimator {
            q,
            filter: SosFilter::new(sos),
            phase: 0,
        })
    }

    pub fn factor(&self) -> usize {
        self.q
    }

    /// Filters `x` and appends the kept samples to `out`. Returns the index in `x` of the
    /// first kept sample (to compute its timestamp), if any.
    pub fn process(&mut self, x: &mut [f64], out: &mut Vec<f64>) -> Option<usize> {
        self.filter.process(x);
        let first = (self.phase < x.len()).then_some(self.phase);
        let mut i = self.phase;
        while i < x.len() {
            out.push(x[i]);
            i += self.q;
        }
        self.phase = i - x.len();
        first
    }
}

/// One-shot decimation of a whole signal (see [`Decimator`]).
pub fn decimate(x: &[f64], q: usize) -> Result<Vec<f64>, DspError> {
    let mut d = Decimator::new(q)?;
    let mut buf = x.to_vec();
    let mut out = Vec::with_capacity(x.len() / q + 1);
    d.process(&mut buf, &mut out);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowpass_order_2_matches_closed_form() {
        // butter(2, 0.5) (normalised): b = [0.2929, 0.5858, 0.2929], a = [1, 0, 0.1716].
        let sos = butter(2, &[0.5], BandType::Lowpass, 2.0).unwrap();
        let r = sos.row(0);
        let expect = [
            0.29289321881345254,
            0.5857864376269051,
            0.29289321881345254,
            1.0,
            0.0,
            0.17157287525380996,
        ];
        for (a, b) in r.iter().zip(expect) {
            assert!((a - b).abs() < 1e-12, "{r:?}");
        }
    }

    #[test]
    fn streaming_equals_whole_signal() {
        let sos = butter(4, &[100.0, 400.0], BandType::Bandpass, 2000.0).unwrap();
        let x: Vec<f64> = (0..1000)
            .map(|i| ((i * 7919) % 101) as f64 - 50.0)
            .collect();
        let whole = sosfilt(&sos, &x);
        let mut f = SosFilter::new(sos);
        let mut parts = x.clone();
        for chunk in parts.chunks_mut(97) {
            f.process(chunk);
        }
        assert_eq!(whole, parts);

        let mut d = Decimator::new(3).unwrap();
        let mut out = Vec::new();
        let mut buf = x.clone();
        for chunk in buf.chunks_mut(100) {
            d.process(chunk, &mut out);
        }
        assert_eq!(out, decimate(&x, 3).unwrap());
    }

    #[test]
    fn bad_designs_are_rejected_with_reasons() {
        let e = butter(4, &[600.0], BandType::Lowpass, 1000.0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid parameter: cutoff 600 Hz must be between 0 and the Nyquist frequency 500 Hz"
        );
        assert!(butter(0, &[10.0], BandType::Lowpass, 1000.0).is_err());
        assert!(butter(4, &[10.0], BandType::Bandpass, 1000.0).is_err());
        assert!(butter(4, &[200.0, 100.0], BandType::Bandpass, 1000.0).is_err());
        assert!(Decimator::new(1).is_err());
    }
}
