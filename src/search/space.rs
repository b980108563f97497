//! Search spaces: what a genome (a vector of `f64` genes) means, and how it decodes into something
//! the merger or the forward pass can run.
//!
//! * [`PsSpace`] — parameter space. Genes are read from the merge method's declared
//!   parameters ([`ParamDecl`]): one gene per (layer group × tensor part × parameter × model) for
//!   per-model parameters, and per (layer group × part × parameter) for global ones. A genome
//!   decodes into mergekit YAML: one slice per layer group, per-source `parameters`, and
//!   `{filter, value}` lists where genes differ by tensor (attention vs MLP, embeddings/head). The
//!   decoder names no method.
//! * [`DfsSpace`] — data-flow space (Akiba et al. 2024, §3.2): the layers of the M pool models
//!   laid out in order and repeated r times; one indicator gene per slot (used when above the
//!   threshold) and a scaling matrix W (M×M). A genome decodes into a [`Route`].
//!
//! **Bounds.** `cmaes` 0.2.2 has no box constraints, so decoding maps every gene into its range
//! by *reflection*: a gene is in range units (0 = the range's min, 1 = its max), and values
//! outside `[0, 1]` are mirrored back (`1.3 → 0.7`, `−0.2 → 0.2`, period 2). Reflection is the
//! identity inside the range, continuous everywhere, reaches the bounds exactly (a density of
//! 1.0 is a valid default, which a sigmoid could never produce) and leaves CMA-ES's step size
//! meaningful: `sigma0 = 0.2` is a fifth of every range.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::candidate::{Hop, Route};
use crate::error::{Error, Result};
use crate::merge::{ParamDecl, ParamKind, Scope};
use crate::search::def::{DfsDef, PsDef};

/// Mirror `g` into `[0, 1]` (period 2; identity on `[0, 1]`).
pub fn reflect(g: f64) -> f64 {
    if !g.is_finite() {
        return 0.5;
    }
    let t = g.rem_euclid(2.0);
    if t > 1.0 { 2.0 - t } else { t }
}

/// Which tensors of a layer group a gene applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Part {
    /// Every tensor of the group.
    All,
    /// Tensors whose name contains `self_attn`.
    Attn,
    /// Tensors whose name contains `mlp`.
    Mlp,
}

impl Part {
    /// A short label.
    pub fn label(self) -> &'static str {
        match self {
            Part::All => "all",
            Part::Attn => "attn",
            Part::Mlp => "mlp",
        }
    }
}

/// A layer group of a PS space.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Group {
    /// Layers `[start, end)`.
    Layers { start: usize, end: usize },
    /// Pre- and post-layer tensors (embeddings, final norm, head).
    Embeddings,
}

impl Group {
    /// A short label (`L0`, `L2-3`, `emb`).
    pub fn label(&self) -> String {
        match self {
            Group::Layers { start, end } if end - start == 1 => format!("L{start}"),
            Group::Layers { start, end } => format!("L{start}-{}", end - 1),
            Group::Embeddings => "emb".into(),
        }
    }
}

/// One gene of a PS genome.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PsGene {
    /// Index into [`PsSpace::groups`].
    pub group: usize,
    pub part: Part,
    pub param: String,
    /// Model index (into the non-base models) for per-model parameters; `None` for global ones.
    pub model: Option<usize>,
    pub min: f64,
    pub max: f64,
    /// The value of the default genome.
    pub default: f64,
}

impl PsGene {
    /// The value of gene `g` (reflected into `[min, max]`).
    pub fn decode(&self, g: f64) -> f64 {
        self.min + reflect(g) * (self.max - self.min)
    }
    /// The gene that decodes to `value` (clamped into the range).
    pub fn encode(&self, value: f64) -> f64 {
        if self.max > self.min {
            ((value - self.min) / (self.max - self.min)).clamp(0.0, 1.0)
        } else {
            0.0
        }
    }
}

/// What a PS space needs to know about the models.
#[derive(Clone, Debug)]
pub struct PsModels {
    /// The merge method's registry key (written into the YAML, never interpreted here).
    pub method: String,
    /// The method's declared parameters.
    pub decls: Vec<ParamDecl>,
    /// Names of the models to merge, as they will appear in the YAML.
    pub models: Vec<String>,
    /// The base model's name, if the merge has one.
    pub base: Option<String>,
    /// Number of layers (all models agree).
    pub n_layers: usize,
    /// Names of the pre-layer tensors (embeddings).
    pub pre_tensors: Vec<String>,
    /// Names of the post-layer tensors (final norm, head).
    pub post_tensors: Vec<String>,
}

