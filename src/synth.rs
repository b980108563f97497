//! Seeded synthetic Llama families for tests and benchmarks: a base model and fine-tunes that
//! are the base plus a small delta, with some entries moved much more (so TIES sign election
//! and DARE/magnitude sparsification have something to choose).
//!
//! Every value is a pure function of (seed, model, tensor name, element chunk), so output is
//! identical whatever the thread count, generation runs in parallel (rayon over chunks, a fast
//! xoshiro RNG), and models are streamed tensor by tensor through [`ModelWriter`] — never
//! whole in memory. [`mem_family`] builds the same values in memory (rounded through the spec's
//! dtype, so they equal what [`write_family`] stores).
//!
//! ```no_run
//! use evomerge::synth::{write_family, LlamaSpec};
//! let dirs = write_family("/tmp/family".as_ref(), &LlamaSpec::tiny(), 2, 42)?;
//! assert_eq!(dirs.len(), 3); // base, ft1, ft2
//! # Ok::<(), evomerge::Error>(())
//! ```

use std::path::{Path, PathBuf};

use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};
use rayon::prelude::*;
use serde_json::{Value, json};

use crate::candidate::MemModel;
use crate::error::{Error, Result};
use crate::store::{ModelWriter, TensorInfo, WriteConfig};
use crate::tensor::{DType, TensorBuf};

/// Shape and storage of a synthetic Llama model.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaSpec {
    pub hidden: usize,
    pub layers: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub dtype: DType,
    pub tie_embeddings: bool,
}

impl LlamaSpec {
    /// A test-sized model: hidden 16, 2 layers, intermediate 32, vocab 32, 4 heads (2 kv), f32.
    pub fn tiny() -> Self {
        LlamaSpec {
            hidden: 16,
            layers: 2,
            intermediate: 32,
            vocab: 32,
            heads: 4,
            kv_heads: 2,
            dtype: DType::F32,
            tie_embeddings: false,
        }
    }

    /// The benchmark model of issue 2: ~0.48 B parameters in bf16 (hidden 2048, 8 layers,
    /// intermediate 5632, vocab 32000, 32 heads with 4 kv heads — TinyLlama's shapes).
    pub fn bench() -> Self {
        LlamaSpec {
            hidden: 2048,
            layers: 8,
            intermediate: 5632,
            vocab: 32000,
            heads: 32,
            kv_heads: 4,
            dtype: DType::BF16,
            tie_embeddings: false,
        }
    }

    fn head_dim(&self) -> usize {
        self.hidden / self.heads.max(1)
    }

    fn check(&self) -> Result<()> {
        let ok = self.hidden > 0
            && self.layers > 0
            && self.intermediate > 0
            && self.vocab > 0
            && self.heads > 0
            && self.kv_heads > 0
            && self.hidden.is_multiple_of(self.heads)
            && self.heads.is_multiple_of(self.kv_heads);
        if ok {
            Ok(())
        } else {
            Err(Error::msg(format!(
                "invalid synthetic Llama spec {self:?}: sizes must be positive, hidden divisible \
                 by heads, heads by kv_heads"
            )))
        }
    }

    /// Every tensor with its Hugging Face name, shape and the spec's dtype, sorted by name.
    pub fn tensor_infos(&self) -> Vec<TensorInfo> {
        let (h, i, v) = (self.hidden, self.intermediate, self.vocab);
        let q = self.heads * self.head_dim();
        let kv = self.kv_heads * self.head_dim();
        let mut out: Vec<(String, Vec<usize>)> = vec![
            ("model.embed_tokens.weight".into(), vec![v, h]),
            ("model.norm.weight".into(), vec![h]),
        ];
        if !self.tie_embeddings {
            out.push(("lm_head.weight".into(), vec![v, h]));
        }
        for l in 0..self.layers {
            let p = format!("model.layers.{l}.");
            for (suffix, shape) in [
                ("input_layernorm.weight", vec![h]),
                ("post_attention_layernorm.weight", vec![h]),
                ("self_attn.q_proj.weight", vec![q, h]),
                ("self_attn.k_proj.weight", vec![kv, h]),
                ("self_attn.v_proj.weight", vec![kv, h]),
                ("self_attn.o_proj.weight", vec![h, q]),
                ("mlp.gate_proj.weight", vec![i, h]),
                ("mlp.up_proj.weight", vec![i, h]),
                ("mlp.down_proj.weight", vec![h, i]),
            ] {
                out.push((format!("{p}{suffix}"), shape));
            }
        }
        let mut infos: Vec<TensorInfo> = out
            .into_iter()
            .map(|(name, shape)| TensorInfo {
                name,
                dtype: self.dtype,
                shape,
            })
            .collect();
        infos.sort_by(|a, b| a.name.cmp(&b.name));
        infos
    }

