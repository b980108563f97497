//! The merge planner: a [`Recipe`] and its models become a [`Plan`] — every output tensor with
//! the source tensors it is merged from and its parameters resolved — before any tensor data is
//! read. The executor then only streams.
//!
//! ```no_run
//! use evomerge::{merge::plan::plan, recipe::Recipe, store::ModelSet};
//! let recipe = Recipe::from_path("recipe.yml")?;
//! let mut models = ModelSet::new();
//! let p = plan(&recipe, &mut models)?;
//! println!("{} tensors with `{}`", p.tensors.len(), p.method.name());
//! # Ok::<(), evomerge::Error>(())
//! ```
//!
//! Semantics follow mergekit 0.1.5's `MergePlanner`:
//! - **`models` form** = one slice over all layers of every model; when a base model is given
//!   and not listed, it is added to that slice (as mergekit does).
//! - **`slices` form**: the output layers are numbered consecutively across slices; layer `i`
//!   of a slice is made from layer `start + i` of each of its sources (so a `passthrough` recipe
//!   with several slices stacks layers — a frankenmerge), and the output config's layer count is
//!   the total. Pre-layer tensors (embeddings) come from the first slice's sources and use its
//!   parameters; post-layer tensors (final norm, head) from the last slice's.
//! - **Parameters** per tensor: slice source > slice > global `parameters` > the method's declared
//!   default (see [`crate::recipe::params`]). Gradients are read at `t = i / (n − 1)` for layer `i`
//!   of an `n`-layer slice (`t = 1` when `n = 1`), at `t = 0` for pre/post-layer tensors. Global
//!   parameters' filters match the output tensor name; a model's parameters' filters match that
//!   model's input tensor name (they differ when a slice takes other layers).
//! - **Base model**: for methods that require one it goes to [`PlannedTensor::base`] and not to
//!   [`PlannedTensor::models`]. For methods that merely accept one (`BaseUse::Optional`) it goes
//!   to `base`, and also stays among `models` if the recipe lists it there (so `linear` averages
//!   a listed base with its weight, as in mergekit); for `BaseUse::OptionalApart` methods
//!   (`multislerp`, `karcher`) a listed base is taken out of `models`, as mergekit does.
//! - **Output dtype**: the recipe's `out_dtype`, else `dtype`, else the base (or first) model's
//!   stored dtype. **Config**: the base (or first) model's config.json (as mergekit), with the
//!   layer count and `torch_dtype` (and `dtype`, where present) updated. **Donor** of tokenizer files: the `tokenizer_source`
//!   model, else the base, else the first model.
//! - Models whose tensor names or shapes disagree are an [`Error::Mismatch`] listing the first
//!   differences; a head absent because a model ties its embeddings reads the embedding instead.

use std::fmt::Write;
use std::path::PathBuf;
use std::sync::Arc;

use crate::arch::{self, Position};
use crate::error::{Error, Result};
use crate::merge::{MergeMethod, Params, Scope};
use crate::recipe::params::{layer_t, resolve};
use crate::recipe::{Inputs, ModelRef, ParamMap, Recipe, TokenizerSource};
use crate::store::{ModelSet, TensorInfo, TensorSource};
use crate::tensor::DType;

/// One source tensor: a model (the path it is registered / opened under) and a tensor name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SourceRef {
    pub model: PathBuf,
    pub tensor: String,
}

/// One output tensor: where its inputs come from and the parameters to merge them with.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedTensor {
    /// Output tensor name.
    pub name: String,
    pub shape: Vec<usize>,
    /// The base model's tensor, when there is a base model.
    pub base: Option<SourceRef>,
    /// The merged models' tensors, in recipe order (see the module docs for the base model).
    pub models: Vec<SourceRef>,
    /// Per-model parameters, parallel to `models`, defaults filled in.
    pub model_params: Vec<Params>,
    /// Global parameters, defaults filled in.
    pub global: Params,
    /// For methods with an auxiliary file ([`MergeMethod::aux`]): parallel to `models`, the
    /// tensor of the same input name in `<model dir>/<aux file>` (`None` when the model has no
    /// such file; the executor treats a tensor absent from the file as `None` too). Empty for
    /// other methods.
    pub aux: Vec<Option<SourceRef>>,
}

