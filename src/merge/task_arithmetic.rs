//! The task-arithmetic family as one generalized pipeline, with eight registered presets.
//!
//! ```text
//! δ_j  = θ_j − θ_base                                   task vector (Ilharco et al. 2023)
//! δ'_j = sparsify(δ_j; density_j, gamma_j, ε_j) · s_j    s_j = L1 rescale when `rescale`
//! u_j  = w_j · δ'_j
//! consensus (sum): σ = sign(Σ_j u_j) (σ = + when the sum is 0);  m_j = [sign(u_j) = σ]
//!                  (no consensus: m_j = 1)
//! Δ    = Σ_j m_j u_j
//! Δ   /= Σ_j m_j w_j   (elementwise; 0 → 1)   with consensus,  when `normalize`
//! Δ   /= Σ_j w_j       (|·| < 1e-8 → 1)       without,         when `normalize`
//! θ    = θ_base + λ · Δ
//! ```
//!
//! | key | sparsify | consensus | normalize | rescale | paper |
//! |---|---|---|---|---|---|
//! | `task_arithmetic` | — | — | false | false | Ilharco et al. 2023, "Editing models with task arithmetic" (ICLR) |
//! | `ties` | magnitude | sum | true | false | Yadav et al. 2023, "TIES-Merging" (NeurIPS) |
//! | `dare_ties` | random | sum | false | true | Yu et al. 2024, "Language models are Super Mario" (ICML) |
//! | `dare_linear` | random | — | false | true | Yu et al. 2024 |
//! | `breadcrumbs` | top γ + bottom | — | false | false | Davari & Belilovsky 2024, "Model Breadcrumbs" (ECCV) |
//! | `breadcrumbs_ties` | top γ + bottom | sum | false | false | Davari & Belilovsky 2024 |
//! | `della` | MAGPRUNE | sum | true | true | Deep et al. 2024, "DELLA-Merging" |
//! | `della_linear` | MAGPRUNE | — | false | true | Deep et al. 2024 |
//!
//! Defaults and formulas are mergekit 0.1.5's (`generalized_task_arithmetic.py`, `sparsify.py`);
//! see [`super::sparsify`] for the sparsifiers. `int8_mask` is accepted for recipe compatibility
//! and changes nothing (it only picks mergekit's mask dtype). Unlike mergekit, which declares
//! `density` for `task_arithmetic` too, `task_arithmetic` does not declare it: it has no
//! sparsification, so a `density` there would be a dead search gene.
//!
//! Declared ranges (`weight` and `density` in [0, 1], `lambda` in [0, 2], `gamma` in [0, 1],
//! `epsilon` in [0, 0.5]) are the search's gene bounds; a recipe may use any value, as in
//! mergekit (negative weights negate a task vector).
//!
//! Every preset streams (see [`super::stream`]): the selection passes of [`super::sparsify`]
//! (none for `task_arithmetic`; a sampled and a counting pass for TIES and Breadcrumbs; a mask
//! pass for DARE), then one fused pass per chunk — task vectors recomputed from the inputs,
//! weighted, elected, summed, normalised — so nothing of the tensor's size is held but DARE's
//! bitset (one bit per entry). DELLA ranks each row, so its chunks are whole rows: one pass
//! draws every row's MAGPRUNE mask (kept as a bitset, one bit per entry) and sums the L1 norms
//! for the rescale in the same order as the whole-tensor form, so the bits are the same.
//! DELLA over tensors of three or more axes whose rows are strided (`[d0, len, inner > 1]`)
//! takes whole tensors.
//!
//! The pipeline computes in `f32` and the executor rounds only the output. mergekit computes in
//! the recipe's `dtype`, rounding every torch operation to it; `evomerge merge --compute-dtype
//! recipe` ([`MergeMethod::stream_in`]) reproduces that bit for bit for `task_arithmetic` (the
//! steps and the torch rounding rules, each verified by experiment, are at [`Rounded`]). The
//! other presets refuse it for a `bf16` / `f16` dtype: their selections already differ from
//! mergekit's at tied magnitudes (README, "Ties at a cut") or draw from another RNG.

use rayon::prelude::*;

use super::select::{Keep, LocalRule, Part, Selector, abs_bits};
use super::sparsify::{
    Kept, L1Fold, L1Piece, RowProbs, Sparsify, SparsifyArgs, della_chunk, della_rows, l1_scale,
    selector, sparsify,
};
use super::stream::{
    Chunk, Partial, Pass, STREAM_CHUNK, Stream, StreamSpec, downcast, rounding, run_in_memory,
};
use super::util::{base, check, check_spec, global, global_flag, per_model, tensor_err};
use super::{BaseUse, MergeInput, MergeMethod, ParamDecl, ParamKind, Scope};
use crate::error::Result;
use crate::simd::avx2_fn;
use crate::tensor::DType;

/// One configuration of the pipeline.
#[derive(Debug)]
pub struct Preset {
    /// Registry key.
    pub name: &'static str,
    pub sparsify: Option<Sparsify>,
    /// Sign consensus by the sign of the summed weighted task vectors (TIES's election).
    pub consensus: bool,
    /// The declared parameters (defaults differ per preset).
    pub params: &'static [ParamDecl],
}

/// A task-arithmetic-family method: the generalized pipeline with one [`Preset`].
#[derive(Debug)]
pub struct TaskArithmetic {
    pub preset: Preset,
}

const fn flag(name: &'static str, default: bool, doc: &'static str) -> ParamDecl {
    ParamDecl {
        name,
        scope: Scope::Global,
        kind: ParamKind::Bool,
        default: Some(if default { 1.0 } else { 0.0 }),
        searched: true,
        doc,
    }
}

const fn normalize(default: bool) -> ParamDecl {
    flag(
        "normalize",
        default,
        "divide the summed task vectors by the summed weights (of agreeing entries)",
    )
}

const fn rescale(default: bool) -> ParamDecl {
    flag(
        "rescale",
        default,
        "scale kept entries so each task vector keeps its L1 norm",
    )
}

