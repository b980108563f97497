//! Git Re-Basin weight matching (Ainsworth, Hayase & Srinivasa 2023, "Git Re-Basin: Merging
//! Models modulo Permutation Symmetries", ICLR; algorithm 1).
//!
//! Hidden units of a network can be permuted without changing its function. Before averaging two
//! independently trained models, weight matching permutes the units of `other` so that its weights
//! line up with `reference`: it maximises `Σ_tensors ⟨W_ref, π(W_other)⟩` by coordinate descent over
//! the permutation groups, each step an exact linear assignment problem ([`lap`]), in a seeded random
//! group order, until a whole sweep improves nothing.
//!
//! The groups come from the architecture ([`PermSpec::for_model`]):
//! - MLP (`layers.{i}.weight` / `.bias`): hidden layer `i`'s units permute rows of `layers.{i}` and
//!   columns of `layers.{i+1}.weight`.
//! - Transformers (Llama / Mistral / Qwen2 names): per layer, the FFN intermediate units (rows of
//!   `gate_proj` / `up_proj`, columns of `down_proj`) and the attention heads as blocks (one unit =
//!   one key/value head with the query heads that share it: rows of `q/k/v_proj`, columns of
//!   `o_proj`). The residual stream is not permuted: every norm and embedding would have to follow.
//!
//! ```no_run
//! # fn main() -> evomerge::Result<()> {
//! let report = evomerge::align::align_dirs(
//!     "ref".as_ref(), "other".as_ref(), "other-aligned".as_ref(), &Default::default())?;
//! println!("objective {} → {}", report.before, report.after);
//! # Ok(()) }
//! ```

pub mod lap;

use std::path::Path;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::candidate::{MemModel, TensorMap};
use crate::error::{Error, Result};
use crate::tensor::TensorBuf;

/// One place a permutation group acts: `tensor`'s dimension `axis`, whose length is
/// `group.size × block` (a unit is `block` consecutive indices, e.g. one attention head).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PermAxis {
    pub tensor: String,
    pub axis: usize,
    pub block: usize,
}

/// A set of `size` interchangeable units and every tensor axis they index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PermGroup {
    pub name: String,
    pub size: usize,
    pub axes: Vec<PermAxis>,
}

/// The permutation symmetries of one architecture.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PermSpec {
    pub groups: Vec<PermGroup>,
}

/// Options of [`weight_matching`].
#[derive(Clone, Debug, PartialEq)]
pub struct MatchConfig {
    /// Most sweeps over all groups.
    pub max_sweeps: usize,
    /// Seed of the random group order.
    pub seed: u64,
}

impl Default for MatchConfig {
    fn default() -> Self {
        MatchConfig {
            max_sweeps: 100,
            seed: 0,
        }
    }
}

/// The outcome of weight matching.
#[derive(Clone, Debug, PartialEq)]
pub struct Matching {
    /// One permutation per group: unit `i` of the aligned model is unit `perms[g][i]` of `other`.
    pub perms: Vec<Vec<usize>>,
    /// Sweeps run (the last one improved nothing, unless `max_sweeps` was reached).
    pub sweeps: usize,
    /// `Σ ⟨W_ref, W_other⟩` over the permuted tensors before and after matching.
    pub before: f64,
    pub after: f64,
}

impl PermSpec {
    /// The MLP's groups: one per hidden layer.
    pub fn mlp(sizes: &[usize]) -> PermSpec {
        let n_layers = sizes.len().saturating_sub(1);
        let groups = (0..n_layers.saturating_sub(1))
            .map(|i| PermGroup {
                name: format!("hidden.{i}"),
                size: sizes[i + 1],
                axes: vec![
                    axis(format!("layers.{i}.weight"), 0, 1),
                    axis(format!("layers.{i}.bias"), 0, 1),
                    axis(format!("layers.{}.weight", i + 1), 1, 1),
                ],
            })
            .collect();
        PermSpec { groups }
    }