/// A planned merge.
pub struct Plan {
    pub method: &'static dyn MergeMethod,
    /// Output tensors: pre-layer, then layer by layer, then post-layer.
    pub tensors: Vec<PlannedTensor>,
    pub out_dtype: DType,
    /// The output config.json.
    pub config: serde_json::Value,
    /// The model whose tokenizer / generation files are copied.
    pub donor: Option<PathBuf>,
    /// The recipe, as written back to YAML (for the model card).
    pub recipe_yaml: String,
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("method", &self.method.name())
            .field("tensors", &self.tensors.len())
            .field("out_dtype", &self.out_dtype)
            .field("donor", &self.donor)
            .finish()
    }
}

/// How many differences a mismatch error lists.
const MAX_LISTED: usize = 8;

/// A model opened for planning: its tensors (sorted by name), grouped by position.
struct Indexed {
    path: PathBuf,
    name: String,
    src: Arc<dyn TensorSource>,
    infos: Vec<TensorInfo>,
    pre: Vec<usize>,
    layers: Vec<Vec<LayerEntry>>,
    post: Vec<usize>,
    n_layers: usize,
    first_dtype: Option<DType>,
}

/// A layer tensor: its index in `infos`, and the byte span of the layer index in its name
/// (`None` when it could not be located; such names take the slow path through
/// [`arch::set_layer_index`]).
struct LayerEntry {
    idx: usize,
    span: Option<(usize, usize)>,
}

/// The byte span of the first purely numeric, non-final `.`-segment of `name` when it reads
/// `index` — where [`arch`] puts the layer index for every naming scheme it knows.
fn index_span(name: &str, index: usize) -> Option<(usize, usize)> {
    let mut start = 0;
    for seg in name.split('.') {
        let end = start + seg.len();
        if end < name.len() && !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) {
            return (seg.parse::<usize>().ok()? == index).then_some((start, end));
        }
        start = end + 1;
    }
    None
}

impl Indexed {
    fn open(m: &ModelRef, set: &mut ModelSet) -> Result<Indexed> {
        let src = set.get_or_open(&m.path)?;
        let mut infos = src.tensor_infos();
        if !infos.is_sorted_by(|a, b| a.name <= b.name) {
            infos.sort_by(|a, b| a.name.cmp(&b.name));
        }
        let first_dtype = infos.first().map(|t| t.dtype);
        let mut pre = Vec::new();
        let mut post = Vec::new();
        let mut layers: Vec<Vec<LayerEntry>> = Vec::new();
        for (idx, t) in infos.iter().enumerate() {
            match arch::position(&t.name) {
                Position::Pre => pre.push(idx),
                Position::Post => post.push(idx),
                Position::Layer(i) => {
                    if layers.len() <= i {
                        layers.resize_with(i + 1, Vec::new);
                    }
                    let span = index_span(&t.name, i);
                    layers[i].push(LayerEntry { idx, span });
                }
            }
        }
        let n_layers = arch::layer_count(src.config()).unwrap_or(layers.len());
        Ok(Indexed {
            path: m.path.clone(),
            name: m.name.clone(),
            src,
            infos,
            pre,
            layers,
            post,
            n_layers,
            first_dtype,
        })
    }

    fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.infos
            .binary_search_by(|t| t.name.as_str().cmp(name))
            .ok()
            .map(|i| &self.infos[i])
    }

    fn tensor_name(&self, idx: usize) -> &str {
        &self.infos[idx].name
    }

    fn layer(&self, i: usize) -> &[LayerEntry] {
        self.layers.get(i).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The name of layer entry `e` moved to layer `index`.
    fn renamed(&self, e: &LayerEntry, index: usize) -> String {
        let name = self.tensor_name(e.idx);
        match e.span {
            Some((a, b)) => {
                let mut out = String::with_capacity(name.len() + 4);
                out.push_str(&name[..a]);
                let _ = write!(out, "{index}");
                out.push_str(&name[b..]);
                out
            }
            None => arch::set_layer_index(name, index),
        }
    }

    /// The parts of entry `e`'s name around its layer index.
    fn template(&self, e: &LayerEntry) -> Option<(&str, &str)> {
        let name = self.tensor_name(e.idx);
        e.span.map(|(a, b)| (&name[..a], &name[b..]))
    }
}

/// One source of a normalised slice.
struct NSource<'r> {
    model: usize,
    start: usize,
    params: &'r ParamMap,
    /// Whether it is passed among `models` (false for a base that is only the base).
    as_model: bool,
}

struct NSlice<'r> {
    sources: Vec<NSource<'r>>,
    params: &'r ParamMap,
    /// Index into `sources` of the base model.
    base: Option<usize>,
    n: usize,
}

/// Plan `recipe`: validate it against its method, open its models through `models` (reusing
/// those already open), and resolve every output tensor. See the module docs.
pub fn plan(recipe: &Recipe, models: &mut ModelSet) -> Result<Plan> {
    plan_with(recipe, recipe.method()?, models)
}

