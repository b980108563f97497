//! Plain tensors: [`TensorBuf`], a shape and its elements in their storage dtype ([`Storage`]:
//! `f32`, `f16` or `bf16`), and the dtypes that checkpoints store ([`DType`]). All merge
//! arithmetic runs on `f32` slices, a tensor or a chunk at a time (auto-vectorised loops, rayon);
//! results are stored back in the output dtype, so a bf16 candidate in memory takes what its
//! checkpoint takes on disk. Candle is used only for forward passes ([`TensorBuf::to_candle`]
//! hands over the storage dtype; the model casts to its compute dtype).

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

impl From<DType> for candle_core::DType {
    fn from(d: DType) -> Self {
        match d {
            DType::F32 => candle_core::DType::F32,
            DType::F16 => candle_core::DType::F16,
            DType::BF16 => candle_core::DType::BF16,
        }
    }
}

impl TryFrom<candle_core::DType> for DType {
    type Error = Error;

    /// Candle's float dtypes that checkpoints store; anything else is an error naming it.
    fn try_from(d: candle_core::DType) -> Result<Self> {
        match d {
            candle_core::DType::F32 => Ok(DType::F32),
            candle_core::DType::F16 => Ok(DType::F16),
            candle_core::DType::BF16 => Ok(DType::BF16),
            other => Err(Error::msg(format!(
                "candle dtype {other:?} is not a storage dtype (bf16, f16, f32)"
            ))),
        }
    }
}

/// A tensor's elements in their storage dtype. Values are converted to `f32` for math (a chunk
/// or a tensor at a time) and rounded back to nearest even, as PyTorch does.
#[derive(Clone, Debug, PartialEq)]
pub enum Storage {
    F32(Vec<f32>),
    F16(Vec<half::f16>),
    BF16(Vec<half::bf16>),
}

impl Storage {
    /// `n` zeros of `dtype`. Allocated zeroed (pages are only touched when written).
    pub fn zeros(dtype: DType, n: usize) -> Storage {
        use half::vec::HalfBitsVecExt;
        match dtype {
            DType::F32 => Storage::F32(vec![0f32; n]),
            DType::F16 => Storage::F16(vec![0u16; n].reinterpret_into()),
            DType::BF16 => Storage::BF16(vec![0u16; n].reinterpret_into()),
        }
    }

    /// `values` rounded to `dtype` (the vector is reused for `f32`).
    pub fn from_f32(values: Vec<f32>, dtype: DType) -> Storage {
        match dtype {
            DType::F32 => Storage::F32(values),
            DType::F16 => Storage::F16(values.iter().map(|&v| half::f16::from_f32(v)).collect()),
            DType::BF16 => Storage::BF16(values.iter().map(|&v| half::bf16::from_f32(v)).collect()),
        }
    }

    /// Elements from little-endian bytes of `dtype` (a safetensors payload). Fails when the
    /// byte count is not a multiple of the element size.
    pub fn from_le_bytes(dtype: DType, bytes: &[u8]) -> Result<Storage> {
        if !bytes.len().is_multiple_of(dtype.size()) {
            return Err(Error::msg(format!(
                "{} bytes are not a whole number of {dtype} elements",
                bytes.len()
            )));
        }
        let n = bytes.len() / dtype.size();
        Ok(match dtype {
            DType::F32 => {
                let mut out = vec![0f32; n];
                dtype.decode_into(bytes, &mut out);
                Storage::F32(out)
            }
            DType::F16 => Storage::F16(
                bytes
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            ),
            DType::BF16 => Storage::BF16(
                bytes
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            ),
        })
    }