/// A parameter space over a merge method's declared parameters.
#[derive(Clone, Debug)]
pub struct PsSpace {
    pub info: PsModels,
    pub groups: Vec<Group>,
    pub parts: Vec<Part>,
    pub genes: Vec<PsGene>,
    /// The `out_dtype` written into every decoded recipe (the inputs' dtype; see
    /// [`PsSpace::with_out_dtype`]). `None` writes none, so the output is `f32` like the math.
    pub out_dtype: Option<crate::tensor::DType>,
}

impl PsSpace {
    /// Build the genes for `info` under the settings `def`.
    pub fn new(info: PsModels, def: &PsDef) -> Result<PsSpace> {
        let err = |msg: String| Error::Search(msg);
        if info.models.is_empty() {
            return Err(err("a PS space needs at least one model to merge".into()));
        }
        if info.n_layers == 0 {
            return Err(err("the models have no layers".into()));
        }
        let floats: Vec<&ParamDecl> = info
            .decls
            .iter()
            .filter(|d| matches!(d.kind, ParamKind::Float { .. }))
            .collect();
        let chosen: Vec<&ParamDecl> = match &def.params {
            None => floats.iter().copied().filter(|d| d.searched).collect(),
            Some(names) => names
                .iter()
                .map(|n| {
                    floats.iter().copied().find(|d| d.name == n).ok_or_else(|| {
                        let known: Vec<_> = floats.iter().map(|d| d.name).collect();
                        err(format!(
                            "space.params: `{n}` is not a Float parameter of `{}` (it has: {})",
                            info.method,
                            known.join(", ")
                        ))
                    })
                })
                .collect::<Result<_>>()?,
        };
        if chosen.is_empty() {
            return Err(err(format!(
                "method `{}` declares no Float parameter to search",
                info.method
            )));
        }
        for name in def.ranges.keys().chain(def.defaults.keys()) {
            if !chosen.iter().any(|d| d.name == name) {
                return Err(err(format!(
                    "space.ranges/defaults name `{name}`, which is not a searched parameter"
                )));
            }
        }

        let mut groups: Vec<Group> = def
            .granularity
            .groups(info.n_layers)
            .into_iter()
            .map(|(start, end)| Group::Layers { start, end })
            .collect();
        if def.embeddings && !(info.pre_tensors.is_empty() && info.post_tensors.is_empty()) {
            groups.push(Group::Embeddings);
        }
        let parts = if def.split_attn_mlp {
            vec![Part::Attn, Part::Mlp]
        } else {
            vec![Part::All]
        };

        let mut genes = Vec::new();
        for (gi, group) in groups.iter().enumerate() {
            let group_parts: &[Part] = if matches!(group, Group::Embeddings) {
                &[Part::All]
            } else {
                &parts
            };
            for &part in group_parts {
                for d in &chosen {
                    let ParamKind::Float { min, max } = d.kind else {
                        continue;
                    };
                    let (min, max) = match def.ranges.get(d.name) {
                        Some(&[lo, hi]) => {
                            if lo < min || hi > max {
                                return Err(err(format!(
                                    "space.ranges.{}: [{lo}, {hi}] is outside the declared range \
                                     [{min}, {max}]",
                                    d.name
                                )));
                            }
                            (lo, hi)
                        }
                        None => (min, max),
                    };
                    if !(min.is_finite() && max.is_finite()) {
                        return Err(err(format!(
                            "parameter `{}` has an unbounded range [{min}, {max}]: set \
                             space.ranges.{} = [lo, hi]",
                            d.name, d.name
                        )));
                    }
                    let default = def
                        .defaults
                        .get(d.name)
                        .copied()
                        .or(d.default)
                        .unwrap_or(0.5 * (min + max))
                        .clamp(min, max);
                    let models: Vec<Option<usize>> = match d.scope {
                        Scope::PerModel => (0..info.models.len()).map(Some).collect(),
                        Scope::Global => vec![None],
                    };
                    for model in models {
                        genes.push(PsGene {
                            group: gi,
                            part,
                            param: d.name.to_string(),
                            model,
                            min,
                            max,
                            default,
                        });
                    }
                }
            }
        }
        Ok(PsSpace {
            info,
            groups,
            parts,
            genes,
            out_dtype: None,
        })
    }