const INT8_MASK: ParamDecl = flag(
    "int8_mask",
    false,
    "mergekit's int8 mask dtype (no effect on the result)",
);
const LAMBDA: ParamDecl = ParamDecl {
    name: "lambda",
    scope: Scope::Global,
    kind: ParamKind::Float { min: 0.0, max: 2.0 },
    default: Some(1.0),
    searched: true,
    doc: "scale of the merged task vector",
};
const WEIGHT: ParamDecl = ParamDecl {
    name: "weight",
    scope: Scope::PerModel,
    kind: ParamKind::Float { min: 0.0, max: 1.0 },
    default: None,
    searched: true,
    doc: "weight of this model's task vector",
};
const DENSITY: ParamDecl = ParamDecl {
    name: "density",
    scope: Scope::PerModel,
    kind: ParamKind::Float { min: 0.0, max: 1.0 },
    default: Some(1.0),
    searched: true,
    doc: "share of the task vector's entries to keep",
};
const GAMMA: ParamDecl = ParamDecl {
    name: "gamma",
    scope: Scope::PerModel,
    kind: ParamKind::Float { min: 0.0, max: 1.0 },
    default: Some(0.01),
    searched: true,
    doc: "share of the largest-magnitude entries to drop",
};
const EPSILON: ParamDecl = ParamDecl {
    name: "epsilon",
    scope: Scope::PerModel,
    kind: ParamKind::Float { min: 0.0, max: 0.5 },
    default: Some(0.15),
    searched: true,
    doc: "spread of keep probabilities: density ± epsilon by magnitude rank",
};

macro_rules! preset {
    ($static:ident, $name:literal, $sparsify:expr, $consensus:expr, $norm:expr, $rescale:expr
     $(, $extra:expr)*) => {
        #[doc = concat!("The `", $name, "` preset.")]
        pub static $static: TaskArithmetic = TaskArithmetic {
            preset: Preset {
                name: $name,
                sparsify: $sparsify,
                consensus: $consensus,
                params: &[
                    WEIGHT,
                    $($extra,)*
                    LAMBDA,
                    normalize($norm),
                    rescale($rescale),
                    INT8_MASK,
                ],
            },
        };
    };
}

preset!(
    TASK_ARITHMETIC,
    "task_arithmetic",
    None,
    false,
    false,
    false
);
preset!(
    TIES,
    "ties",
    Some(Sparsify::Magnitude),
    true,
    true,
    false,
    DENSITY
);
preset!(
    DARE_TIES,
    "dare_ties",
    Some(Sparsify::Random),
    true,
    false,
    true,
    DENSITY
);
preset!(
    DARE_LINEAR,
    "dare_linear",
    Some(Sparsify::Random),
    false,
    false,
    true,
    DENSITY
);
preset!(
    BREADCRUMBS,
    "breadcrumbs",
    Some(Sparsify::Breadcrumbs),
    false,
    false,
    false,
    DENSITY,
    GAMMA
);
preset!(
    BREADCRUMBS_TIES,
    "breadcrumbs_ties",
    Some(Sparsify::Breadcrumbs),
    true,
    false,
    false,
    DENSITY,
    GAMMA
);
preset!(
    DELLA,
    "della",
    Some(Sparsify::Della),
    true,
    true,
    true,
    DENSITY,
    EPSILON
);
preset!(
    DELLA_LINEAR,
    "della_linear",
    Some(Sparsify::Della),
    false,
    false,
    true,
    DENSITY,
    EPSILON
);

impl MergeMethod for TaskArithmetic {
    fn name(&self) -> &'static str {
        self.preset.name
    }

    fn params(&self) -> &'static [ParamDecl] {
        self.preset.params
    }

    fn base(&self) -> BaseUse {
        BaseUse::Required
    }

    fn model_count(&self) -> (usize, Option<usize>) {
        (1, None)
    }

    fn merge(&self, input: &MergeInput<'_>) -> Result<Vec<f32>> {
        let n = check(self, input)?;
        let b = base(self, input)?;
        if let Some(stream) = self.stream(&input.spec())? {
            return run_in_memory(stream, n, Some(b), &input.models);
        }
        self.della_whole(input)
    }

    fn stream(&self, spec: &StreamSpec<'_>) -> Result<Option<Box<dyn Stream>>> {
        check_spec(self, spec)?;
        let n = spec.numel();
        let rescale = global_flag(self.name(), spec, "rescale")?;
        if self.preset.sparsify == Some(Sparsify::Della) {
            return self.della_stream(spec, rescale);
        }
        let selectors = (0..spec.models)
            .map(|j| match self.preset.sparsify {
                None => Ok(Selector::decided(n, Keep::All, 1.0)),
                Some(kind) => Ok(selector(kind, n, &self.sparsify_args(spec, j, rescale)?)),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Box::new(self.pipeline(spec, selectors)?)))
    }

    /// mergekit's arithmetic in `bf16` / `f16` is implemented for the preset without
    /// sparsification or consensus (`task_arithmetic`); see [`Rounded`].
    fn computes_in(&self, dtype: DType) -> bool {
        dtype == DType::F32 || (self.preset.sparsify.is_none() && !self.preset.consensus)
    }

    fn stream_in(&self, spec: &StreamSpec<'_>, dtype: DType) -> Result<Option<Box<dyn Stream>>> {
        if dtype == DType::F32 {
            return self.stream(spec);
        }
        if !self.computes_in(dtype) {
            return Err(tensor_err(
                self.name(),
                spec.tensor,
                format!("mergekit's {dtype} arithmetic is not implemented for this method"),
            ));
        }
        check_spec(self, spec)?;
        let name = self.name();
        let r = rounding(dtype);
        // torch.tensor(weights, dtype=…): each Python float to f32, then to `dtype`
        let weights = (0..spec.models)
            .map(|j| per_model(name, spec, j, "weight").map(|w| r(w as f32)))
            .collect::<Result<Vec<f32>>>()?;
        let divisor = global_flag(name, spec, "normalize")?.then(|| {
            let d = r(weights.iter().fold(0.0f32, |acc, &w| acc + w));
            if d.abs() < 1e-8 { 1.0 } else { d }
        });
        let lambda = global(name, spec, "lambda")? as f32;
        Ok(Some(Box::new(Rounded {
            weights,
            divisor,
            lambda: (lambda != 1.0).then_some(lambda),
            round: r,
        })))
    }
}

