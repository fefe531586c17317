//! Lossless frame codec for sensor data quantised by an ADC (values = integer counts ×
//! scale): counts are delta-coded, zig-zag mapped and bit-packed in blocks of 128 with
//! one bit width per block. Frames that are not exactly counts × scale fall back to raw
//! little-endian f64, so decoding always returns the original bits.
//!
//! Layout: `0x01` + raw f64 LE, or `0x02` + varint n + f64 scale + zig-zag varint of the
//! first count + blocks of (`width: u8`, `ceil(len × width / 8)` bytes, LSB first).

use super::DspError;

const RAW: u8 = 0x01;
const PACKED: u8 = 0x02;
const BLOCK: usize = 128;

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(buf: &[u8], pos: &mut usize) -> Result<u64, DspError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf
            .get(*pos)
            .ok_or_else(|| DspError::Input("truncated frame".into()))?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(DspError::Input("varint too long".into()))
}

/// Integer counts of `x` at `scale`, if every sample is exactly `count × scale`.
fn quantise(x: &[f64], scale: f64, counts: &mut Vec<i64>) -> bool {
    if !(scale.is_finite() && scale > 0.0) {
        return false;
    }
    counts.clear();
    counts.reserve(x.len());
    let inv = 1.0 / scale;
    for &v in x {
        let c = (v * inv).round();
        if c.is_nan() || c.abs() >= 9.0e15 || c * scale != v {
            // Bit-exact or nothing (also rejects -0.0 vs 0.0 mismatches).
            return false;
        }
        if c == 0.0 && v.is_sign_negative() {
            return false;
        }
        counts.push(c as i64);
    }
    true
}

/// The value an ADC with resolution `scale` reports for `v` (`+0.0` for a zero count,
/// never `-0.0`), so frames of such values always pack.
pub fn quantize(v: f64, scale: f64) -> f64 {
    ((v / scale).round() + 0.0) * scale
}

/// Encodes `x` (quantised at `scale` when possible, raw otherwise), appending to `out`.
pub fn encode(x: &[f64], scale: f64, out: &mut Vec<u8>) {
    let mut counts = Vec::new();
    if x.is_empty() || !quantise(x, scale, &mut counts) {
        out.reserve(1 + 8 * x.len());
        out.push(RAW);
        for v in x {
            out.extend_from_slice(&v.to_le_bytes());
        }
        return;
    }
    out.push(PACKED);
    put_varint(out, x.len() as u64);
    out.extend_from_slice(&scale.to_le_bytes());
    put_varint(out, zigzag(counts[0]));
    let mut zz = [0u64; BLOCK];
    let mut prev = counts[0];
    for block in counts[1..].chunks(BLOCK) {
        let mut or = 0u64;
        for (slot, &c) in zz.iter_mut().zip(block) {
            *slot = zigzag(c.wrapping_sub(prev));
            prev = c;
            or |= *slot;
        }
        let width = 64 - or.leading_zeros();
        out.push(width as u8);
        if width == 0 {
            continue;
        }
        let mut acc: u128 = 0;
        let mut bits = 0u32;
        for &v in &zz[..block.len()] {
            acc |= u128::from(v) << bits;
            bits += width;
            while bits >= 8 {
                out.push(acc as u8);
                acc >>= 8;
                bits -= 8;
            }
        }
        if bits > 0 {
            out.push(acc as u8);
        }
    }
}

/// How many samples an encoded frame holds, from its header alone (`None`: malformed).
pub fn sample_count(buf: &[u8]) -> Option<usize> {
    let (&mode, rest) = buf.split_first()?;
    match mode {
        RAW => Some(rest.len() / 8),
        PACKED => {
            let mut pos = 1;
            usize::try_from(get_varint(buf, &mut pos).ok()?).ok()
        }
        _ => None,
    }
}

/// [`decode`], refusing a frame of more than `max_samples` samples before it allocates.
pub fn decode_at_most(buf: &[u8], out: &mut Vec<f64>, max_samples: usize) -> Result<(), DspError> {
    match sample_count(buf) {
        Some(n) if n > max_samples => Err(DspError::Input(format!(
            "frame claims {n} samples, more than {max_samples}"
        ))),
        _ => decode(buf, out),
    }
}