/// [`plan`] with a given method instead of the registry's `merge_method` entry (a method of
/// your own, or a test double). The recipe is still validated against it.
pub fn plan_with(
    recipe: &Recipe,
    method: &'static dyn MergeMethod,
    models: &mut ModelSet,
) -> Result<Plan> {
    recipe.validate(method)?;
    let empty = ParamMap::new();

    // Open every referenced model once.
    let mut opened: Vec<Indexed> = Vec::new();
    let mut index_of = |m: &ModelRef, opened: &mut Vec<Indexed>| -> Result<usize> {
        if let Some(i) = opened.iter().position(|o| o.path == m.path) {
            return Ok(i);
        }
        opened.push(Indexed::open(m, models)?);
        Ok(opened.len() - 1)
    };

    let apart = !method.base().listed_base_is_a_model();
    let mut slices: Vec<NSlice<'_>> = Vec::new();
    match &recipe.inputs {
        Inputs::Models(ms) => {
            let mut sources = Vec::with_capacity(ms.len() + 1);
            let mut base = None;
            for m in ms {
                let k = index_of(&m.model, &mut opened)?;
                let is_base = recipe
                    .base_model
                    .as_ref()
                    .is_some_and(|b| b.path == m.model.path);
                if is_base {
                    base = Some(sources.len());
                }
                sources.push(NSource {
                    model: k,
                    start: 0,
                    params: &m.parameters,
                    as_model: !(is_base && apart),
                });
            }
            if let (Some(b), None) = (&recipe.base_model, base) {
                base = Some(sources.len());
                sources.push(NSource {
                    model: index_of(b, &mut opened)?,
                    start: 0,
                    params: &empty,
                    as_model: false,
                });
            }
            let n = opened[sources[0].model].n_layers;
            for s in &sources {
                let o = &opened[s.model];
                if o.n_layers != n {
                    return Err(recipe.error(format!(
                        "models: `{}` has {} layers but `{}` has {n}; the `models` form needs \
                         equal layer counts (use `slices` to pick layer ranges)",
                        o.name, o.n_layers, opened[sources[0].model].name
                    )));
                }
            }
            slices.push(NSlice {
                sources,
                params: &empty,
                base,
                n,
            });
        }
        Inputs::Slices(ss) => {
            for (i, s) in ss.iter().enumerate() {
                let base_ref = s.base_model.as_ref().or(recipe.base_model.as_ref());
                let mut sources = Vec::with_capacity(s.sources.len());
                let mut base = None;
                for (j, src) in s.sources.iter().enumerate() {
                    let k = index_of(&src.model, &mut opened)?;
                    let (a, b) = src.layer_range;
                    let o = &opened[k];
                    if b > o.n_layers {
                        return Err(recipe.error(format!(
                            "slices[{i}].sources[{j}]: layer_range [{a}, {b}] goes past the {} \
                             layers of `{}`",
                            o.n_layers, o.name
                        )));
                    }
                    let is_base = base_ref.is_some_and(|r| r.path == src.model.path);
                    if is_base {
                        base = Some(j);
                    }
                    sources.push(NSource {
                        model: k,
                        start: a,
                        params: &src.parameters,
                        as_model: !(is_base && apart),
                    });
                }
                let n = s.sources[0].layer_range.1 - s.sources[0].layer_range.0;
                slices.push(NSlice {
                    sources,
                    params: &s.parameters,
                    base,
                    n,
                });
            }
        }
    }

    let aux_file = method.aux();
    let aux_exists: Vec<bool> = opened
        .iter()
        .map(|o| aux_file.is_some_and(|f| o.path.join(f).is_file()))
        .collect();
    // Per source: the parameter levels for its per-model parameters (this model's entries in
    // the slice, the slice, the recipe).
    let model_levels: Vec<Vec<Vec<&ParamMap>>> = slices
        .iter()
        .map(|s| {
            s.sources
                .iter()
                .map(|src| {
                    let mut levels: Vec<&ParamMap> = s
                        .sources
                        .iter()
                        .filter(|x| x.model == src.model)
                        .map(|x| x.params)
                        .collect();
                    levels.push(s.params);
                    levels.push(&recipe.parameters);
                    levels
                })
                .collect()
        })
        .collect();

    let mut planner = Planner {
        recipe,
        method,
        opened: &opened,
        aux_file,
        aux_exists: &aux_exists,
        tensors: Vec::new(),
        diffs: Vec::new(),
    };

    // Pre-layer tensors from the first slice, t = 0.
    let (first, last) = (0, slices.len() - 1);
    let reference = &opened[slices[first].sources[0].model];
    for &idx in &reference.pre {
        let name = reference.tensor_name(idx);
        planner.tensor(
            &slices[first],
            &model_levels[first],
            name.to_string(),
            |_, _| name.to_string(),
            0.0,
        )?;
    }
    // Layers, numbered consecutively across slices.
    let mut out_layer = 0usize;
    for (si, s) in slices.iter().enumerate() {
        let reference = &opened[s.sources[0].model];
        for i in 0..s.n {
            let t = layer_t(i, s.n);
            let ref_layer = s.sources[0].start + i;
            let ref_entries = reference.layer(ref_layer);
            // Sources whose layer holds the same tensors in the same order map by position
            // (the common case); others go name by name.
            let aligned: Vec<Option<&[LayerEntry]>> = s
                .sources
                .iter()
                .map(|src| {
                    let o = &opened[src.model];
                    let entries = o.layer(src.start + i);
                    let same = entries.len() == ref_entries.len()
                        && entries.iter().zip(ref_entries).all(|(e, r)| {
                            let te = o.template(e);
                            te.is_some() && te == reference.template(r)
                        });
                    same.then_some(entries)
                })
                .collect();
            for (k, r) in ref_entries.iter().enumerate() {
                let out = reference.renamed(r, out_layer);
                planner.tensor(
                    s,
                    &model_levels[si],
                    out,
                    |j, src| match aligned[j] {
                        Some(entries) => opened[src.model].tensor_name(entries[k].idx).to_string(),
                        None => reference.renamed(r, src.start + i),
                    },
                    t,
                )?;
            }
            // Tensors a source has in this layer that the reference lacks.
            for (j, src) in s.sources.iter().enumerate().skip(1) {
                if aligned[j].is_some() {
                    continue;
                }
                let o = &opened[src.model];
                for e in o.layer(src.start + i) {
                    let as_ref = o.renamed(e, ref_layer);
                    if reference.get(&as_ref).is_none() {
                        planner.diff(format!(
                            "`{}` is in `{}` but `{as_ref}` is missing from `{}`",
                            o.tensor_name(e.idx),
                            o.name,
                            reference.name
                        ));
                    }
                }
            }
            out_layer += 1;
        }
    }
    // Post-layer tensors from the last slice, t = 0.
    let reference = &opened[slices[last].sources[0].model];
    for &idx in &reference.post {
        let name = reference.tensor_name(idx);
        planner.tensor(
            &slices[last],
            &model_levels[last],
            name.to_string(),
            |_, _| name.to_string(),
            0.0,
        )?;
    }
    for (si, pre) in [(first, true), (last, false)] {
        let s = &slices[si];
        let reference = &opened[s.sources[0].model];
        for src in &s.sources[1..] {
            let o = &opened[src.model];
            for &idx in if pre { &o.pre } else { &o.post } {
                let name = o.tensor_name(idx);
                if reference.get(name).is_none()
                    && arch::tied_source(reference.src.as_ref(), name).is_none()
                {
                    planner.diff(format!(
                        "`{name}` is in `{}` but missing from `{}`",
                        o.name, reference.name
                    ));
                }
            }
        }
    }

    if !planner.diffs.is_empty() {
        let total = planner.diffs.len();
        let mut msg = planner.diffs[..total.min(MAX_LISTED)].join("; ");
        if total > MAX_LISTED {
            msg.push_str(&format!("; ... {} more differences", total - MAX_LISTED));
        }
        return Err(Error::Mismatch(msg));
    }
    let tensors = planner.tensors;

    // Output dtype, config, donor.
    let config_model = match &recipe.base_model {
        Some(b) => opened.iter().find(|o| o.path == b.path),
        None => None,
    }
    .unwrap_or(&opened[slices[first].sources[0].model]);
    let out_dtype = recipe
        .out_dtype
        .or(recipe.dtype)
        .or(config_model.first_dtype)
        .unwrap_or(DType::F32);
    let mut config = config_model.src.config().clone();
    if let Some(obj) = config.as_object_mut()
        && let Some(key) = arch::layer_count_key(&serde_json::Value::Object(obj.clone()))
    {
        obj.insert(key.to_string(), out_layer.into());
    }
    set_config_dtype(&mut config, out_dtype);
    let donor = match &recipe.tokenizer_source {
        Some(TokenizerSource::Model(m)) => Some(crate::store::lora::base_dir_of(&m.path)),
        _ => Some(crate::store::lora::base_dir_of(&config_model.path)),
    };

    Ok(Plan {
        method,
        tensors,
        out_dtype,
        config,
        donor: donor.filter(|d| !d.as_os_str().is_empty()),
        recipe_yaml: recipe.to_yaml(),
    })
}