    /// Decoded recipes merge in `f32` (`dtype: float32`, as mergekit reads it) and store the
    /// result in `dtype` (`out_dtype`): the search passes the inputs' dtype, so candidates in
    /// memory and the best model on disk keep the checkpoints' precision and size.
    pub fn with_out_dtype(mut self, dtype: crate::tensor::DType) -> Self {
        self.out_dtype = Some(dtype);
        self
    }

    /// Number of genes.
    pub fn dim(&self) -> usize {
        self.genes.len()
    }

    /// The genome that decodes to the defaults (declared, or from `space.defaults`).
    pub fn default_genome(&self) -> Vec<f64> {
        self.genes.iter().map(|g| g.encode(g.default)).collect()
    }

    /// Decoded values, parallel to [`PsSpace::genes`].
    pub fn values(&self, genome: &[f64]) -> Vec<f64> {
        self.genes
            .iter()
            .zip(genome)
            .map(|(g, &x)| g.decode(x))
            .collect()
    }

    /// Decode a genome into mergekit YAML.
    ///
    /// One slice per layer group (`layer_range: [start, end]`), the base model listed in every
    /// slice without parameters, each other model with its per-model parameters, and global
    /// parameters at slice level. Where values differ inside a slice they are written as a
    /// `{filter, value}` list (first match wins, last entry is the catch-all):
    /// * `split_attn_mlp`: `self_attn` → the attention gene, `mlp` → the MLP gene, catch-all
    ///   (layer norms) → the mean of the two;
    /// * the embeddings group: mergekit merges pre-layer tensors with the first slice's settings
    ///   and post-layer tensors with the last slice's, so the first slice carries a filter per
    ///   pre-layer tensor name and the last slice one per post-layer tensor name.
    pub fn decode(&self, genome: &[f64]) -> Result<String> {
        if genome.len() != self.dim() {
            return Err(Error::Search(format!(
                "genome has {} genes, the space {}",
                genome.len(),
                self.dim()
            )));
        }
        let values = self.values(genome);
        // (group, part, param, model) → value
        let mut table: BTreeMap<(usize, Part, &str, Option<usize>), f64> = BTreeMap::new();
        for (g, v) in self.genes.iter().zip(&values) {
            table.insert((g.group, g.part, g.param.as_str(), g.model), *v);
        }
        let params: Vec<&str> = {
            let mut p: Vec<&str> = Vec::new();
            for g in &self.genes {
                if !p.contains(&g.param.as_str()) {
                    p.push(&g.param);
                }
            }
            p
        };
        let emb = self
            .groups
            .iter()
            .position(|g| matches!(g, Group::Embeddings));
        let layer_groups: Vec<(usize, usize, usize)> = self
            .groups
            .iter()
            .enumerate()
            .filter_map(|(i, g)| match g {
                Group::Layers { start, end } => Some((i, *start, *end)),
                Group::Embeddings => None,
            })
            .collect();
        let n_slices = layer_groups.len();

        // The value (scalar or filter list) of `param` for `model` in layer group `gi`.
        let value_for =
            |gi: usize, slice_pos: usize, param: &str, model: Option<usize>| -> Option<Value> {
                let part_value = |part: Part| table.get(&(gi, part, param, model)).copied();
                let mut filters: Vec<(String, f64)> = Vec::new();
                if let Some(e) = emb
                    && let Some(v) = table.get(&(e, Part::All, param, model)).copied()
                {
                    if slice_pos == 0 {
                        filters.extend(self.info.pre_tensors.iter().map(|t| (t.clone(), v)));
                    }
                    if slice_pos + 1 == n_slices {
                        filters.extend(self.info.post_tensors.iter().map(|t| (t.clone(), v)));
                    }
                }
                let catch_all = if let Some(v) = part_value(Part::All) {
                    v
                } else {
                    let a = part_value(Part::Attn)?;
                    let m = part_value(Part::Mlp)?;
                    filters.push(("self_attn".into(), a));
                    filters.push(("mlp".into(), m));
                    0.5 * (a + m)
                };
                if filters.is_empty() {
                    Some(Value::Scalar(catch_all))
                } else {
                    Some(Value::Filtered(filters, catch_all))
                }
            };

        let mut slices = Vec::new();
        for (pos, &(gi, start, end)) in layer_groups.iter().enumerate() {
            let mut sources = Vec::new();
            if let Some(base) = &self.info.base {
                sources.push(yaml_source(base, start, end, Vec::new()));
            }
            for (mi, name) in self.info.models.iter().enumerate() {
                let ps: Vec<(String, Value)> = params
                    .iter()
                    .filter_map(|p| value_for(gi, pos, p, Some(mi)).map(|v| (p.to_string(), v)))
                    .collect();
                sources.push(yaml_source(name, start, end, ps));
            }
            let globals: Vec<(String, Value)> = params
                .iter()
                .filter_map(|p| value_for(gi, pos, p, None).map(|v| (p.to_string(), v)))
                .collect();
            let mut slice = serde_json::Map::new();
            slice.insert("sources".into(), serde_json::Value::Array(sources));
            if !globals.is_empty() {
                slice.insert("parameters".into(), params_json(globals));
            }
            slices.push(serde_json::Value::Object(slice));
        }

        let mut root = serde_json::Map::new();
        root.insert("merge_method".into(), self.info.method.clone().into());
        if let Some(base) = &self.info.base {
            root.insert("base_model".into(), base.clone().into());
        }
        root.insert("slices".into(), serde_json::Value::Array(slices));
        root.insert("dtype".into(), "float32".into());
        if let Some(out) = self.out_dtype {
            root.insert("out_dtype".into(), out.torch_name().into());
        }
        yaml_serde::to_string(&serde_json::Value::Object(root))
            .map_err(|e| Error::Search(format!("cannot write the recipe YAML: {e}")))
    }
}