/// `task_arithmetic` in mergekit's arithmetic for a `bf16` / `f16` recipe `dtype`
/// (`generalized_task_arithmetic.py`, torch on CPU), each step rounded to the dtype (`r`):
///
/// ```text
/// b, x_j = r(inputs)                          mergekit casts its inputs to `dtype`
/// w_j    = r(f32(weight_j))                   the weights tensor is built in the deltas' dtype
/// u_j    = r(r(x_j − b) · w_j)                delta, then deltas.mul_(weights)
/// S      = r(0 + u_0 + u_1 + …)               sum(dim=0): f32 accumulator, in model order
/// S      = r(S / D),  D = r(Σ_j w_j) (|D| < 1e-8 → 1)     when `normalize`
/// S      = r(S · f32(λ))                      when λ ≠ 1 (a Python scalar: f32 on CPU)
/// θ      = r(b + S)
/// ```
///
/// Each step verified against torch 2.x on CPU: elementwise `bf16` / `f16` ops compute in
/// `f32` and round to nearest even once; `sum(dim=0)` adds in `f32` from `+0`, model by model,
/// and rounds once (`[1, 2³⁰, −2³⁰]` sums to 0, `[2³⁰, −2³⁰, 1]` to 1); a Python float weight
/// or scalar goes through `f32` first (`1 + 2⁻⁸ + 2⁻⁴⁰` becomes `1` in `bf16`, not `1 + 2⁻⁷`).
struct Rounded {
    weights: Vec<f32>,
    divisor: Option<f32>,
    lambda: Option<f32>,
    round: fn(f32) -> f32,
}

impl Stream for Rounded {
    fn apply(&self, chunk: &Chunk<'_>, out: &mut [f32]) -> Result<()> {
        let r = self.round;
        let b = chunk.base.expect("the task-arithmetic family has a base");
        for (i, o) in out.iter_mut().enumerate() {
            let bi = r(b[i]);
            let mut sum = 0.0f32;
            for (m, &w) in chunk.models.iter().zip(&self.weights) {
                sum += r(r(r(m[i]) - bi) * w);
            }
            let mut s = r(sum);
            if let Some(d) = self.divisor {
                s = r(s / d);
            }
            if let Some(l) = self.lambda {
                s = r(s * l);
            }
            *o = r(bi + s);
        }
        Ok(())
    }
}

impl TaskArithmetic {
    /// DELLA over whole tensors (rows strided, `[d0, len, inner > 1]`): MAGPRUNE masks from
    /// whole rows first, then the same fused pass.
    fn della_whole(&self, input: &MergeInput<'_>) -> Result<Vec<f32>> {
        let n = check(self, input)?;
        let b = base(self, input)?;
        let name = self.name();
        let spec = input.spec();
        let kind = self
            .preset
            .sparsify
            .expect("only sparsifying presets take whole tensors");
        let rescale = global_flag(name, input, "rescale")?;
        let selectors = (0..input.models.len())
            .into_par_iter()
            .map(|j| {
                let args = self.sparsify_args(&spec, j, rescale)?;
                let s = sparsify(kind, input.models[j], b, input.shape, &args)
                    .map_err(|e| tensor_err(name, input.tensor, format!("model {j}: {e}")))?;
                let keep = match s.kept {
                    Kept::All => Keep::All,
                    Kept::Nothing => Keep::Nothing,
                    Kept::Mask(words) => Keep::Bits(words),
                };
                Ok(Selector::decided(n, keep, s.scale))
            })
            .collect::<Result<Vec<_>>>()?;
        let stream = self.pipeline(&spec, selectors)?;
        run_in_memory(Box::new(stream), n, Some(b), &input.models)
    }

    /// DELLA streamed over chunks of whole rows (rows along axis 1 contiguous: tensors of one
    /// or two axes, or more with trailing axes of size 1); `None` otherwise.
    fn della_stream(
        &self,
        spec: &StreamSpec<'_>,
        rescale: bool,
    ) -> Result<Option<Box<dyn Stream>>> {
        let n = spec.numel();
        let shape = spec.shape;
        let (len, inner) = if shape.len() < 2 {
            (n, 1)
        } else {
            (shape[1], shape[2..].iter().product::<usize>())
        };
        if inner != 1 || len > MAX_ROW || len == 0 {
            return Ok(None);
        }
        let mut selectors = Vec::new();
        let mut rows = Vec::new();
        for j in 0..spec.models {
            let args = self.sparsify_args(spec, j, rescale)?;
            let r = della_rows(&args, len)
                .map_err(|e| tensor_err(self.name(), spec.tensor, format!("model {j}: {e}")))?;
            let keep = match (&r, args.density >= 1.0) {
                (None, true) | (Some(_), _) => Keep::All,
                (None, false) => Keep::Nothing,
            };
            selectors.push(Selector::decided(n, keep, 1.0));
            rows.push(r);
        }
        let mut stream = self.pipeline(spec, selectors)?;
        stream.della = Some(Della {
            n,
            len,
            rows,
            rescale,
            masks: Vec::new(),
            phase: DellaPhase::Start,
        });
        Ok(Some(Box::new(stream)))
    }

    /// Model `j`'s sparsification parameters (those the preset does not declare are 0).
    fn sparsify_args(
        &self,
        spec: &StreamSpec<'_>,
        j: usize,
        rescale: bool,
    ) -> Result<SparsifyArgs> {
        let get = |p: &str| -> Result<f64> {
            if self.params().iter().any(|d| d.name == p) {
                per_model(self.name(), spec, j, p)
            } else {
                Ok(0.0)
            }
        };
        Ok(SparsifyArgs {
            density: get("density")?,
            gamma: get("gamma")?,
            epsilon: get("epsilon")?,
            rescale,
            seed: spec.seed,
            model: j as u64,
        })
    }