    /// A decoder transformer's groups (FFN units and attention heads of every layer), from
    /// config.json and the tensor names present. Tensors that are absent are skipped; a layer
    /// without `mlp.up_proj` / `self_attn.q_proj` has no group of that kind.
    pub fn transformer(config: &serde_json::Value, tensors: &TensorMap) -> Result<PermSpec> {
        let key = |k: &str| config.get(k).and_then(|v| v.as_u64()).map(|v| v as usize);
        let missing = |k: &str| Error::Config {
            path: "config.json".into(),
            msg: format!("`{k}` is missing (needed to find the attention heads)"),
        };
        let n_layers = key("num_hidden_layers").ok_or_else(|| missing("num_hidden_layers"))?;
        let n_heads = key("num_attention_heads").ok_or_else(|| missing("num_attention_heads"))?;
        let n_kv = key("num_key_value_heads").unwrap_or(n_heads);
        let hidden = key("hidden_size").ok_or_else(|| missing("hidden_size"))?;
        if n_heads == 0 || n_kv == 0 || n_heads % n_kv != 0 {
            return Err(Error::Config {
                path: "config.json".into(),
                msg: format!("{n_heads} attention heads do not group into {n_kv} key/value heads"),
            });
        }
        let head_dim = key("head_dim").unwrap_or(hidden / n_heads);
        let rep = n_heads / n_kv;
        let mut groups = Vec::new();
        for l in 0..n_layers {
            let p = format!("model.layers.{l}.");
            let has = |s: &str| tensors.contains_key(&format!("{p}{s}"));
            if let Some(up) = tensors.get(&format!("{p}mlp.up_proj.weight")) {
                let mut axes = Vec::new();
                for (t, a) in [
                    ("mlp.gate_proj.weight", 0),
                    ("mlp.gate_proj.bias", 0),
                    ("mlp.up_proj.weight", 0),
                    ("mlp.up_proj.bias", 0),
                    ("mlp.down_proj.weight", 1),
                ] {
                    if has(t) {
                        axes.push(axis(format!("{p}{t}"), a, 1));
                    }
                }
                groups.push(PermGroup {
                    name: format!("{p}mlp"),
                    size: up.shape[0],
                    axes,
                });
            }
            if has("self_attn.q_proj.weight") {
                let mut axes = Vec::new();
                for (t, a, block) in [
                    ("self_attn.q_proj.weight", 0, rep * head_dim),
                    ("self_attn.q_proj.bias", 0, rep * head_dim),
                    ("self_attn.k_proj.weight", 0, head_dim),
                    ("self_attn.k_proj.bias", 0, head_dim),
                    ("self_attn.v_proj.weight", 0, head_dim),
                    ("self_attn.v_proj.bias", 0, head_dim),
                    ("self_attn.o_proj.weight", 1, rep * head_dim),
                ] {
                    if has(t) {
                        axes.push(axis(format!("{p}{t}"), a, block));
                    }
                }
                groups.push(PermGroup {
                    name: format!("{p}self_attn"),
                    size: n_kv,
                    axes,
                });
            }
        }
        Ok(PermSpec { groups })
    }

    /// The groups of `model`, chosen by its config.json (`model_type: "mlp"` → [`PermSpec::mlp`],
    /// anything with `num_hidden_layers` → [`PermSpec::transformer`]).
    pub fn for_model(model: &MemModel) -> Result<PermSpec> {
        if model.config.get("model_type").and_then(|v| v.as_str())
            == Some(crate::model::mlp::MODEL_TYPE)
        {
            let cfg =
                crate::model::mlp::MlpConfig::from_json(&model.config, "config.json".as_ref())?;
            return Ok(PermSpec::mlp(&cfg.sizes));
        }
        PermSpec::transformer(&model.config, &model.tensors)
    }