/// A parameter value in YAML: a scalar or a `{filter, value}` list with a catch-all.
enum Value {
    Scalar(f64),
    Filtered(Vec<(String, f64)>, f64),
}

fn round(v: f64) -> serde_json::Value {
    // Six significant decimals keep the YAML readable; the genome itself is kept exactly in
    // the history.
    let r = (v * 1e6).round() / 1e6;
    serde_json::json!(r)
}

fn params_json(ps: Vec<(String, Value)>) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for (name, v) in ps {
        let j = match v {
            Value::Scalar(x) => round(x),
            Value::Filtered(filters, catch_all) => {
                let mut list: Vec<serde_json::Value> = filters
                    .into_iter()
                    .map(|(f, x)| serde_json::json!({"filter": f, "value": round(x)}))
                    .collect();
                list.push(serde_json::json!({ "value": round(catch_all) }));
                serde_json::Value::Array(list)
            }
        };
        m.insert(name, j);
    }
    serde_json::Value::Object(m)
}

fn yaml_source(
    model: &str,
    start: usize,
    end: usize,
    params: Vec<(String, Value)>,
) -> serde_json::Value {
    let mut s = serde_json::Map::new();
    s.insert("model".into(), model.into());
    s.insert("layer_range".into(), serde_json::json!([start, end]));
    if !params.is_empty() {
        s.insert("parameters".into(), params_json(params));
    }
    serde_json::Value::Object(s)
}

/// One slot of a DFS layout: layer `layer` of pool model `model`, in repetition `rep`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    pub rep: usize,
    pub model: usize,
    pub layer: usize,
}

/// Magnitude of the initial indicator genes (in the units where `sigma0 = 0.2` is typical).
const INDICATOR_INIT: f64 = 0.25;

/// A data-flow space (Akiba et al. 2024, §3.2).
///
/// The slots are every layer of every pool model, models in pool order, the whole sequence
/// repeated `r` times (T = r·ΣL). Genes: one indicator per slot, then W row-major (M×M). As in
/// the paper, the embedding model's first and last layers are kept fixed: the route always
/// starts with the embedding model's layer 0 (scale 1) and ends with its last layer, and those
/// two slots (first repetition's layer 0, last repetition's last layer) carry no gene. Between
/// them come the used slots in order; a hop running a layer of model j right after one of model
/// i has its input scaled by W\[i\]\[j\].
#[derive(Clone, Debug)]
pub struct DfsSpace {
    /// Layer count of each pool model.
    pub layers: Vec<usize>,
    pub embed_model: usize,
    pub repeats: usize,
    pub scale_range: [f64; 2],
    pub threshold: f64,
    /// The slots that carry an indicator gene, in route order.
    pub slots: Vec<Slot>,
}