    /// Total parameter count.
    pub fn parameters(&self) -> u64 {
        self.tensor_infos().iter().map(|t| t.numel() as u64).sum()
    }

    /// The config.json of a Hugging Face `LlamaForCausalLM` with these shapes.
    pub fn config(&self) -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim(),
            "vocab_size": self.vocab,
            "max_position_embeddings": 2048,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": false,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": self.dtype.torch_name(),
        })
    }
}

/// Elements per independently seeded chunk (the unit of parallelism).
const CHUNK: usize = 1 << 16;
/// Fine-tune delta, relative to the base tensor's scale: most entries move by up to this much...
const SMALL_DELTA: f32 = 0.02;
/// ...and one entry in `BIG_EVERY` (on average) by up to this much.
const BIG_DELTA: f32 = 0.5;
const BIG_EVERY: u32 = 32;

/// SplitMix64 finaliser: mixes a 64-bit value into a well-spread seed.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A stable seed for (family seed, model index, tensor name) — FNV-1a over the name, mixed.
fn tensor_seed(seed: u64, model: u64, name: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    mix(mix(seed ^ mix(model)) ^ h)
}

/// Uniform in [-1, 1) from 24 random bits.
#[inline(always)]
fn unit(bits: u32) -> f32 {
    (bits >> 8) as f32 * (2.0 / (1u32 << 24) as f32) - 1.0
}

/// Base values: norms ≈ 1 ± 0.1, matrices uniform with the variance of N(0, 1/fan_in).
fn base_chunk(info: &TensorInfo, seed: u64, chunk: usize, out: &mut [f32]) {
    let mut rng = SmallRng::seed_from_u64(mix(seed ^ chunk as u64));
    if info.shape.len() == 1 {
        for v in out.iter_mut() {
            *v = 1.0 + 0.1 * unit(rng.next_u32());
        }
    } else {
        let fan_in = *info.shape.last().unwrap_or(&1) as f32;
        let a = (3.0 / fan_in).sqrt();
        for pair in out.chunks_mut(2) {
            let r = rng.next_u64();
            pair[0] = a * unit(r as u32);
            if let Some(v) = pair.get_mut(1) {
                *v = a * unit((r >> 32) as u32);
            }
        }
    }
}

/// Add a fine-tune delta: small everywhere, large on ~1/`BIG_EVERY` of the entries.
fn add_delta(info: &TensorInfo, seed: u64, chunk: usize, out: &mut [f32]) {
    let mut rng = SmallRng::seed_from_u64(mix(seed ^ chunk as u64));
    let scale = if info.shape.len() == 1 {
        0.1
    } else {
        (3.0 / *info.shape.last().unwrap_or(&1) as f32).sqrt()
    };
    let (small, big) = (scale * SMALL_DELTA, scale * BIG_DELTA);
    for v in out.iter_mut() {
        let r = rng.next_u64();
        let magnitude = if ((r >> 32) as u32).is_multiple_of(BIG_EVERY) {
            big
        } else {
            small
        };
        *v += magnitude * unit(r as u32);
    }
}

/// The values of one tensor of family member `model` (0 = base, k = fine-tune k), as stored in
/// `f32` before dtype rounding.
fn generate(info: &TensorInfo, seed: u64, model: usize) -> Vec<f32> {
    let mut data = vec![0f32; info.numel()];
    let base_seed = tensor_seed(seed, 0, &info.name);
    let ft_seed = tensor_seed(seed, model as u64, &info.name);
    data.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
        base_chunk(info, base_seed, c, out);
        if model > 0 {
            add_delta(info, ft_seed, c, out);
        }
    });
    data
}

/// Names of the family members: `base`, `ft1`, … `ftN`.
pub fn member_names(n_finetunes: usize) -> Vec<String> {
    std::iter::once("base".to_string())
        .chain((1..=n_finetunes).map(|k| format!("ft{k}")))
        .collect()
}

/// Write `base/` and `ft1/` … `ftN/` under `dir` (created if needed; the member directories must
/// not exist yet). Returns their paths, base first.
pub fn write_family(
    dir: &Path,
    spec: &LlamaSpec,
    n_finetunes: usize,
    seed: u64,
) -> Result<Vec<PathBuf>> {
    write_family_with(dir, spec, n_finetunes, seed, &WriteConfig::default())
}