/// Decodes a frame made by [`encode`], appending the samples to `out`.
pub fn decode(buf: &[u8], out: &mut Vec<f64>) -> Result<(), DspError> {
    let (&mode, rest) = buf
        .split_first()
        .ok_or_else(|| DspError::Input("empty frame".into()))?;
    match mode {
        RAW => {
            if !rest.len().is_multiple_of(8) {
                return Err(DspError::Input(
                    "raw frame length is not a multiple of 8".into(),
                ));
            }
            out.extend(
                rest.chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes"))),
            );
            Ok(())
        }
        PACKED => {
            let mut pos = 1;
            let n = get_varint(buf, &mut pos)? as usize;
            if n > 1 << 28 {
                return Err(DspError::Input(format!("frame claims {n} samples")));
            }
            let scale_bytes = buf
                .get(pos..pos + 8)
                .ok_or_else(|| DspError::Input("truncated frame".into()))?;
            let scale = f64::from_le_bytes(scale_bytes.try_into().expect("8 bytes"));
            pos += 8;
            let mut prev = unzigzag(get_varint(buf, &mut pos)?);
            out.reserve(n);
            out.push(prev as f64 * scale);
            let mut left = n.saturating_sub(1);
            while left > 0 {
                let len = left.min(BLOCK);
                let width = u32::from(
                    *buf.get(pos)
                        .ok_or_else(|| DspError::Input("truncated frame".into()))?,
                );
                pos += 1;
                if width > 64 {
                    return Err(DspError::Input(format!("bit width {width} out of range")));
                }
                let bytes = (len * width as usize).div_ceil(8);
                let data = buf
                    .get(pos..pos + bytes)
                    .ok_or_else(|| DspError::Input("truncated frame".into()))?;
                pos += bytes;
                let mask: u128 = if width == 64 {
                    u128::from(u64::MAX)
                } else {
                    (1u128 << width) - 1
                };
                let mut acc: u128 = 0;
                let mut bits = 0u32;
                let mut it = data.iter();
                for _ in 0..len {
                    while bits < width {
                        acc |= u128::from(*it.next().unwrap_or(&0)) << bits;
                        bits += 8;
                    }
                    let v = (acc & mask) as u64;
                    acc >>= width;
                    bits -= width;
                    prev = prev.wrapping_add(unzigzag(v));
                    out.push(prev as f64 * scale);
                }
                left -= len;
            }
            if pos != buf.len() {
                return Err(DspError::Input("trailing bytes after frame".into()));
            }
            Ok(())
        }
        other => Err(DspError::Input(format!(
            "unknown frame encoding 0x{other:02x}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(x: &[f64], scale: f64) -> Vec<u8> {
        let mut enc = Vec::new();
        encode(x, scale, &mut enc);
        let mut dec = Vec::new();
        decode(&enc, &mut dec).unwrap();
        assert_eq!(dec.len(), x.len());
        for (a, b) in x.iter().zip(&dec) {
            assert_eq!(a.to_bits(), b.to_bits());
        }
        enc
    }

    #[test]
    fn sixteen_bit_vibration_compresses_well() {
        let scale = 20.0 / 32768.0;
        let x: Vec<f64> = (0..1024)
            .map(|i| {
                let t = i as f64 / 10_000.0;
                let v = 3.0 * (std::f64::consts::TAU * 25.0 * t).sin()
                    + 0.7 * (std::f64::consts::TAU * 2800.0 * t).sin();
                quantize(v, scale)
            })
            .collect();
        let enc = roundtrip(&x, scale);
        let ratio = (x.len() * 8) as f64 / enc.len() as f64;
        assert!(ratio > 3.0, "ratio {ratio}");
    }

    #[test]
    fn unquantised_data_falls_back_to_raw() {
        let x = [0.1, 0.2, std::f64::consts::PI];
        let enc = roundtrip(&x, 0.001);
        assert_eq!(enc[0], RAW);
        roundtrip(&[], 1.0);
        roundtrip(&[-0.0, 0.0], 1.0);
        roundtrip(&[f64::NAN], 1.0);
    }

    #[test]
    fn corrupt_frames_are_errors() {
        let mut enc = Vec::new();
        encode(&[1.0, 2.0, 3.0], 1.0, &mut enc);
        let mut out = Vec::new();
        assert!(decode(&enc[..enc.len() - 1], &mut out).is_err());
        assert!(decode(&[0x07], &mut out).is_err());
        assert!(decode(&[], &mut out).is_err());
        assert!(decode(&[RAW, 1, 2], &mut out).is_err());
    }

    proptest! {
        #[test]
        fn any_counts_round_trip(counts in prop::collection::vec(-40_000i64..40_000, 0..600), shift in 0u32..20) {
            let scale = 1.0 / f64::from(1u32 << shift);
            let x: Vec<f64> = counts.iter().map(|&c| c as f64 * scale).collect();
            roundtrip(&x, scale);
        }

        #[test]
        fn extreme_counts_round_trip(counts in prop::collection::vec(-(1i64 << 52)..(1i64 << 52), 1..300)) {
            let x: Vec<f64> = counts.iter().map(|&c| c as f64).collect();
            roundtrip(&x, 1.0);
        }

        #[test]
        fn any_floats_round_trip(x in prop::collection::vec(any::<f64>(), 0..100), scale in 1e-6f64..10.0) {
            roundtrip(&x, scale);
        }
    }
}