    /// The fused pipeline over one tensor, given each model's selection.
    fn pipeline(&self, spec: &StreamSpec<'_>, selectors: Vec<Selector>) -> Result<TaStream> {
        let name = self.name();
        let weights = (0..spec.models)
            .map(|j| per_model(name, spec, j, "weight").map(|w| w as f32))
            .collect::<Result<Vec<f32>>>()?;
        let mut total: f32 = weights.iter().sum();
        if total.abs() < 1e-8 {
            total = 1.0;
        }
        Ok(TaStream {
            active: vec![false; spec.models],
            selectors,
            weights,
            lambda: global(name, spec, "lambda")? as f32,
            normalize: global_flag(name, spec, "normalize")?,
            consensus: self.preset.consensus,
            total,
            della: None,
        })
    }
}

/// The streamed pipeline: the selectors' passes, then the fused per-chunk merge.
struct TaStream {
    selectors: Vec<Selector>,
    /// Which selectors take part in the current pass.
    active: Vec<bool>,
    weights: Vec<f32>,
    lambda: f32,
    normalize: bool,
    consensus: bool,
    /// Σ w_j (1 when |Σ| < 1e-8).
    total: f32,
    /// DELLA's per-row masks, when the preset is DELLA.
    della: Option<Della>,
}

/// Longest row DELLA streams (a chunk holds at least one row of each input).
const MAX_ROW: usize = 1 << 22;

/// DELLA's streamed state: chunks are whole rows of `len`; one pass draws the masks.
struct Della {
    n: usize,
    len: usize,
    /// Per model: the rows' keep probabilities, `None` when it keeps all or nothing.
    rows: Vec<Option<RowProbs>>,
    rescale: bool,
    /// Per model, per chunk: the chunk's keep bitset (bit `i` for the chunk's entry `i`).
    masks: Vec<Vec<Vec<u64>>>,
    phase: DellaPhase,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum DellaPhase {
    Start,
    Drawing,
    Drawn,
}

/// One chunk's DELLA pass: per model, the bitset and the L1 piece (MAGPRUNE models only).
type DellaPart = Vec<Option<(Vec<u64>, Option<L1Piece>)>>;

impl Della {
    fn observe(&self, chunk: &Chunk<'_>) -> DellaPart {
        let b = chunk.base.expect("the task-arithmetic family has a base");
        self.rows
            .iter()
            .zip(chunk.models)
            .map(|(rows, m)| {
                rows.as_ref()
                    .map(|r| della_chunk(r, chunk.start, m, b, self.rescale))
            })
            .collect()
    }

    /// Keep the pass's masks and set each MAGPRUNE model's rescale factor.
    fn absorb(&mut self, partials: Vec<Partial>, selectors: &mut [Selector]) {
        let k = self.rows.len();
        let mut folds: Vec<L1Fold> = (0..k).map(|_| L1Fold::new(self.n)).collect();
        self.masks = (0..k).map(|_| Vec::new()).collect();
        for chunk in downcast::<DellaPart>(partials) {
            for (j, part) in chunk.into_iter().enumerate() {
                if let Some((words, piece)) = part {
                    if let Some(piece) = piece {
                        folds[j].add(&piece);
                    }
                    self.masks[j].push(words);
                }
            }
        }
        for ((sel, rows), fold) in selectors.iter_mut().zip(&self.rows).zip(folds) {
            if rows.is_some() {
                let scale = if self.rescale {
                    l1_scale(fold.finish())
                } else {
                    1.0
                };
                *sel = Selector::decided(self.n, Keep::All, scale);
            }
        }
    }
}

thread_local! {
    /// Per-thread scratch for one chunk: the models' weighted task vectors, their sum, the
    /// elected weights.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Stream for TaStream {
    fn chunk_len(&self) -> usize {
        match &self.della {
            Some(d) => d.len * (STREAM_CHUNK / d.len).max(1),
            None => STREAM_CHUNK,
        }
    }

    fn next_pass(&mut self, mut partials: Vec<Partial>) -> Result<Option<Pass>> {
        if let Some(d) = &mut self.della {
            match d.phase {
                DellaPhase::Start => {
                    d.phase = DellaPhase::Drawing;
                    self.active = vec![false; self.selectors.len()];
                    return Ok(Some(Pass::All));
                }
                DellaPhase::Drawing => {
                    d.absorb(std::mem::take(&mut partials), &mut self.selectors);
                    d.phase = DellaPhase::Drawn;
                }
                DellaPhase::Drawn => {}
            }
        }
        if !partials.is_empty() {
            let k = self.selectors.len();
            let mut per_model: Vec<Vec<Part>> = (0..k).map(|_| Vec::new()).collect();
            for chunk in downcast::<Vec<Option<Part>>>(partials) {
                for (j, part) in chunk.into_iter().enumerate() {
                    if let Some(p) = part {
                        per_model[j].push(p);
                    }
                }
            }
            for ((sel, parts), active) in self.selectors.iter_mut().zip(per_model).zip(&self.active)
            {
                if *active {
                    sel.absorb(parts);
                }
            }
        }
        let wants: Vec<Option<Pass>> = self.selectors.iter().map(Selector::pass).collect();
        self.active = wants.iter().map(Option::is_some).collect();
        Ok(if wants.iter().all(Option::is_none) {
            None
        } else if wants.contains(&Some(Pass::All)) {
            Some(Pass::All)
        } else {
            wants.into_iter().flatten().next()
        })
    }

    fn observe(&self, chunk: &Chunk<'_>) -> Result<Partial> {
        if let Some(d) = self
            .della
            .as_ref()
            .filter(|d| d.phase == DellaPhase::Drawing)
        {
            return Ok(Box::new(d.observe(chunk)));
        }
        let b = chunk.base.expect("the task-arithmetic family has a base");
        let parts: Vec<Option<Part>> = self
            .selectors
            .iter()
            .zip(&self.active)
            .zip(chunk.models)
            .map(|((sel, &active), m)| active.then(|| sel.observe(chunk.index, chunk.start, m, b)))
            .collect();
        Ok(Box::new(parts))
    }

    fn apply(&self, chunk: &Chunk<'_>, out: &mut [f32]) -> Result<()> {
        let base = chunk.base.expect("the task-arithmetic family has a base");
        let k = self.selectors.len();
        // window rules relative to the chunk (finding a cut's entry scans its chunk once), and
        // DARE's draws for the chunk
        let rules: Vec<ChunkKeep> = self
            .selectors
            .iter()
            .zip(chunk.models)
            .enumerate()
            .map(|(j, (sel, m))| match sel.keep() {
                Keep::All if self.della.as_ref().is_some_and(|d| d.rows[j].is_some()) => {
                    let d = self.della.as_ref().expect("della");
                    ChunkKeep::Bits(d.masks[j][chunk.index].clone())
                }
                Keep::Window(rule) => ChunkKeep::Rule(rule.local(chunk.index, m, base)),
                Keep::Random(d) => {
                    let mut draws = vec![0u32; m.len()];
                    d.fill(chunk.start, &mut draws);
                    ChunkKeep::Draws(draws, d.threshold())
                }
                _ => ChunkKeep::Whole,
            })
            .collect();
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            scratch.resize((k + 2) * BLOCK, 0.0);
            // blocks small enough that every array of the fused pass stays in L1/L2
            for off in (0..out.len()).step_by(BLOCK) {
                let len = BLOCK.min(out.len() - off);
                let block = Block {
                    start: chunk.start + off,
                    offset: off,
                    base: &base[off..off + len],
                };
                let models: Vec<&[f32]> = chunk.models.iter().map(|m| &m[off..off + len]).collect();
                let o = &mut out[off..off + len];
                merge_block(self, &block, &models, &rules, &mut scratch, o);
            }
        });
        Ok(())
    }
}