    /// Check that every axis exists in `tensors` with length `size × block`.
    pub fn validate(&self, tensors: &TensorMap, label: &str) -> Result<()> {
        for g in &self.groups {
            for a in &g.axes {
                let t = tensors.get(&a.tensor).ok_or_else(|| Error::MissingTensor {
                    model: label.into(),
                    tensor: a.tensor.clone(),
                })?;
                if t.shape.get(a.axis) != Some(&(g.size * a.block)) {
                    return Err(Error::Tensor {
                        tensor: a.tensor.clone(),
                        msg: format!(
                            "group `{}` needs dimension {} of length {}×{}, the shape is {:?}",
                            g.name, a.axis, g.size, a.block, t.shape
                        ),
                    });
                }
            }
        }
        Ok(())
    }
}

fn axis(tensor: String, axis: usize, block: usize) -> PermAxis {
    PermAxis {
        tensor,
        axis,
        block,
    }
}

/// `t` with dimension `axis` permuted by units of `block`: unit `i` of the result is unit
/// `perm[i]` of `t`.
pub fn permute_axis(t: &TensorBuf, axis: usize, block: usize, perm: &[usize]) -> TensorBuf {
    let outer: usize = t.shape[..axis].iter().product();
    let inner: usize = t.shape[axis + 1..].iter().product();
    let dim = t.shape[axis];
    let chunk = block * inner;
    let values = t.values();
    let mut data = vec![0f32; values.len()];
    for o in 0..outer {
        let base = o * dim * inner;
        for (i, &src) in perm.iter().enumerate() {
            let to = base + i * chunk;
            let from = base + src * chunk;
            data[to..to + chunk].copy_from_slice(&values[from..from + chunk]);
        }
    }
    TensorBuf::new(t.shape.clone(), data)
}

/// Apply one permutation per group to `tensors` (tensors no group touches are copied).
pub fn apply(spec: &PermSpec, tensors: &TensorMap, perms: &[Vec<usize>]) -> Result<TensorMap> {
    if perms.len() != spec.groups.len() {
        return Err(Error::msg(format!(
            "{} permutations for {} groups",
            perms.len(),
            spec.groups.len()
        )));
    }
    spec.validate(tensors, "<model>")?;
    let mut out = tensors.clone();
    for (g, perm) in spec.groups.iter().zip(perms) {
        let mut sorted = perm.clone();
        sorted.sort_unstable();
        if sorted != (0..g.size).collect::<Vec<_>>() {
            return Err(Error::msg(format!(
                "group `{}`: not a permutation of 0..{}",
                g.name, g.size
            )));
        }
        for a in &g.axes {
            let t = &out[&a.tensor];
            let p = permute_axis(t, a.axis, a.block, perm);
            out.insert(a.tensor.clone(), p);
        }
    }
    Ok(out)
}

/// `S[i][j] = Σ_axes ⟨unit i of reference, unit j of other⟩` for one group.
fn similarity(group: &PermGroup, reference: &TensorMap, other: &TensorMap) -> Vec<f64> {
    let n = group.size;
    let mut s = vec![0f64; n * n];
    for a in &group.axes {
        let (r, o) = (&reference[&a.tensor], &other[&a.tensor]);
        let (rv, ov) = (r.values(), o.values());
        let outer: usize = r.shape[..a.axis].iter().product();
        let inner: usize = r.shape[a.axis + 1..].iter().product();
        let chunk = a.block * inner;
        let stride = n * chunk;
        for i in 0..n {
            for j in 0..n {
                let mut acc = 0f64;
                for k in 0..outer {
                    let ri = &rv[k * stride + i * chunk..k * stride + (i + 1) * chunk];
                    let oj = &ov[k * stride + j * chunk..k * stride + (j + 1) * chunk];
                    acc += ri
                        .iter()
                        .zip(oj)
                        .map(|(x, y)| f64::from(*x) * f64::from(*y))
                        .sum::<f64>();
                }
                s[i * n + j] += acc;
            }
        }
    }
    s
}

/// `Σ ⟨reference, other⟩` over every tensor some group touches.
fn objective(spec: &PermSpec, reference: &TensorMap, other: &TensorMap) -> f64 {
    let mut names: Vec<&str> = spec
        .groups
        .iter()
        .flat_map(|g| g.axes.iter().map(|a| a.tensor.as_str()))
        .collect();
    names.sort_unstable();
    names.dedup();
    names
        .iter()
        .map(|n| {
            reference[*n]
                .values()
                .iter()
                .zip(other[*n].values().iter())
                .map(|(x, y)| f64::from(*x) * f64::from(*y))
                .sum::<f64>()
        })
        .sum()
}