impl DfsSpace {
    /// Build the slot layout for pool models with `layers[m]` layers each.
    pub fn new(layers: Vec<usize>, embed_model: usize, def: &DfsDef) -> Result<DfsSpace> {
        if layers.is_empty() || layers.contains(&0) {
            return Err(Error::Search(format!(
                "a DFS pool needs models with layers (layer counts: {layers:?})"
            )));
        }
        if embed_model >= layers.len() {
            return Err(Error::Search(format!(
                "embed model {embed_model} is not in a pool of {}",
                layers.len()
            )));
        }
        let r = def.repeats.max(1);
        let last = layers[embed_model] - 1;
        let mut slots = Vec::new();
        for rep in 0..r {
            for (model, &n) in layers.iter().enumerate() {
                for layer in 0..n {
                    let fixed_first = rep == 0 && model == embed_model && layer == 0;
                    let fixed_last = rep == r - 1 && model == embed_model && layer == last;
                    if !(fixed_first || fixed_last) {
                        slots.push(Slot { rep, model, layer });
                    }
                }
            }
        }
        Ok(DfsSpace {
            layers,
            embed_model,
            repeats: r,
            scale_range: def.scale_range,
            threshold: def.indicator_threshold,
            slots,
        })
    }

    /// Number of pool models (M).
    pub fn n_models(&self) -> usize {
        self.layers.len()
    }

    /// Number of genes: indicators + M².
    pub fn dim(&self) -> usize {
        self.slots.len() + self.n_models() * self.n_models()
    }

    fn scale(&self, g: f64) -> f64 {
        let [lo, hi] = self.scale_range;
        lo + reflect(g) * (hi - lo)
    }

    /// The genome of the embedding model's own route (its layers once, in order, every scale
    /// as close to 1 as the range allows).
    pub fn default_genome(&self) -> Vec<f64> {
        let mut g: Vec<f64> = self
            .slots
            .iter()
            .map(|s| {
                let last = self.layers[self.embed_model] - 1;
                if s.rep == 0 && s.model == self.embed_model && s.layer < last {
                    INDICATOR_INIT + self.threshold
                } else {
                    self.threshold - INDICATOR_INIT
                }
            })
            .collect();
        let [lo, hi] = self.scale_range;
        let one = if hi > lo {
            ((1.0 - lo) / (hi - lo)).clamp(0.0, 1.0)
        } else {
            0.0
        };
        g.extend(std::iter::repeat_n(one, self.n_models() * self.n_models()));
        g
    }

    /// The decoded scaling matrix W (row-major, M×M).
    pub fn w(&self, genome: &[f64]) -> Vec<f64> {
        genome[self.slots.len()..]
            .iter()
            .map(|&g| self.scale(g))
            .collect()
    }

    /// Decode a genome into a route.
    pub fn decode(&self, genome: &[f64]) -> Result<Route> {
        if genome.len() != self.dim() {
            return Err(Error::Search(format!(
                "genome has {} genes, the DFS space {}",
                genome.len(),
                self.dim()
            )));
        }
        let m = self.n_models();
        let w = self.w(genome);
        let e = self.embed_model;
        let mut picked: Vec<(usize, usize)> = vec![(e, 0)];
        for (s, &g) in self.slots.iter().zip(genome) {
            if g > self.threshold {
                picked.push((s.model, s.layer));
            }
        }
        picked.push((e, self.layers[e] - 1));
        let mut hops = Vec::with_capacity(picked.len());
        for (k, &(model, layer)) in picked.iter().enumerate() {
            let scale = if k == 0 {
                1.0
            } else {
                w[picked[k - 1].0 * m + model] as f32
            };
            hops.push(Hop {
                model,
                layer,
                scale,
            });
        }
        Ok(Route {
            embed_model: e,
            hops,
        })
    }
}