/// A selection made concrete for one chunk.
enum ChunkKeep {
    /// Nothing chunk-specific (all, nothing, or a whole-tensor bitset).
    Whole,
    /// A rank window's rule, indices relative to the chunk.
    Rule(LocalRule),
    /// DARE's draws for the chunk's entries, and the survival threshold.
    Draws(Vec<u32>, u32),
    /// DELLA's keep bitset for the chunk's entries (bit `i` for entry `i` of the chunk).
    Bits(Vec<u64>),
}

/// Elements of a chunk merged together by [`TaStream::merge_block`]: a multiple of 64 (bitset
/// words), small enough that `k + 3` arrays of it stay in L1/L2.
const BLOCK: usize = 2048;

/// Where a block lies.
struct Block<'a> {
    /// First element in the tensor.
    start: usize,
    /// First element in its chunk.
    offset: usize,
    base: &'a [f32],
}

impl TaStream {
    /// The fused pipeline over one block: weighted, selected task vectors, then consensus and
    /// sum, normalisation, λ and the base (called through the run-time dispatch `merge_block`).
    #[inline(always)]
    fn merge_block_body(
        s: &TaStream,
        block: &Block<'_>,
        models: &[&[f32]],
        rules: &[ChunkKeep],
        scratch: &mut [f32],
        o: &mut [f32],
    ) {
        let (bb, len, k) = (block.base, o.len(), s.selectors.len());
        let lambda = s.lambda;
        let (deltas, rest) = scratch.split_at_mut(k * BLOCK);
        let (sum, div) = rest.split_at_mut(BLOCK);
        let (sum, div) = (&mut sum[..len], &mut div[..len]);
        for (j, sel) in s.selectors.iter().enumerate() {
            let d = &mut deltas[j * BLOCK..j * BLOCK + len];
            let m = models[j];
            let (scale, w) = (sel.scale(), s.weights[j]);
            match (sel.keep(), &rules[j]) {
                // blocks start at multiples of BLOCK in their chunk: whole words
                (_, ChunkKeep::Bits(words)) => {
                    masked_deltas(d, m, bb, &words[block.offset / 64..], scale, w)
                }
                (Keep::All, _) => {
                    for ((d, &m), &b) in d.iter_mut().zip(m).zip(bb) {
                        *d = (m - b) * scale * w;
                    }
                }
                (Keep::Nothing, _) => d.fill(0.0),
                (Keep::Bits(words), _) => {
                    masked_deltas(d, m, bb, &words[block.start / 64..], scale, w)
                }
                (_, ChunkKeep::Rule(rule)) => {
                    let (m, b) = (&m[..len], &bb[..len]);
                    let first = block.offset as u32;
                    for i in 0..len {
                        let x = m[i] - b[i];
                        // × 1.0 or × 0.0, as in `masked_deltas`
                        let keep = u32::from(rule.keeps(abs_bits(x), first + i as u32)) as f32;
                        d[i] = x * scale * w * keep;
                    }
                }
                (_, ChunkKeep::Draws(draws, threshold)) => {
                    let (m, b) = (&m[..len], &bb[..len]);
                    let r = &draws[block.offset..block.offset + len];
                    for i in 0..len {
                        let keep = u32::from(r[i] < *threshold) as f32;
                        d[i] = (m[i] - b[i]) * scale * w * keep;
                    }
                }
                (Keep::Window(_) | Keep::Random(_), ChunkKeep::Whole) => {
                    unreachable!("window and random selections are made concrete per chunk")
                }
            }
        }
        let deltas = || (0..k).map(|j| &deltas[j * BLOCK..j * BLOCK + len]);
        if s.consensus {
            sum.fill(0.0);
            div.fill(0.0);
            o.fill(0.0);
            for d in deltas() {
                for (s, &d) in sum.iter_mut().zip(d) {
                    *s += d;
                }
            }
            for (d, &w) in deltas().zip(&s.weights) {
                elect(o, div, sum, d, w);
            }
            if s.normalize {
                for ((o, &dv), &b) in o.iter_mut().zip(&*div).zip(bb) {
                    // ÷ dv, or ÷ 1 where no model agreed (branch-free, so it vectorises)
                    let dv = dv + f32::from(u8::from(dv == 0.0));
                    *o = b + (*o / dv) * lambda;
                }
            } else {
                for (o, &b) in o.iter_mut().zip(bb) {
                    *o = b + *o * lambda;
                }
            }
        } else {
            let mut all = deltas();
            o.copy_from_slice(all.next().expect("at least one model"));
            for d in all {
                for (o, &d) in o.iter_mut().zip(d) {
                    *o += d;
                }
            }
            let inv = if s.normalize { s.total } else { 1.0 };
            for (o, &b) in o.iter_mut().zip(bb) {
                *o = b + (*o / inv) * lambda;
            }
        }
    }
}