/// Find the permutations of `other`'s units that best match `reference` (weight matching).
pub fn weight_matching(
    spec: &PermSpec,
    reference: &TensorMap,
    other: &TensorMap,
    config: &MatchConfig,
) -> Result<Matching> {
    spec.validate(reference, "reference")?;
    spec.validate(other, "other")?;
    for g in &spec.groups {
        for a in &g.axes {
            if reference[&a.tensor].shape != other[&a.tensor].shape {
                return Err(Error::Mismatch(format!(
                    "tensor `{}` has shape {:?} in the reference and {:?} in the other model",
                    a.tensor, reference[&a.tensor].shape, other[&a.tensor].shape
                )));
            }
        }
    }
    let mut perms: Vec<Vec<usize>> = spec.groups.iter().map(|g| (0..g.size).collect()).collect();
    let before = objective(spec, reference, other);
    let mut rng = StdRng::seed_from_u64(config.seed);
    let mut order: Vec<usize> = (0..spec.groups.len()).collect();
    let mut sweeps = 0;
    while sweeps < config.max_sweeps {
        sweeps += 1;
        order.shuffle(&mut rng);
        let mut improved = false;
        for &g in &order {
            // `other` with every group but `g` applied; group g's axes are still unpermuted.
            let mut partial = perms.clone();
            partial[g] = (0..spec.groups[g].size).collect();
            let permuted = apply(spec, other, &partial)?;
            let group = &spec.groups[g];
            let n = group.size;
            let s = similarity(group, reference, &permuted);
            let old: f64 = (0..n).map(|i| s[i * n + perms[g][i]]).sum();
            let candidate = lap::maximize(&s, n);
            let new: f64 = (0..n).map(|i| s[i * n + candidate[i]]).sum();
            if new > old + 1e-12 * old.abs().max(1.0) {
                perms[g] = candidate;
                improved = true;
            }
        }
        if !improved {
            break;
        }
    }
    let after = objective(spec, reference, &apply(spec, other, &perms)?);
    Ok(Matching {
        perms,
        sweeps,
        before,
        after,
    })
}

/// Align `other` to `reference`: weight matching, then the permutations applied. The result
/// computes the same function as `other`.
pub fn align(
    reference: &MemModel,
    other: &MemModel,
    config: &MatchConfig,
) -> Result<(MemModel, Matching)> {
    let spec = PermSpec::for_model(reference)?;
    let matching = weight_matching(&spec, &reference.tensors, &other.tensors, config)?;
    let tensors = apply(&spec, &other.tensors, &matching.perms)?;
    Ok((
        MemModel {
            config: other.config.clone(),
            tensors,
        },
        matching,
    ))
}