    /// The storage dtype.
    pub fn dtype(&self) -> DType {
        match self {
            Storage::F32(_) => DType::F32,
            Storage::F16(_) => DType::F16,
            Storage::BF16(_) => DType::BF16,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Storage::F32(v) => v.len(),
            Storage::F16(v) => v.len(),
            Storage::BF16(v) => v.len(),
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decode elements `start .. start + out.len()` into `out`. Panics when out of bounds.
    pub fn read_range_into(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        match self {
            Storage::F32(v) => out.copy_from_slice(&v[start..end]),
            Storage::F16(v) => {
                use half::slice::HalfFloatSliceExt;
                v[start..end].convert_to_f32_slice(out);
            }
            Storage::BF16(v) => {
                for (o, b) in out.iter_mut().zip(&v[start..end]) {
                    *o = f32::from_bits(u32::from(b.to_bits()) << 16);
                }
            }
        }
    }

    /// Store `values` (rounded to the storage dtype) at elements `start ..`. Panics when out of
    /// bounds.
    pub fn write_range(&mut self, start: usize, values: &[f32]) {
        let end = start + values.len();
        match self {
            Storage::F32(v) => v[start..end].copy_from_slice(values),
            Storage::F16(v) => {
                for (d, &x) in v[start..end].iter_mut().zip(values) {
                    *d = half::f16::from_f32(x);
                }
            }
            Storage::BF16(v) => {
                for (d, &x) in v[start..end].iter_mut().zip(values) {
                    *d = half::bf16::from_f32(x);
                }
            }
        }
    }
}

/// A dense row-major tensor (without its name) in its storage dtype: `f32` for math results and
/// trained models, `bf16` / `f16` for merged candidates of half-precision checkpoints, so a
/// candidate in memory is the size of the checkpoint it stands for. Read values as `f32` with
/// [`TensorBuf::values`] (borrowed when already `f32`), [`TensorBuf::read_range_into`] (a
/// chunk), or [`TensorBuf::f32_mut`] (converts in place).
///
/// ```
/// use evomerge::tensor::{DType, TensorBuf};
/// let t = TensorBuf::from_f32(vec![2], vec![1.0, 0.1], DType::BF16);
/// assert_eq!(t.dtype(), DType::BF16);
/// assert_eq!(t.values()[1], 0.10009765625); // 0.1 rounded to bf16
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct TensorBuf {
    pub shape: Vec<usize>,
    storage: Storage,
}

impl TensorBuf {
    /// An `f32` tensor from a shape and its data. Panics if the lengths disagree (a programming
    /// error).
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        TensorBuf::from_storage(shape, Storage::F32(data))
    }

    /// A tensor of `values` rounded to `dtype` (nearest even). Panics if the lengths disagree.
    pub fn from_f32(shape: Vec<usize>, values: Vec<f32>, dtype: DType) -> Self {
        TensorBuf::from_storage(shape, Storage::from_f32(values, dtype))
    }

    /// A tensor of zeros of `dtype`.
    pub fn zeros(shape: Vec<usize>, dtype: DType) -> Self {
        let n = shape.iter().product();
        TensorBuf::from_storage(shape, Storage::zeros(dtype, n))
    }

    /// A tensor over `storage`. Panics if the shape and the element count disagree.
    pub fn from_storage(shape: Vec<usize>, storage: Storage) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            storage.len(),
            "TensorBuf shape {shape:?} does not match {} values",
            storage.len()
        );
        TensorBuf { shape, storage }
    }

    /// A tensor from little-endian bytes of `dtype` (a safetensors payload), kept in `dtype`.
    pub fn from_le_bytes(shape: Vec<usize>, dtype: DType, bytes: &[u8]) -> Result<Self> {
        let storage = Storage::from_le_bytes(dtype, bytes)?;
        if shape.iter().product::<usize>() != storage.len() {
            return Err(Error::msg(format!(
                "shape {shape:?} does not match {} {dtype} elements",
                storage.len()
            )));
        }
        Ok(TensorBuf { shape, storage })
    }

    /// The storage dtype.
    pub fn dtype(&self) -> DType {
        self.storage.dtype()
    }

    /// The elements in their storage dtype.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The elements in their storage dtype, by value.
    pub fn into_storage(self) -> Storage {
        self.storage
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.storage.len()
    }

    /// True when the tensor holds no elements.
    pub fn is_empty(&self) -> bool {
        self.storage.is_empty()
    }

    /// Bytes the elements take in memory.
    pub fn nbytes(&self) -> usize {
        self.len() * self.dtype().size()
    }

    /// The elements when stored as `f32`.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.storage {
            Storage::F32(v) => Some(v),
            _ => None,
        }
    }

    /// The elements as `f32`: borrowed when stored as `f32`, else decoded (one tensor's worth).
    pub fn values(&self) -> std::borrow::Cow<'_, [f32]> {
        match &self.storage {
            Storage::F32(v) => std::borrow::Cow::Borrowed(v),
            _ => std::borrow::Cow::Owned(self.to_f32_vec()),
        }
    }

    /// The elements decoded to a new `f32` vector.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.len()];
        self.storage.read_range_into(0, &mut out);
        out
    }

    /// The elements as an `f32` vector (no copy when stored as `f32`).
    pub fn into_f32_vec(self) -> Vec<f32> {
        match self.storage {
            Storage::F32(v) => v,
            _ => self.to_f32_vec(),
        }
    }

    /// Mutable `f32` elements; a half-precision tensor is converted to `f32` storage first (its
    /// dtype becomes `F32`).
    pub fn f32_mut(&mut self) -> &mut [f32] {
        if !matches!(self.storage, Storage::F32(_)) {
            self.storage = Storage::F32(self.to_f32_vec());
        }
        match &mut self.storage {
            Storage::F32(v) => v,
            _ => unreachable!("converted to f32 above"),
        }
    }

    /// This tensor in `dtype` (a copy; rounded to nearest even when narrowing).
    pub fn to_dtype(&self, dtype: DType) -> TensorBuf {
        if dtype == self.dtype() {
            return self.clone();
        }
        TensorBuf::from_f32(self.shape.clone(), self.to_f32_vec(), dtype)
    }

    /// This tensor converted to `dtype` (no copy when it already is).
    pub fn into_dtype(self, dtype: DType) -> TensorBuf {
        if dtype == self.dtype() {
            return self;
        }
        TensorBuf::from_f32(self.shape.clone(), self.to_f32_vec(), dtype)
    }

    /// Decode elements `start .. start + out.len()` (flattened) into `out`. Panics when out of
    /// bounds.
    pub fn read_range_into(&self, start: usize, out: &mut [f32]) {
        self.storage.read_range_into(start, out);
    }

    /// Store `values` (rounded to the storage dtype) at elements `start ..` (flattened). Panics
    /// when out of bounds.
    pub fn write_range(&mut self, start: usize, values: &[f32]) {
        self.storage.write_range(start, values);
    }

    /// Convert to a candle tensor of the storage dtype on `device`.
    pub fn to_candle(&self, device: &candle_core::Device) -> Result<candle_core::Tensor> {
        let shape = self.shape.as_slice();
        Ok(match &self.storage {
            Storage::F32(v) => candle_core::Tensor::from_slice(v, shape, device)?,
            Storage::F16(v) => candle_core::Tensor::from_slice(v, shape, device)?,
            Storage::BF16(v) => candle_core::Tensor::from_slice(v, shape, device)?,
        })
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
    fn half_storage_rounds_to_nearest_even_and_reads_back() {
        // 1 + 2^-8 lies halfway between bf16 neighbours 1 and 1 + 2^-7: ties go to the even one.
        let values = vec![1.0, 1.0 + 2f32.powi(-8), -3.5, 0.1];
        let t = TensorBuf::from_f32(vec![2, 2], values.clone(), DType::BF16);
        assert_eq!(t.dtype(), DType::BF16);
        assert_eq!(t.nbytes(), 8);
        assert_eq!(t.as_f32(), None);
        let (bf_tenth, f16_tenth) = (
            half::bf16::from_f32(0.1).to_f32(),
            half::f16::from_f32(0.1).to_f32(),
        );
        assert_eq!(bf_tenth, f32::from_bits(0x3dcd_0000));
        assert_eq!(*t.values(), [1.0, 1.0, -3.5, bf_tenth]);
        let h = TensorBuf::from_f32(vec![4], values, DType::F16);
        assert_eq!(*h.values(), [1.0, 1.0 + 2f32.powi(-8), -3.5, f16_tenth]);
        // the same rounding as the on-disk codec
        let mut bytes = vec![0u8; 8];
        DType::BF16.encode_into(&[1.0, 1.0 + 2f32.powi(-8), -3.5, 0.1], &mut bytes);
        let from_bytes = TensorBuf::from_le_bytes(vec![2, 2], DType::BF16, &bytes).unwrap();
        assert_eq!(from_bytes, t);
        assert!(TensorBuf::from_le_bytes(vec![3], DType::BF16, &bytes).is_err());
    }

    #[test]
    fn ranges_write_and_read_in_the_storage_dtype() {
        let mut t = TensorBuf::zeros(vec![5], DType::BF16);
        t.write_range(1, &[2.0, 0.1]);
        let mut out = [9.0f32; 3];
        t.read_range_into(0, &mut out);
        let bf_tenth = half::bf16::from_f32(0.1).to_f32();
        assert_eq!(out, [0.0, 2.0, bf_tenth]);
        assert_eq!(t.to_f32_vec(), vec![0.0, 2.0, bf_tenth, 0.0, 0.0]);
        // f32_mut converts to f32 storage
        t.f32_mut()[4] = 0.1;
        assert_eq!(t.dtype(), DType::F32);
        assert_eq!(t.as_f32().unwrap()[4], 0.1);
        assert_eq!(t.to_dtype(DType::F16).dtype(), DType::F16);
        assert_eq!(t.clone().into_dtype(DType::F32), t);
    }

    #[test]
    fn to_candle_keeps_the_storage_dtype() {
        let dev = candle_core::Device::Cpu;
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let t = TensorBuf::from_f32(vec![2, 3], vec![0.5, -1.0, 2.0, 0.0, 4.0, -0.25], dt);
            let c = t.to_candle(&dev).unwrap();
            assert_eq!(c.dtype(), candle_core::DType::from(dt));
            assert_eq!(c.dims(), &[2, 3]);
            let back: Vec<f32> = c
                .to_dtype(candle_core::DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(back, t.to_f32_vec());
            assert_eq!(DType::try_from(c.dtype()).unwrap(), dt);
        }
        assert!(DType::try_from(candle_core::DType::U32).is_err());
    }

    #[test]
    fn dtype_names_parse() {
        assert_eq!("bfloat16".parse::<DType>().unwrap(), DType::BF16);
        assert_eq!("F16".parse::<DType>().unwrap(), DType::F16);
        assert!("int8".parse::<DType>().is_err());
    }
}