avx2_fn!(fn merge_block(
    s: &TaStream,
    block: &Block<'_>,
    models: &[&[f32]],
    rules: &[ChunkKeep],
    scratch: &mut [f32],
    o: &mut [f32],
) => TaStream::merge_block_body);

/// Add the entries of `d` whose sign agrees with the elected sign (that of `sum`, `+` for 0)
/// to `acc`, and their weight `w` to `div`. Branch-free (× 1 or × 0), so the loop vectorises.
#[inline(always)]
fn elect(acc: &mut [f32], div: &mut [f32], sum: &[f32], d: &[f32], w: f32) {
    let n = acc.len();
    let (div, sum, d) = (&mut div[..n], &sum[..n], &d[..n]);
    for i in 0..n {
        let (s, x) = (sum[i], d[i]);
        let agree = ((s >= 0.0 && x > 0.0) | (s < 0.0 && x < 0.0)) as u32 as f32;
        acc[i] += x * agree;
        div[i] += w * agree;
    }
}

/// `d = keep ? (m − b)·scale·w : 0`, with `keep` from the bitset `words` (bit `i % 64` of word
/// `i / 64`); eight entries at a time with constant shifts, so the loop vectorises. A dropped
/// entry becomes ±0, which neither votes in the sign election nor changes a sum.
#[inline(always)]
fn masked_deltas(d: &mut [f32], m: &[f32], b: &[f32], words: &[u64], scale: f32, w: f32) {
    let full = d.len() / 8 * 8;
    let groups = d[..full]
        .chunks_exact_mut(8)
        .zip(m[..full].chunks_exact(8))
        .zip(b[..full].chunks_exact(8));
    for (g, ((d8, m8), b8)) in groups.enumerate() {
        let d8: &mut [f32; 8] = d8.try_into().expect("8 entries");
        let m8: &[f32; 8] = m8.try_into().expect("8 entries");
        let b8: &[f32; 8] = b8.try_into().expect("8 entries");
        let byte = (words[g / 8] >> ((g % 8) * 8)) as u32;
        for k in 0..8 {
            // × 1.0 or × 0.0: exact for finite task vectors, and vectorises (a select did not)
            let keep = ((byte >> k) & 1) as f32;
            d8[k] = (m8[k] - b8[k]) * scale * w * keep;
        }
    }
    for i in full..d.len() {
        let keep = (words[i / 64] >> (i % 64)) & 1 == 1;
        d[i] = if keep { (m[i] - b[i]) * scale * w } else { 0.0 };
    }
}

#[cfg(test)]
mod tests {
    use super::super::util::testing::{assert_close, input, params};
    use super::*;

    fn run(
        method: &TaskArithmetic,
        base: &[f32],
        models: &[&[f32]],
        model_params: Vec<Vec<(&str, f64)>>,
        global: &[(&str, f64)],
    ) -> Result<Vec<f32>> {
        let shape = [base.len()];
        let inp = input(
            method,
            &shape,
            Some(base),
            models.to_vec(),
            model_params.iter().map(|p| params(p)).collect(),
            params(global),
            42,
        );
        method.merge(&inp)
    }

    /// The same merge in mergekit's arithmetic in `dtype` ([`MergeMethod::stream_in`]).
    fn run_in(
        method: &TaskArithmetic,
        dtype: DType,
        base: &[f32],
        models: &[&[f32]],
        model_params: Vec<Vec<(&str, f64)>>,
        global: &[(&str, f64)],
    ) -> Result<Vec<f32>> {
        let shape = [base.len()];
        let inp = input(
            method,
            &shape,
            Some(base),
            models.to_vec(),
            model_params.iter().map(|p| params(p)).collect(),
            params(global),
            42,
        );
        let stream = method.stream_in(&inp.spec(), dtype)?.expect("streams");
        run_in_memory(stream, base.len(), Some(base), models)
    }

    /// torch's bf16 `sum(dim=0)` adds in f32, model by model, and rounds once: with task
    /// vectors 1, 2³⁰, −2³⁰ the 1 is lost, with 2³⁰, −2³⁰, 1 it is kept (measured in torch).
    #[test]
    fn bf16_arithmetic_sums_in_f32_in_model_order() {
        let big = (1u64 << 30) as f32;
        let w1 = || vec![vec![("weight", 1.0)]; 3];
        let base = [0.0f32];
        let lost = run_in(
            &TASK_ARITHMETIC,
            DType::BF16,
            &base,
            &[&[1.0], &[big], &[-big]],
            w1(),
            &[],
        );
        assert_eq!(lost.unwrap(), [0.0]);
        let kept = run_in(
            &TASK_ARITHMETIC,
            DType::BF16,
            &base,
            &[&[big], &[-big], &[1.0]],
            w1(),
            &[],
        );
        assert_eq!(kept.unwrap(), [1.0]);
    }

    /// Each step rounds to bf16: the weight 1 + 2⁻⁸ + 2⁻²⁰ becomes 1 + 2⁻⁷ (via f32, as torch
    /// builds the weights tensor), and (1 + 2⁻⁷)·(1 + 2⁻⁷) = 1 + 2⁻⁶ + 2⁻¹⁴ rounds to 1 + 2⁻⁶;
    /// in f32 the product is kept and the output rounds once.
    #[test]
    fn bf16_arithmetic_rounds_weights_and_products() {
        let x = 1.0 + 2f32.powi(-7);
        let w = 1.0 + 2f64.powi(-8) + 2f64.powi(-20);
        let p = vec![vec![("weight", w)]];
        let bf16 = run_in(
            &TASK_ARITHMETIC,
            DType::BF16,
            &[0.0],
            &[&[x]],
            p.clone(),
            &[],
        )
        .unwrap();
        assert_eq!(bf16, [1.0 + 2f32.powi(-6)]);
        let f32_math = run(&TASK_ARITHMETIC, &[0.0], &[&[x]], p, &[]).unwrap();
        assert_eq!(f32_math, [x * w as f32]);
        assert_ne!(f32_math, bf16);
    }