/// `evomerge align REF OTHER OUT`: open two Hugging Face model directories (single or sharded
/// safetensors, any dtype), and write `other` aligned to `reference` into `out` with `other`'s
/// config.json, dtypes and tokenizer files. Returns the matching.
pub fn align_dirs(
    reference: &Path,
    other: &Path,
    out: &Path,
    config: &MatchConfig,
) -> Result<Matching> {
    let r = crate::store::load_mem_f32(reference)?;
    let source = crate::store::Model::open(other)?;
    let o = crate::store::load_mem_f32(other)?;
    let (aligned, matching) = align(&r, &o, config)?;
    let writer = crate::store::ModelWriter::create(
        out,
        source.tensors(),
        &crate::store::WriteConfig::default(),
    )?;
    for (name, t) in &aligned.tensors {
        writer.write(name, &t.values())?;
    }
    let card = format!(
        "# Aligned model\n\n`{}` with its hidden units permuted to match `{}` by Git Re-Basin \
         weight matching (Ainsworth et al. 2023): {} permutation groups, {} sweeps, \
         Σ⟨W_ref, W⟩ {:.4} → {:.4}. It computes the same function as the original.\n",
        other.display(),
        reference.display(),
        matching.perms.len(),
        matching.sweeps,
        matching.before,
        matching.after
    );
    writer.finish(&aligned.config, Some(other), &card)?;
    Ok(matching)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_axis_moves_blocks() {
        // 2 × 4, permute columns in blocks of 2 with perm [1, 0].
        let t = TensorBuf::new(vec![2, 4], vec![0., 1., 2., 3., 4., 5., 6., 7.]);
        let p = permute_axis(&t, 1, 2, &[1, 0]);
        assert_eq!(p.to_f32_vec(), vec![2., 3., 0., 1., 6., 7., 4., 5.]);
        let p = permute_axis(&t, 0, 1, &[1, 0]);
        assert_eq!(p.to_f32_vec(), vec![4., 5., 6., 7., 0., 1., 2., 3.]);
    }

    #[test]
    fn matching_undoes_a_known_permutation() {
        // A 1-hidden-layer MLP 2 → 3 → 1; `other` is `reference` with hidden units [2, 0, 1].
        let mut r = TensorMap::new();
        r.insert(
            "layers.0.weight".into(),
            TensorBuf::new(vec![3, 2], vec![1., 0., 0., 2., -3., 1.]),
        );
        r.insert(
            "layers.0.bias".into(),
            TensorBuf::new(vec![3], vec![0.1, 0.2, 0.3]),
        );
        r.insert(
            "layers.1.weight".into(),
            TensorBuf::new(vec![1, 3], vec![1., -1., 0.5]),
        );
        r.insert("layers.1.bias".into(), TensorBuf::new(vec![1], vec![0.]));
        let spec = PermSpec::mlp(&[2, 3, 1]);
        let other = apply(&spec, &r, &[vec![2, 0, 1]]).unwrap();
        assert_eq!(other["layers.0.bias"].to_f32_vec(), vec![0.3, 0.1, 0.2]);
        assert_eq!(other["layers.1.weight"].to_f32_vec(), vec![0.5, 1., -1.]);
        let m = weight_matching(&spec, &r, &other, &MatchConfig::default()).unwrap();
        // Unit 0 of the reference is unit 1 of `other`, and so on.
        assert_eq!(m.perms, vec![vec![1, 2, 0]]);
        assert_eq!(apply(&spec, &other, &m.perms).unwrap(), r);
        assert!(m.after > m.before);
    }

    #[test]
    fn transformer_groups_follow_gqa() {
        let cfg = serde_json::json!({
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
            "hidden_size": 8
        });
        let mut t = TensorMap::new();
        let z = |s: Vec<usize>| TensorBuf::new(s.clone(), vec![0.; s.iter().product()]);
        let p = "model.layers.0.";
        t.insert(format!("{p}self_attn.q_proj.weight"), z(vec![8, 8]));
        t.insert(format!("{p}self_attn.k_proj.weight"), z(vec![4, 8]));
        t.insert(format!("{p}self_attn.v_proj.weight"), z(vec![4, 8]));
        t.insert(format!("{p}self_attn.o_proj.weight"), z(vec![8, 8]));
        t.insert(format!("{p}mlp.gate_proj.weight"), z(vec![6, 8]));
        t.insert(format!("{p}mlp.up_proj.weight"), z(vec![6, 8]));
        t.insert(format!("{p}mlp.down_proj.weight"), z(vec![8, 6]));
        let spec = PermSpec::transformer(&cfg, &t).unwrap();
        assert_eq!(spec.groups.len(), 2);
        assert_eq!(spec.groups[0].size, 6);
        assert_eq!(spec.groups[1].size, 2);
        // head_dim 2, two query heads per kv head: q/o blocks of 4, k/v blocks of 2.
        let blocks: Vec<usize> = spec.groups[1].axes.iter().map(|a| a.block).collect();
        assert_eq!(blocks, vec![4, 2, 2, 4]);
        spec.validate(&t, "t").unwrap();
    }
}
