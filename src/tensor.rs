//! Plain tensors for merge math: an `f32` buffer with a shape and a name, and the dtypes that
//! checkpoints store. All merge arithmetic runs on `f32` slices (auto-vectorised loops, rayon);
//! candle is used only for forward passes.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// A storage dtype of a checkpoint tensor. Math always runs in `f32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The name safetensors headers use (`F32`, `F16`, `BF16`).
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        }
    }

    /// The name config.json's `torch_dtype` uses (`float32`, `float16`, `bfloat16`).
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
        }
    }

    /// Decode little-endian bytes of this dtype into `out` (which must have the right length).
    pub fn decode_into(self, bytes: &[u8], out: &mut [f32]) {
        debug_assert_eq!(bytes.len(), out.len() * self.size());
        match self {
            DType::F32 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            DType::F16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            DType::BF16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
        }
    }

    /// Encode `values` as little-endian bytes of this dtype into `out` (right length required).
    /// Rounds to nearest even, as PyTorch does.
    pub fn encode_into(self, values: &[f32], out: &mut [u8]) {
        debug_assert_eq!(out.len(), values.len() * self.size());
        match self {
            DType::F32 => {
                for (v, c) in values.iter().zip(out.chunks_exact_mut(4)) {
                    c.copy_from_slice(&v.to_le_bytes());
                }
            }
            DType::F16 => {
                for (v, c) in values.iter().zip(out.chunks_exact_mut(2)) {
                    c.copy_from_slice(&half::f16::from_f32(*v).to_le_bytes());
                }
            }
            DType::BF16 => {
                for (v, c) in values.iter().zip(out.chunks_exact_mut(2)) {
                    c.copy_from_slice(&half::bf16::from_f32(*v).to_le_bytes());
                }
            }
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        })
    }
}

impl FromStr for DType {
    type Err = Error;

    /// Accepts our names (`bf16`), torch names (`bfloat16`) and safetensors names (`BF16`).
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "float" => Ok(DType::F32),
            "f16" | "float16" | "half" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            other => Err(Error::msg(format!(
                "unknown dtype `{other}` (expected one of bf16, f16, f32)"
            ))),
        }
    }
}

/// A named-less dense tensor in `f32`, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorBuf {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl TensorBuf {
    /// A tensor from a shape and its data. Panics if the lengths disagree (a programming error).
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "TensorBuf shape {shape:?} does not match {} values",
            data.len()
        );
        TensorBuf { shape, data }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// True when the tensor holds no elements.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Convert to a candle tensor on `device`.
    pub fn to_candle(&self, device: &candle_core::Device) -> Result<candle_core::Tensor> {
        Ok(candle_core::Tensor::from_slice(
            &self.data,
            self.shape.as_slice(),
            device,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_round_trip_is_exact_for_representable_values() {
        let values = [0.0f32, 1.0, -2.5, 0.15625, 65504.0];
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let mut bytes = vec![0u8; values.len() * dt.size()];
            dt.encode_into(&values, &mut bytes);
            let mut back = vec![0f32; values.len()];
            dt.decode_into(&bytes, &mut back);
            if dt == DType::BF16 {
                // 65504 is not representable in bf16: it rounds to 65536.
                assert_eq!(&back[..4], &values[..4]);
                assert_eq!(back[4], 65536.0);
            } else {
                assert_eq!(back, values);
            }
        }
    }

    #[test]
    fn dtype_names_parse() {
        assert_eq!("bfloat16".parse::<DType>().unwrap(), DType::BF16);
        assert_eq!("F16".parse::<DType>().unwrap(), DType::F16);
        assert!("int8".parse::<DType>().is_err());
    }
}