/// [`write_family`] with explicit write options (e.g. a small `max_shard_size` to get shards).
pub fn write_family_with(
    dir: &Path,
    spec: &LlamaSpec,
    n_finetunes: usize,
    seed: u64,
    write: &WriteConfig,
) -> Result<Vec<PathBuf>> {
    spec.check()?;
    let infos = spec.tensor_infos();
    let config = spec.config();
    let mut dirs = Vec::new();
    for (k, name) in member_names(n_finetunes).iter().enumerate() {
        let target = dir.join(name);
        let writer = ModelWriter::create(&target, &infos, write)?;
        // Tensors in parallel too, so one tensor's write overlaps the next one's generation;
        // memory stays at about one tensor per thread.
        infos
            .par_iter()
            .try_for_each(|info| writer.write(&info.name, &generate(info, seed, k)))?;
        let card = format!(
            "# Synthetic Llama `{name}`\n\nGenerated by evomerge::synth (seed {seed}, member \
             {k}): {} parameters, {}.\n",
            spec.parameters(),
            spec.dtype
        );
        dirs.push(writer.finish(&config, None, &card)?);
    }
    Ok(dirs)
}

/// The same family in memory: base first, then `n_finetunes` fine-tunes. Values are rounded
/// through `spec.dtype`, so they equal what [`write_family`] stores for the same seed.
pub fn mem_family(spec: &LlamaSpec, n_finetunes: usize, seed: u64) -> Vec<MemModel> {
    let infos = spec.tensor_infos();
    (0..=n_finetunes)
        .map(|k| MemModel {
            config: spec.config(),
            tensors: infos
                .iter()
                .map(|info| {
                    let mut values = generate(info, seed, k);
                    if spec.dtype != DType::F32 {
                        let mut bytes = vec![0u8; values.len() * spec.dtype.size()];
                        spec.dtype.encode_into(&values, &mut bytes);
                        spec.dtype.decode_into(&bytes, &mut values);
                    }
                    (
                        info.name.clone(),
                        TensorBuf::new(info.shape.clone(), values),
                    )
                })
                .collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_spec_has_llama_names_and_shapes() {
        let spec = LlamaSpec::tiny();
        let infos = spec.tensor_infos();
        assert_eq!(infos.len(), 3 + 2 * 9);
        let find = |n: &str| infos.iter().find(|t| t.name == n).unwrap().shape.clone();
        assert_eq!(find("model.layers.1.self_attn.k_proj.weight"), vec![8, 16]);
        assert_eq!(find("model.layers.0.mlp.down_proj.weight"), vec![16, 32]);
        assert_eq!(find("lm_head.weight"), vec![32, 16]);
        let tied = LlamaSpec {
            tie_embeddings: true,
            ..spec.clone()
        };
        assert!(
            tied.tensor_infos()
                .iter()
                .all(|t| t.name != "lm_head.weight")
        );
        assert_eq!(spec.config()["num_key_value_heads"], 2);
    }

    #[test]
    fn bench_spec_is_half_a_billion_parameters() {
        // 2 × 32000 × 2048 embeddings/head + 8 × (2 × 2048² + 2 × 2048 × 256 + 3 × 2048 × 5632
        // + 2 × 2048) + 2048 norm.
        let per_layer = 2 * 2048 * 2048 + 2 * 2048 * 256 + 3 * 2048 * 5632 + 2 * 2048;
        assert_eq!(
            LlamaSpec::bench().parameters(),
            2 * 32000 * 2048 + 8 * per_layer + 2048
        );
    }

    #[test]
    fn fine_tunes_are_base_plus_a_sparse_large_delta() {
        let fam = mem_family(&LlamaSpec::tiny(), 2, 7);
        let name = "model.layers.0.mlp.up_proj.weight";
        let base = &fam[0].tensors[name].to_f32_vec();
        let ft1 = &fam[1].tensors[name].to_f32_vec();
        let ft2 = &fam[2].tensors[name].to_f32_vec();
        let a = (3.0f32 / 16.0).sqrt();
        assert!(base.iter().all(|v| v.abs() <= a));
        let d1: Vec<f32> = ft1.iter().zip(base).map(|(f, b)| f - b).collect();
        assert!(d1.iter().all(|d| d.abs() <= a * BIG_DELTA + 1e-6));
        let big = d1
            .iter()
            .filter(|d| d.abs() > a * SMALL_DELTA * 1.01)
            .count();
        assert!(big > 0 && big < d1.len() / 8, "{big} large entries");
        assert_ne!(ft1, ft2);
        // Deterministic.
        assert_eq!(
            mem_family(&LlamaSpec::tiny(), 2, 7)[2].tensors[name].to_f32_vec(),
            *ft2
        );
        assert_ne!(
            mem_family(&LlamaSpec::tiny(), 2, 8)[0].tensors[name].to_f32_vec(),
            *base
        );
    }
}