/// Record `dtype` in a config.json: `torch_dtype`, and `dtype` too where the config has that key
/// (transformers ≥ 4.56 writes both), so the two never disagree.
pub fn set_config_dtype(config: &mut serde_json::Value, dtype: DType) {
    if let Some(obj) = config.as_object_mut() {
        obj.insert("torch_dtype".into(), dtype.torch_name().into());
        if obj.contains_key("dtype") {
            obj.insert("dtype".into(), dtype.torch_name().into());
        }
    }
}

struct Planner<'a> {
    recipe: &'a Recipe,
    method: &'static dyn MergeMethod,
    opened: &'a [Indexed],
    aux_file: Option<&'static str>,
    aux_exists: &'a [bool],
    tensors: Vec<PlannedTensor>,
    diffs: Vec<String>,
}

impl Planner<'_> {
    fn diff(&mut self, d: String) {
        if self.diffs.len() <= MAX_LISTED * 4 {
            self.diffs.push(d);
        }
    }

    /// The input name of `name` in model `o`: itself, or the embedding a tied head stands for.
    fn input_name(&self, o: &Indexed, name: String) -> Option<String> {
        if o.get(&name).is_some() {
            return Some(name);
        }
        arch::tied_source(o.src.as_ref(), &name)
    }

    /// Plan one output tensor `out` of slice `s`; `input` maps a source (its index in the slice
    /// and itself) to its input name; `levels[j]` are source `j`'s per-model parameter levels.
    fn tensor(
        &mut self,
        s: &NSlice<'_>,
        levels: &[Vec<&ParamMap>],
        out: String,
        input: impl Fn(usize, &NSource<'_>) -> String,
        t: f64,
    ) -> Result<()> {
        let reference = &self.opened[s.sources[0].model];
        let ref_name = input(0, &s.sources[0]);
        let Some(ref_info) = reference.get(&ref_name) else {
            self.diff(format!("`{ref_name}` is missing from `{}`", reference.name));
            return Ok(());
        };
        let shape = ref_info.shape.clone();

        // Input names per source, checking presence and shape.
        let mut names: Vec<String> = Vec::with_capacity(s.sources.len());
        let mut ok = true;
        for (j, src) in s.sources.iter().enumerate() {
            let o = &self.opened[src.model];
            let wanted = if j == 0 {
                ref_name.clone()
            } else {
                input(j, src)
            };
            match self.input_name(o, wanted.clone()) {
                None => {
                    self.diff(format!("`{wanted}` is missing from `{}`", o.name));
                    ok = false;
                }
                Some(n) => {
                    let info = o.get(&n).expect("input names are present");
                    if info.shape != shape {
                        self.diff(format!(
                            "`{n}` has shape {:?} in `{}` but `{ref_name}` has {shape:?} in `{}`",
                            info.shape, o.name, reference.name
                        ));
                        ok = false;
                    }
                    names.push(n);
                }
            }
        }
        if !ok {
            return Ok(());
        }

        let decls = self.method.params();
        let recipe = self.recipe;
        let mname = self.method.name();
        let missing = |param: &str, model: Option<&str>| {
            recipe.error(format!(
                "tensor `{out}`: required parameter `{param}` of `{mname}` is not set{}",
                model
                    .map(|m| format!(" for model `{m}` (its filters match no entry)"))
                    .unwrap_or_else(|| " (its filters match no entry)".into())
            ))
        };

        // Global parameters: slice, then recipe level, matched against the output name.
        let mut global = Params::default();
        let shared_levels = [s.params, &recipe.parameters];
        for d in decls.iter().filter(|d| d.scope == Scope::Global) {
            let v = resolve(d.name, &shared_levels, &out, t)
                .or(d.default)
                .ok_or_else(|| missing(d.name, None))?;
            global.set(d.name, v);
        }

        let mut models = Vec::with_capacity(s.sources.len());
        let mut model_params = Vec::with_capacity(s.sources.len());
        let mut aux = Vec::new();
        let mut base = None;
        for (j, src) in s.sources.iter().enumerate() {
            let o = &self.opened[src.model];
            let sref = SourceRef {
                model: o.path.clone(),
                tensor: names[j].clone(),
            };
            if s.base == Some(j) {
                base = Some(sref.clone());
            }
            if !src.as_model {
                continue;
            }
            // Per-model parameters: this model's sources, slice, recipe; matched against the
            // model's own input name.
            let mut p = Params::default();
            for d in decls.iter().filter(|d| d.scope == Scope::PerModel) {
                let v = resolve(d.name, &levels[j], &names[j], t)
                    .or(d.default)
                    .ok_or_else(|| missing(d.name, Some(&o.name)))?;
                p.set(d.name, v);
            }
            if let Some(f) = self.aux_file {
                aux.push(self.aux_exists[src.model].then(|| SourceRef {
                    model: o.path.join(f),
                    tensor: names[j].clone(),
                }));
            }
            models.push(sref);
            model_params.push(p);
        }

        self.tensors.push(PlannedTensor {
            name: out,
            shape,
            base,
            models,
            model_params,
            global,
            aux,
        });
        Ok(())
    }
}