/// A search space.
#[derive(Clone, Debug)]
pub enum Space {
    Ps(PsSpace),
    Dfs(DfsSpace),
}

/// A decoded genome.
#[derive(Clone, Debug, PartialEq)]
pub enum Decoded {
    /// mergekit YAML.
    Recipe(String),
    /// A route through the pool models.
    Route(Route),
}

impl Decoded {
    /// The text stored in the history and handed to external evaluators: the YAML, or the
    /// route as JSON.
    pub fn text(&self) -> String {
        match self {
            Decoded::Recipe(y) => y.clone(),
            Decoded::Route(r) => serde_json::to_string(r).unwrap_or_default(),
        }
    }
}

impl Space {
    /// Number of genes.
    pub fn dim(&self) -> usize {
        match self {
            Space::Ps(s) => s.dim(),
            Space::Dfs(s) => s.dim(),
        }
    }

    /// The genome of the default merge (PS) or of the embedding model's own route (DFS).
    pub fn default_genome(&self) -> Vec<f64> {
        match self {
            Space::Ps(s) => s.default_genome(),
            Space::Dfs(s) => s.default_genome(),
        }
    }

    /// Where CMA-ES starts: the default genome with every ranged gene pulled at least
    /// `margin` (capped at 0.5) inside its range. Reflection turns a bound into a mirror, so a
    /// mean sitting exactly on a bound gets no push from the samples that fall outside; a
    /// default on a bound (density 1.0, weight 1.0) would stall there.
    pub fn initial_mean(&self, margin: f64) -> Vec<f64> {
        let m = margin.clamp(0.0, 0.5);
        let mut g = self.default_genome();
        let ranged = match self {
            Space::Ps(_) => 0,
            Space::Dfs(s) => s.slots.len(),
        };
        for x in &mut g[ranged..] {
            *x = x.clamp(m, 1.0 - m);
        }
        g
    }

    /// Decode a genome.
    pub fn decode(&self, genome: &[f64]) -> Result<Decoded> {
        match self {
            Space::Ps(s) => s.decode(genome).map(Decoded::Recipe),
            Space::Dfs(s) => s.decode(genome).map(Decoded::Route),
        }
    }

    /// A random genome for a restart: every gene uniform over its natural box (PS: the whole
    /// range; DFS indicators: threshold ± 0.5; W: the whole range).
    pub fn random_genome(&self, rng: &mut impl rand::Rng) -> Vec<f64> {
        match self {
            Space::Ps(s) => (0..s.dim()).map(|_| rng.random::<f64>()).collect(),
            Space::Dfs(s) => {
                let mut g: Vec<f64> = (0..s.slots.len())
                    .map(|_| s.threshold + rng.random::<f64>() - 0.5)
                    .collect();
                g.extend((0..s.n_models() * s.n_models()).map(|_| rng.random::<f64>()));
                g
            }
        }
    }
}

/// A description of a space saved beside the history (`space.json`), so plots can be redrawn
/// from an output directory alone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SpaceFile {
    Ps {
        groups: Vec<Group>,
        genes: Vec<PsGene>,
        /// Short names of the merged models (genes' `model` indexes into this).
        models: Vec<String>,
    },
    Dfs {
        layers: Vec<usize>,
        embed_model: usize,
        /// Short names of the pool models.
        models: Vec<String>,
    },
}