    #[test]
    fn bf16_arithmetic_is_refused_by_sparsifying_presets() {
        assert!(!TIES.computes_in(DType::BF16) && TIES.computes_in(DType::F32));
        let err = run_in(
            &TIES,
            DType::BF16,
            &[0.0],
            &[&[1.0]],
            vec![vec![("weight", 1.0)]],
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("ties") && err.contains("bf16 arithmetic"),
            "{err}"
        );
    }

    #[test]
    fn task_arithmetic_adds_scaled_task_vectors() {
        let base = [1.0f32, 2.0, 3.0];
        let a = [2.0f32, 2.0, 1.0]; // δ = (1, 0, −2)
        let b = [1.0f32, 4.0, 4.0]; // δ = (0, 2, 1)
        let got = run(
            &TASK_ARITHMETIC,
            &base,
            &[&a, &b],
            vec![vec![("weight", 0.5)], vec![("weight", 1.0)]],
            &[("lambda", 2.0)],
        )
        .unwrap();
        // base + 2·(0.5δa + δb) = base + (1, 4, 0)
        assert_close(&got, &[2.0, 6.0, 3.0], 1e-6);
        // normalize divides by Σw = 1.5
        let got = run(
            &TASK_ARITHMETIC,
            &base,
            &[&a, &b],
            vec![vec![("weight", 0.5)], vec![("weight", 1.0)]],
            &[("normalize", 1.0)],
        )
        .unwrap();
        assert_close(&got, &[1.0 + 0.5 / 1.5, 2.0 + 2.0 / 1.5, 3.0], 1e-6);
    }

    #[test]
    fn ties_sign_election_on_paper() {
        // δa = (3, −1, 2, 0.5), δb = (−1, −2, 1, −4), δc = (−1, 3, −0.5, 1); density 1
        let base = [0.0f32; 4];
        let a = [3.0f32, -1.0, 2.0, 0.5];
        let b = [-1.0f32, -2.0, 1.0, -4.0];
        let c = [-1.0f32, 3.0, -0.5, 1.0];
        let w = |x: f64| vec![("weight", x)];
        let got = run(
            &TIES,
            &base,
            &[&a, &b, &c],
            vec![w(1.0), w(1.0), w(1.0)],
            &[],
        )
        .unwrap();
        // sums: 1 → +: mean of {3}; 0 → + (ties go +): mean of {3}; 2.5 → +: (2+1)/2;
        // −2.5 → −: mean of {−4}
        assert_close(&got, &[3.0, 3.0, 1.5, -4.0], 1e-6);
        // unnormalized: plain sum of agreeing entries
        let got = run(
            &TIES,
            &base,
            &[&a, &b, &c],
            vec![w(1.0), w(1.0), w(1.0)],
            &[("normalize", 0.0)],
        )
        .unwrap();
        assert_close(&got, &[3.0, 3.0, 3.0, -4.0], 1e-6);
        // weights enter the election and the divisor: w = (1, 2, 1)
        let got = run(
            &TIES,
            &base,
            &[&a, &b, &c],
            vec![w(1.0), w(2.0), w(1.0)],
            &[],
        )
        .unwrap();
        // entry 0: u = (3, −2, −1) sum 0 → +: 3/1; entry 1: (−1, −4, 3) → −: (−1−4)/(1+2)
        // entry 2: (2, 2, −0.5) → +: 4/3; entry 3: (0.5, −8, 1) → −: −8/2
        assert_close(&got, &[3.0, -5.0 / 3.0, 4.0 / 3.0, -4.0], 1e-6);
    }

    #[test]
    fn ties_trims_before_the_election() {
        // density 0.5 keeps the two largest |δ| of each model
        let base = [0.0f32; 4];
        let a = [4.0f32, -1.0, 0.5, -3.0]; // keeps 4, −3
        let b = [-1.0f32, 2.0, -5.0, 0.1]; // keeps 2, −5
        let d = |x: f64| vec![("weight", 1.0), ("density", x)];
        let got = run(&TIES, &base, &[&a, &b], vec![d(0.5), d(0.5)], &[]).unwrap();
        assert_close(&got, &[4.0, 2.0, -5.0, -3.0], 1e-6);
    }

    #[test]
    fn breadcrumbs_and_dare_presets() {
        let base = [0.0f32; 10];
        let a = [0.1f32, -0.5, 0.3, 0.05, -0.2, 0.4, 0.6, -0.7, 0.8, 0.9];
        let got = run(
            &BREADCRUMBS,
            &base,
            &[&a],
            vec![vec![("weight", 2.0), ("density", 0.5), ("gamma", 0.2)]],
            &[],
        )
        .unwrap();
        let want = [0.0, -1.0, 0.6, 0.0, 0.0, 0.8, 1.2, -1.4, 0.0, 0.0];
        assert_close(&got, &want, 1e-6);

        // dare_linear, one model: kept entries scaled so Σ|δ| is preserved
        let n = 4096;
        let base = vec![0.0f32; n];
        let x: Vec<f32> = (0..n).map(|i| (i % 7) as f32 - 3.0).collect();
        let got = run(
            &DARE_LINEAR,
            &base,
            &[&x],
            vec![vec![("weight", 1.0), ("density", 0.25)]],
            &[],
        )
        .unwrap();
        let l1 = |v: &[f32]| v.iter().map(|x| f64::from(x.abs())).sum::<f64>();
        assert!((l1(&got) / l1(&x) - 1.0).abs() < 1e-5);
        let kept = got.iter().filter(|v| **v != 0.0).count() as f64;
        let nonzero = x.iter().filter(|v| **v != 0.0).count() as f64;
        assert!((kept / nonzero - 0.25).abs() < 0.03, "{}", kept / nonzero);
        // kept entries are the originals times one common factor
        let factor = got
            .iter()
            .zip(&x)
            .find(|(g, _)| **g != 0.0)
            .map(|(g, x)| g / x)
            .unwrap();
        for (g, x) in got.iter().zip(&x) {
            assert!(*g == 0.0 || (g - x * factor).abs() < 1e-5);
        }
    }

