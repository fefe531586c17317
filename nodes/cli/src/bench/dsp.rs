//! `bench dsp`: the signal operators and the frame codec on one core.

use std::time::Instant;

use serde::Serialize;

use super::rig::*;
use super::BenchArgs;

#[derive(Debug, Serialize)]
pub(crate) struct DspReport {
    pub(crate) machine: String,
    pub(crate) fft_1024_samples_per_s: f64,
    pub(crate) psd_1024_samples_per_s: f64,
    pub(crate) psd_ratio_to_fft: f64,
    pub(crate) envelope_10000_samples_per_s: f64,
    pub(crate) sosfilt_order8_samples_per_s: f64,
    pub(crate) codec_ratio: f64,
    pub(crate) codec_bytes_per_sample: f64,
    pub(crate) codec_encode_mb_per_s: f64,
    pub(crate) codec_decode_mb_per_s: f64,
    /// The same vibration re-digitised to use the full 16-bit range (harder to pack).
    pub(crate) codec_full_scale_ratio: f64,
    pub(crate) codec_full_scale_encode_mb_per_s: f64,
}

/// Calls `f` (which processes `samples` samples) for at least `secs`; samples/s.
fn rate(secs: f64, samples: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up: plans, buffers
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        f();
        n += 1;
    }
    n as f64 * samples as f64 / start.elapsed().as_secs_f64()
}

pub(super) fn bench_dsp(args: &BenchArgs) -> anyhow::Result<DspReport> {
    use rustfft::num_complex::Complex64;
    use twinmesh_twins::dsp::{self, codec, BandType, Spectral};
    let secs = (args.seconds / 6.0).clamp(0.5, 10.0);
    // One minute of simulated 10 kHz bearing vibration, on its 16-bit grid.
    let id: twinmesh_twins::TwinId = "bench/wt-01".parse()?;
    let mut device = twinmesh_sim::SimDevice::new(id, twinmesh_twins::AssetKind::WindTurbine, 1);
    let spec = twinmesh_twins::AssetKind::WindTurbine
        .schema()
        .signal("bearing_vibration")?;
    let x: Vec<f64> = twinmesh_sim::generate(
        &mut device,
        &["bearing_vibration"],
        spec.rate_hz,
        1_767_225_600_000_000_000,
        600_000,
    )
    .into_iter()
    .map(|r| r[0])
    .collect();

    let fft = rustfft::FftPlanner::<f64>::new().plan_fft_forward(1024);
    let mut buf: Vec<Complex64> = x[..1024].iter().map(|&v| Complex64::new(v, 0.0)).collect();
    let mut scratch = vec![Complex64::default(); fft.get_inplace_scratch_len()];
    let fft_rate = rate(secs, 1024, || {
        fft.process_with_scratch(&mut buf, &mut scratch)
    });

    let mut sp = Spectral::new();
    let window = &x[..65_536];
    let mut psd = Vec::new();
    let psd_rate = rate(secs, window.len(), || {
        sp.welch_into(window, 10_000.0, 1024, &mut psd)
            .expect("psd");
    });
    let mut env = Vec::new();
    let env_rate = rate(secs, 10_000, || {
        sp.envelope_into(&x[..10_000], &mut env).expect("envelope")
    });
    let sos = dsp::butter(8, &[2000.0, 4000.0], BandType::Bandpass, 10_000.0)?;
    let mut filter = dsp::SosFilter::new(sos);
    let mut block = x[..65_536].to_vec();
    let filt_rate = rate(secs, block.len(), || filter.process(&mut block));

    let frames: Vec<&[f64]> = x.chunks(1024).collect();
    let mut packed = Vec::with_capacity(16 * 1024);
    let mut total = 0usize;
    for f in &frames {
        packed.clear();
        codec::encode(f, spec.resolution, &mut packed);
        total += packed.len();
    }
    let raw = x.len() * 8;
    let enc_rate = rate(secs, x.len(), || {
        for f in &frames {
            packed.clear();
            codec::encode(f, spec.resolution, &mut packed);
        }
    });
    let encoded: Vec<Vec<u8>> = frames
        .iter()
        .map(|f| {
            let mut p = Vec::new();
            codec::encode(f, spec.resolution, &mut p);
            p
        })
        .collect();
    let mut out = Vec::with_capacity(1024);
    let dec_rate = rate(secs, x.len(), || {
        for e in &encoded {
            out.clear();
            codec::decode(e, &mut out).expect("decode");
        }
    });
    // Full scale: the largest sample at ±32767 counts.
    let peak = x.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let fs_scale = peak / 32767.0;
    let full: Vec<f64> = x.iter().map(|&v| codec::quantize(v, fs_scale)).collect();
    let full_frames: Vec<&[f64]> = full.chunks(1024).collect();
    let mut full_total = 0usize;
    for f in &full_frames {
        packed.clear();
        codec::encode(f, fs_scale, &mut packed);
        full_total += packed.len();
    }
    let full_enc_rate = rate(secs, full.len(), || {
        for f in &full_frames {
            packed.clear();
            codec::encode(f, fs_scale, &mut packed);
        }
    });
    Ok(DspReport {
        machine: machine(),
        codec_full_scale_ratio: raw as f64 / full_total as f64,
        codec_full_scale_encode_mb_per_s: full_enc_rate * 8.0 / 1e6,
        fft_1024_samples_per_s: fft_rate,
        psd_1024_samples_per_s: psd_rate,
        psd_ratio_to_fft: psd_rate / fft_rate,
        envelope_10000_samples_per_s: env_rate,
        sosfilt_order8_samples_per_s: filt_rate,
        codec_ratio: raw as f64 / total as f64,
        codec_bytes_per_sample: total as f64 / x.len() as f64,
        codec_encode_mb_per_s: enc_rate * 8.0 / 1e6,
        codec_decode_mb_per_s: dec_rate * 8.0 / 1e6,
    })
}