impl Space {
    /// The description saved as `space.json`; `models` are short display names.
    pub fn describe(&self, models: Vec<String>) -> SpaceFile {
        match self {
            Space::Ps(s) => SpaceFile::Ps {
                groups: s.groups.clone(),
                genes: s.genes.clone(),
                models,
            },
            Space::Dfs(s) => SpaceFile::Dfs {
                layers: s.layers.clone(),
                embed_model: s.embed_model,
                models,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::def::Granularity;

    const DECLS: &[ParamDecl] = &[
        ParamDecl {
            name: "weight",
            scope: Scope::PerModel,
            kind: ParamKind::Float { min: 0.0, max: 2.0 },
            default: None,
            searched: true,
            doc: "",
        },
        ParamDecl {
            name: "density",
            scope: Scope::PerModel,
            kind: ParamKind::Float { min: 0.0, max: 1.0 },
            default: Some(1.0),
            searched: true,
            doc: "",
        },
        ParamDecl {
            name: "lambda",
            scope: Scope::Global,
            kind: ParamKind::Float { min: 0.0, max: 4.0 },
            default: Some(1.0),
            searched: true,
            doc: "",
        },
        ParamDecl {
            name: "normalize",
            scope: Scope::Global,
            kind: ParamKind::Bool,
            default: Some(1.0),
            searched: true,
            doc: "",
        },
    ];

    fn info() -> PsModels {
        PsModels {
            method: "ties".into(),
            decls: DECLS.to_vec(),
            models: vec!["a".into(), "b".into()],
            base: Some("base".into()),
            n_layers: 3,
            pre_tensors: vec!["model.embed_tokens.weight".into()],
            post_tensors: vec!["lm_head.weight".into(), "model.norm.weight".into()],
        }
    }

    fn ps_def() -> PsDef {
        PsDef {
            granularity: Granularity::PerLayer,
            split_attn_mlp: false,
            embeddings: false,
            params: None,
            ranges: BTreeMap::new(),
            defaults: BTreeMap::new(),
        }
    }

    #[test]
    fn reflection_mirrors_into_unit_range() {
        assert_eq!(reflect(0.3), 0.3);
        assert!((reflect(1.3) - 0.7).abs() < 1e-12);
        assert!((reflect(-0.2) - 0.2).abs() < 1e-12);
        assert!((reflect(2.25) - 0.25).abs() < 1e-12);
        assert_eq!(reflect(1.0), 1.0);
        assert_eq!(reflect(f64::NAN), 0.5);
    }

    #[test]
    fn ps_genes_follow_the_declarations() {
        let s = PsSpace::new(info(), &ps_def()).unwrap();
        // 3 groups × (weight×2 + density×2 + lambda) = 15; the Bool gets no gene.
        assert_eq!(s.dim(), 15);
        // weight has no default: midpoint 1.0 → gene 0.5; density default 1.0 → gene 1.0;
        // lambda default 1.0 of [0, 4] → 0.25.
        assert_eq!(&s.default_genome()[..5], &[0.5, 0.5, 1.0, 1.0, 0.25]);
    }

    #[test]
    fn ps_decodes_per_layer_slices() {
        let mut d = ps_def();
        d.params = Some(vec!["weight".into()]);
        d.granularity = Granularity::Every(2);
        let s = PsSpace::new(info(), &d).unwrap();
        assert_eq!(s.dim(), 4); // 2 groups × 2 models
        let yaml = s.decode(&[0.25, 1.5, 0.0, -0.1]).unwrap();
        let v: serde_json::Value = yaml_serde::from_str(&yaml).unwrap();
        let slices = v["slices"].as_array().unwrap();
        assert_eq!(slices.len(), 2);
        assert_eq!(slices[0]["sources"][0]["model"], "base");
        assert_eq!(
            slices[0]["sources"][0]["layer_range"],
            serde_json::json!([0, 2])
        );
        assert_eq!(
            slices[1]["sources"][2]["layer_range"],
            serde_json::json!([2, 3])
        );
        // weight range [0, 2]: 0.25 → 0.5, 1.5 → reflect 0.5 → 1.0, −0.1 → 0.1 → 0.2.
        assert_eq!(slices[0]["sources"][1]["parameters"]["weight"], 0.5);
        assert_eq!(slices[0]["sources"][2]["parameters"]["weight"], 1.0);
        assert_eq!(slices[1]["sources"][1]["parameters"]["weight"], 0.0);
        assert_eq!(slices[1]["sources"][2]["parameters"]["weight"], 0.2);
        assert_eq!(v["merge_method"], "ties");
        assert_eq!(v["base_model"], "base");
    }

    #[test]
    fn ps_split_and_embeddings_use_filters() {
        let mut d = ps_def();
        d.params = Some(vec!["weight".into()]);
        d.granularity = Granularity::Whole;
        d.split_attn_mlp = true;
        d.embeddings = true;
        let s = PsSpace::new(info(), &d).unwrap();
        // whole: attn, mlp per model (4) + embeddings per model (2)
        assert_eq!(s.dim(), 6);
        let yaml = s.decode(&[0.1, 0.2, 0.3, 0.4, 0.45, 0.05]).unwrap();
        let v: serde_json::Value = yaml_serde::from_str(&yaml).unwrap();
        let w = &v["slices"][0]["sources"][1]["parameters"]["weight"];
        // model a: attn 0.2, mlp 0.6, emb 0.9 (gene order: attn a, attn b, mlp a, mlp b, emb a, emb b)
        assert_eq!(
            *w,
            serde_json::json!([
                {"filter": "model.embed_tokens.weight", "value": 0.9},
                {"filter": "lm_head.weight", "value": 0.9},
                {"filter": "model.norm.weight", "value": 0.9},
                {"filter": "self_attn", "value": 0.2},
                {"filter": "mlp", "value": 0.6},
                {"value": 0.4},
            ])
        );
    }

    #[test]
    fn ps_refuses_unknown_params_and_wide_ranges() {
        let mut d = ps_def();
        d.params = Some(vec!["gamma".into()]);
        assert!(
            PsSpace::new(info(), &d)
                .unwrap_err()
                .to_string()
                .contains("gamma")
        );
        let mut d = ps_def();
        d.ranges.insert("weight".into(), [-1.0, 1.0]);
        assert!(PsSpace::new(info(), &d).is_err());
    }

    /// Numerical guards (`searched: false`, e.g. karcher's `tol`) are left out of the genes
    /// unless `space.params` names them.
    #[test]
    fn ps_leaves_out_unsearched_params_unless_named() {
        let karcher = crate::merge::method("karcher").unwrap();
        let info = PsModels {
            method: "karcher".into(),
            decls: karcher.params().to_vec(),
            base: None,
            ..info()
        };
        let params = |d: &PsDef| -> Vec<String> {
            let space = PsSpace::new(info.clone(), d).unwrap();
            let mut names: Vec<_> = space.genes.iter().map(|g| g.param.clone()).collect();
            names.dedup();
            names
        };
        assert_eq!(params(&ps_def()), ["max_iter"]);
        let mut d = ps_def();
        d.params = Some(vec!["max_iter".into(), "tol".into()]);
        let named = params(&d);
        assert!(named.contains(&"tol".to_string()), "{named:?}");
    }

    fn dfs_def() -> DfsDef {
        DfsDef {
            repeats: 2,
            scale_range: [0.5, 1.5],
            indicator_threshold: 0.0,
            embed_model: None,
        }
    }

    #[test]
    fn dfs_default_is_the_embedding_models_route() {
        let s = DfsSpace::new(vec![3, 2], 0, &dfs_def()).unwrap();
        // T = 2·(3+2) = 10 slots, 2 fixed → 8 indicators, + 4 W genes.
        assert_eq!(s.dim(), 12);
        let r = s.decode(&s.default_genome()).unwrap();
        let hops: Vec<(usize, usize, f32)> =
            r.hops.iter().map(|h| (h.model, h.layer, h.scale)).collect();
        // the fixed layer 0, layer 1 of rep 0, and the fixed last layer: model 0 unchanged.
        assert_eq!(hops, vec![(0, 0, 1.0), (0, 1, 1.0), (0, 2, 1.0)]);
    }

    #[test]
    fn dfs_decodes_indicators_and_scales() {
        let s = DfsSpace::new(vec![2, 2], 1, &dfs_def()).unwrap();
        // slots (rep, model, layer): rep0: (0,0),(0,1),(1,1) [model 1 layer 0 fixed];
        // rep1: (0,0),(0,1),(1,0) [model 1 layer 1 fixed] → 6 indicators, then W (2×2).
        assert_eq!(s.slots.len(), 6);
        let mut g = vec![-1.0; 6];
        g[1] = 0.3; // model 0 layer 1 in rep 0
        g[5] = 0.1; // model 1 layer 0 in rep 1
        // W = [[w00, w01], [w10, w11]] = [0.5, 0.75, 1.0, 1.5]
        g.extend([0.0, 0.25, 0.5, 1.0]);
        let r = s.decode(&g).unwrap();
        assert_eq!(r.embed_model, 1);
        let hops: Vec<(usize, usize, f32)> =
            r.hops.iter().map(|h| (h.model, h.layer, h.scale)).collect();
        assert_eq!(
            hops,
            vec![(1, 0, 1.0), (0, 1, 1.0), (1, 0, 0.75), (1, 1, 1.5)]
        );
    }
}