    #[test]
    fn della_checks_epsilon_and_names_the_tensor() {
        let base = [0.0f32; 4];
        let a = [1.0f32, 2.0, 3.0, 4.0];
        let err = run(
            &DELLA,
            &base,
            &[&a],
            vec![vec![("weight", 1.0), ("density", 0.1)]],
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("test.weight") && err.contains("epsilon"),
            "{err}"
        );
    }

    /// The AVX2 build of the fused pass (picked at run time where the CPU has it) gives the
    /// same bits as the portable one.
    #[test]
    fn dispatched_block_equals_the_portable_body() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(4);
        let n = BLOCK;
        let mut draw = || -> Vec<f32> { (0..n).map(|_| rng.random::<f32>() - 0.5).collect() };
        let (b, m0, m1) = (draw(), draw(), draw());
        let words: Vec<u64> = (0..n / 64)
            .map(|i| 0x9e37_79b9_7f4a_7c15u64.rotate_left(i as u32))
            .collect();
        for preset in [&TIES, &DARE_LINEAR] {
            let mp = vec![params(&[("weight", 0.7)]), params(&[("weight", 1.3)])];
            let shape = [n];
            let inp = input(preset, &shape, Some(&b), vec![&m0, &m1], mp, params(&[]), 0);
            let selectors = vec![
                Selector::decided(n, Keep::Bits(words.clone()), 1.5),
                Selector::decided(n, Keep::All, 1.0),
            ];
            let stream = preset.pipeline(&inp.spec(), selectors).unwrap();
            let block = Block {
                start: 0,
                offset: 0,
                base: &b,
            };
            let models: Vec<&[f32]> = vec![&m0, &m1];
            let mut scratch = vec![0.0f32; 4 * BLOCK];
            let (mut fast, mut plain) = (vec![0.0f32; n], vec![0.0f32; n]);
            merge_block(
                &stream,
                &block,
                &models,
                &[ChunkKeep::Whole, ChunkKeep::Whole],
                &mut scratch,
                &mut fast,
            );
            TaStream::merge_block_body(
                &stream,
                &block,
                &models,
                &[ChunkKeep::Whole, ChunkKeep::Whole],
                &mut scratch,
                &mut plain,
            );
            assert!(
                fast.iter()
                    .zip(&plain)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "{}",
                preset.name()
            );
        }
    }

    /// Streamed DELLA (chunks of whole rows, one mask pass) gives the bits of the whole-tensor
    /// form: rows of 1000 and 1001 (not whole 64-entry groups, so groups straddle chunks, and
    /// chunks start mid-group), chunks of 32 rows across `CHUNK` boundaries, rescale on and
    /// off, one model kept whole, a 1-D tensor as one row.
    #[test]
    fn streamed_della_equals_the_whole_tensor_form() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(12);
        for shape in [
            vec![70usize, 1000],
            vec![40, 1001],
            vec![33, 64],
            vec![5000],
        ] {
            let n: usize = shape.iter().product();
            let mut draw = || -> Vec<f32> { (0..n).map(|_| rng.random::<f32>() - 0.5).collect() };
            let (b, m0, m1) = (draw(), draw(), draw());
            for (preset, rescale, d1) in [
                (&DELLA, 1.0, 0.6),
                (&DELLA_LINEAR, 1.0, 1.0),
                (&DELLA, 0.0, 0.3),
            ] {
                let mp = vec![
                    params(&[("weight", 0.7), ("density", 0.4)]),
                    params(&[("weight", 1.3), ("density", d1), ("epsilon", 0.2)]),
                ];
                let g = params(&[("rescale", rescale)]);
                let inp = input(preset, &shape, Some(&b), vec![&m0, &m1], mp, g, 5);
                assert!(preset.stream(&inp.spec()).unwrap().is_some());
                let streamed = preset.merge(&inp).unwrap();
                let whole = preset.della_whole(&inp).unwrap();
                assert!(
                    streamed
                        .iter()
                        .zip(&whole)
                        .all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{} {shape:?} rescale {rescale}",
                    preset.name()
                );
                assert!(streamed.iter().zip(&b).any(|(x, y)| x != y));
            }
        }
    }

    #[test]
    fn seeded_methods_are_reproducible() {
        let n = 50_000;
        let base = vec![0.0f32; n];
        let x: Vec<f32> = (0..n).map(|i| ((i * 31) % 101) as f32 - 50.0).collect();
        let p = || vec![vec![("weight", 1.0), ("density", 0.4)]];
        let one = run(&DELLA_LINEAR, &base, &[&x], p(), &[]).unwrap();
        let two = run(&DELLA_LINEAR, &base, &[&x], p(), &[]).unwrap();
        assert_eq!(one, two);
    }

    #[test]
    fn defaults_match_mergekit() {
        let default = |m: &TaskArithmetic, p: &str| {
            m.params()
                .iter()
                .find(|d| d.name == p)
                .and_then(|d| d.default)
        };
        assert_eq!(default(&TIES, "normalize"), Some(1.0));
        assert_eq!(default(&TASK_ARITHMETIC, "normalize"), Some(0.0));
        assert_eq!(default(&DARE_TIES, "rescale"), Some(1.0));
        assert_eq!(default(&DARE_LINEAR, "rescale"), Some(1.0));
        assert_eq!(default(&DELLA, "normalize"), Some(1.0));
        assert_eq!(default(&DELLA_LINEAR, "normalize"), Some(0.0));
        assert_eq!(default(&BREADCRUMBS, "gamma"), Some(0.01));
        assert_eq!(default(&DELLA, "epsilon"), Some(0.15));
        assert_eq!(default(&TIES, "lambda"), Some(1.0));
        assert_eq!(default(&TIES, "density"), Some(1.0));
        assert_eq!(default(&TIES, "weight"), None);
        assert_eq!(default(&TASK_ARITHMETIC, "density"), None);
    }
}
