//! Fast conversions between stored bytes (little-endian F32 / F16 / BF16) and `f32` values.
//!
//! Same results as [`DType::decode_into`] / [`DType::encode_into`] (round to nearest even), but
//! over aligned slices so the loops vectorise (with AVX2 where the CPU has it, see
//! [`crate::simd`]); unaligned input falls back to the byte-wise path.

use half::slice::HalfFloatSliceExt;

use crate::simd::avx2_fn;
use crate::tensor::DType;

avx2_fn!(pub(crate) fn decode(dtype: DType, bytes: &[u8], out: &mut [f32]) => decode_body);
avx2_fn!(pub(crate) fn encode(dtype: DType, values: &[f32], out: &mut [u8]) => encode_body);

/// Decode `bytes` (of `dtype`, little-endian) into `out`; `bytes.len() == out.len() * dtype.size()`.
#[inline(always)]
fn decode_body(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    debug_assert_eq!(bytes.len(), out.len() * dtype.size());
    if cfg!(target_endian = "little") {
        match dtype {
            DType::F32 => {
                if let Ok(src) = bytemuck::try_cast_slice::<u8, f32>(bytes) {
                    out.copy_from_slice(src);
                    return;
                }
            }
            DType::BF16 => {
                if let Ok(src) = bytemuck::try_cast_slice::<u8, u16>(bytes) {
                    for (o, &b) in out.iter_mut().zip(src) {
                        *o = f32::from_bits((b as u32) << 16);
                    }
                    return;
                }
            }
            DType::F16 => {
                if let Ok(src) = bytemuck::try_cast_slice::<u8, half::f16>(bytes) {
                    src.convert_to_f32_slice(out);
                    return;
                }
            }
        }
    }
    dtype.decode_into(bytes, out);
}

/// Round one `f32` to bf16 bits, nearest even; NaN stays NaN (quiet).
#[inline(always)]
fn bf16_bits(v: f32) -> u16 {
    let x = v.to_bits();
    if x & 0x7fff_ffff > 0x7f80_0000 {
        ((x >> 16) as u16) | 0x0040
    } else {
        ((x + 0x7fff + ((x >> 16) & 1)) >> 16) as u16
    }
}

/// Encode `values` as `dtype` into `out`; `out.len() == values.len() * dtype.size()`.
#[inline(always)]
fn encode_body(dtype: DType, values: &[f32], out: &mut [u8]) {
    debug_assert_eq!(out.len(), values.len() * dtype.size());
    if cfg!(target_endian = "little") {
        match dtype {
            DType::F32 => {
                out.copy_from_slice(bytemuck::cast_slice(values));
                return;
            }
            DType::BF16 => {
                if let Ok(dst) = bytemuck::try_cast_slice_mut::<u8, u16>(out) {
                    for (d, &v) in dst.iter_mut().zip(values) {
                        *d = bf16_bits(v);
                    }
                    return;
                }
            }
            DType::F16 => {
                if let Ok(dst) = bytemuck::try_cast_slice_mut::<u8, half::f16>(out) {
                    dst.convert_from_f32_slice(values);
                    return;
                }
            }
        }
    }
    dtype.encode_into(values, out);
}

/// Encode `values` as `dtype` into a new byte vector whose storage is 8-byte aligned, so the
/// fast paths above apply.
pub(crate) fn encode_vec(dtype: DType, values: &[f32]) -> AlignedBytes {
    let len = values.len() * dtype.size();
    let mut buf = AlignedBytes::zeroed(len);
    encode(dtype, values, buf.as_mut_slice());
    buf
}

/// A byte buffer backed by `u64`s (8-byte aligned).
pub(crate) struct AlignedBytes {
    words: Vec<u64>,
    len: usize,
}

impl AlignedBytes {
    fn zeroed(len: usize) -> Self {
        AlignedBytes {
            words: vec![0u64; len.div_ceil(8)],
            len,
        }
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.words)[..self.len]
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut(&mut self.words)[..self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<f32> {
        let mut v = vec![
            0.0,
            -0.0,
            1.0,
            -1.5,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-40,
            65504.0,
            65520.0,
            1.0 + 1.0 / 256.0, // exactly halfway between two bf16 values: ties to even (1.0)
            1.0 + 3.0 / 256.0, // halfway: ties to even (1.0 + 4/256)
        ];
        let mut x = 0x1234_5678u32;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            v.push(f32::from_bits(x));
        }
        v
    }

    #[test]
    fn fast_paths_match_the_reference_conversions() {
        let values = samples();
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let fast = encode_vec(dt, &values);
            let mut slow = vec![0u8; values.len() * dt.size()];
            dt.encode_into(&values, &mut slow);
            // NaN payloads may differ; compare decoded values with NaN == NaN.
            let mut a = vec![0f32; values.len()];
            let mut b = vec![0f32; values.len()];
            decode(dt, fast.as_slice(), &mut a);
            dt.decode_into(&slow, &mut b);
            for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                assert!(
                    x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()),
                    "{dt} value {i} ({}): {x} vs {y}",
                    values[i]
                );
            }
        }
    }

    /// The AVX2 builds (picked at run time where the CPU has it) give the portable builds' bits.
    #[test]
    fn dispatched_codecs_equal_the_portable_bodies() {
        let values = samples();
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let mut fast = vec![0u8; values.len() * dt.size()];
            let mut plain = fast.clone();
            encode(dt, &values, &mut fast);
            encode_body(dt, &values, &mut plain);
            assert_eq!(fast, plain, "{dt} encode");
            let (mut a, mut b) = (vec![0f32; values.len()], vec![0f32; values.len()]);
            decode(dt, &fast, &mut a);
            decode_body(dt, &fast, &mut b);
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{dt} decode"
            );
        }
    }

    #[test]
    fn bf16_rounds_half_to_even() {
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(bf16_bits(1.0 + 1.5 / 256.0), 0x3f81);
    }

    #[test]
    fn unaligned_input_uses_the_fallback() {
        let values = [1.0f32, -2.0, 0.5];
        let mut bytes = [0u8; 13];
        DType::F32.encode_into(&values, &mut bytes[1..]);
        let mut out = [0f32; 3];
        decode(DType::F32, &bytes[1..], &mut out);
        assert_eq!(out, values);
    }
}
