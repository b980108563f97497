//! Plan → execute: a recipe becomes a [`Plan`] (a list of output tensors with resolved inputs and
//! parameters, see [`crate::merge::plan`]); execution merges them in parallel (rayon) into a
//! [`Sink`] — the shard writer on disk, or a map in memory for search candidates (each tensor
//! stored in the plan's output dtype, so a bf16 merge is held in bf16).
//!
//! Memory stays flat. A method that streams ([`crate::merge::MergeMethod::stream`]) merges a
//! tensor chunk by chunk: each chunk of its inputs is read (positioned reads) just before it is
//! merged, and handed to the sink at once — the shard writer takes pieces, so nothing of the
//! tensor's size is held. Other methods get whole tensors, and an in-flight budget caps how many
//! tensor bytes are held at once (a tensor larger than the budget runs alone). Whole models are
//! never loaded.
//!
//! Methods compute in `f32` and the sink rounds each output to the output dtype; with
//! [`ComputeDtype::Recipe`] (`--compute-dtype recipe`) the executor asks the method for
//! mergekit's arithmetic in the recipe's `dtype` instead
//! ([`crate::merge::MergeMethod::stream_in`]), and refuses, before writing anything, a method
//! that does not implement it.
//!
//! ```no_run
//! # fn main() -> evomerge::Result<()> {
//! use evomerge::merge::executor::{merge_to_disk, MergeOptions};
//! use evomerge::recipe::Recipe;
//! use evomerge::store::ModelSet;
//!
//! let recipe = Recipe::from_path("examples/recipes/toy-ties.yml")?;
//! let mut models = ModelSet::new();
//! merge_to_disk(&recipe, &mut models, "out/merged".as_ref(), &MergeOptions::default())?;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;

use crate::candidate::{MemModel, TensorMap};
use crate::error::{Error, Result};
use crate::merge::plan::{Plan, PlannedTensor, SourceRef, plan};
use crate::merge::stream::{Chunk, Stream, StreamSpec, chunk_count_of, chunk_range_of};
use crate::merge::{MergeInput, tensor_seed};
use crate::recipe::Recipe;
use crate::store::reader::{HeaderEntry, parse_header};
use crate::store::{ModelSet, ModelWriter, TensorInfo, TensorSource, WriteConfig};
use crate::tensor::{DType, TensorBuf};

/// Options for running a merge.
#[derive(Clone, Debug)]
pub struct MergeOptions {
    /// Seed for the random methods (DARE, DELLA).
    pub seed: u64,
    /// Output dtype; `None` = the recipe's `out_dtype`, else its `dtype`, else the base's.
    pub out_dtype: Option<DType>,
    /// Largest shard in bytes.
    pub max_shard_size: u64,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// Tensor bytes (inputs + output, as f32) allowed in flight at once.
    pub in_flight_bytes: usize,
    /// Write non-finite values (NaN, ±inf, or values too large for the output dtype) instead of
    /// failing. By default a merge that produces one fails with an error naming the tensor
    /// (`evomerge merge --allow-nonfinite` sets this).
    pub allow_nonfinite: bool,
    /// The arithmetic: `f32` (the default), or mergekit's in the recipe's `dtype`
    /// (`evomerge merge --compute-dtype recipe`).
    pub compute_dtype: ComputeDtype,
}

/// The arithmetic of a merge ([`MergeOptions::compute_dtype`]).
///
/// By default every method computes in `f32` and rounds only its output to the output dtype:
/// the most accurate result, and equal to mergekit's bit for bit when mergekit computes in
/// `f32` too (a recipe with `dtype: float32`, or no `dtype` and `f32` models). mergekit computes
/// in the recipe's `dtype`, though: with `dtype: bfloat16` every torch operation is rounded to
/// `bf16`. [`ComputeDtype::Recipe`] reproduces that exactly, for the methods whose
/// [`crate::merge::MergeMethod::computes_in`] says so ([`crate::merge::computing_in`] lists
/// them: `linear`, which mergekit computes in `f32` anyway, and `task_arithmetic`); for any
/// other method and a `bf16` / `f16` recipe dtype the merge fails before anything is written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ComputeDtype {
    /// `f32` arithmetic, the output rounded once.
    #[default]
    F32,
    /// mergekit's arithmetic: in the recipe's `dtype`, else in the base (or first) model's
    /// stored dtype (mergekit computes in the dtype it loads).
    Recipe,
}

impl std::str::FromStr for ComputeDtype {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" | "float32" => Ok(ComputeDtype::F32),
            "recipe" => Ok(ComputeDtype::Recipe),
            other => Err(Error::msg(format!(
                "unknown compute dtype `{other}` (expected `recipe` or `f32`)"
            ))),
        }
    }
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions {
            seed: 0,
            out_dtype: None,
            max_shard_size: 5_000_000_000,
            progress: false,
            in_flight_bytes: 512 << 20,
            allow_nonfinite: false,
            compute_dtype: ComputeDtype::F32,
        }
    }
}

/// Where merged tensors go.
pub trait Sink: Sync {
    /// Take one finished output tensor.
    fn put(&self, tensor: &PlannedTensor, values: Vec<f32>) -> Result<()>;
    /// Whether the sink takes tensors in pieces ([`Sink::put_range`]), so a streamed merge can
    /// hand over each chunk as soon as it is merged.
    fn takes_ranges(&self) -> bool {
        false
    }
    /// Take elements `start .. start + values.len()` of an output tensor (flattened). Called
    /// only when [`Sink::takes_ranges`]; a tensor is complete once all its elements arrived.
    fn put_range(&self, tensor: &PlannedTensor, start: usize, values: &[f32]) -> Result<()> {
        let _ = (start, values);
        Err(Error::Tensor {
            tensor: tensor.name.clone(),
            msg: "this sink takes whole tensors only".into(),
        })
    }
}

impl Sink for ModelWriter {
    fn put(&self, tensor: &PlannedTensor, values: Vec<f32>) -> Result<()> {
        self.write(&tensor.name, &values)
    }

    fn takes_ranges(&self) -> bool {
        true
    }

    fn put_range(&self, tensor: &PlannedTensor, start: usize, values: &[f32]) -> Result<()> {
        self.write_range(&tensor.name, start, values)
    }
}

/// Collects merged tensors in memory, each stored in the output dtype (so a candidate scores
/// exactly as the model written to disk would, and a bf16 merge takes bf16 memory). Streamed
/// merges hand over chunks, rounded into the tensor's buffer as they arrive: no `f32` copy of a
/// tensor, let alone of the model, is ever held.
struct MemSink {
    dtype: DType,
    /// One buffer per planned tensor, allocated zeroed up front (its pages are touched only as
    /// chunks land), each behind its own lock so chunks of different tensors never wait.
    tensors: HashMap<String, Mutex<TensorBuf>>,
}

impl MemSink {
    fn new(plan: &Plan) -> Self {
        let tensors = plan
            .tensors
            .iter()
            .map(|t| {
                let buf = TensorBuf::zeros(t.shape.clone(), plan.out_dtype);
                (t.name.clone(), Mutex::new(buf))
            })
            .collect();
        MemSink {
            dtype: plan.out_dtype,
            tensors,
        }
    }

    fn slot(&self, tensor: &PlannedTensor) -> Result<&Mutex<TensorBuf>> {
        self.tensors.get(&tensor.name).ok_or_else(|| Error::Tensor {
            tensor: tensor.name.clone(),
            msg: "not in the plan of this in-memory merge".into(),
        })
    }

    fn into_map(self) -> TensorMap {
        self.tensors
            .into_iter()
            .map(|(name, t)| (name, t.into_inner().expect("merge sink poisoned")))
            .collect()
    }
}

impl Sink for MemSink {
    fn put(&self, tensor: &PlannedTensor, values: Vec<f32>) -> Result<()> {
        let buf = TensorBuf::from_f32(tensor.shape.clone(), values, self.dtype);
        *self.slot(tensor)?.lock().expect("merge sink poisoned") = buf;
        Ok(())
    }

    fn takes_ranges(&self) -> bool {
        true
    }

    fn put_range(&self, tensor: &PlannedTensor, start: usize, values: &[f32]) -> Result<()> {
        let mut buf = self.slot(tensor)?.lock().expect("merge sink poisoned");
        if start + values.len() > buf.len() {
            return Err(Error::Tensor {
                tensor: tensor.name.clone(),
                msg: format!(
                    "elements {start}..{} handed over, the tensor has {}",
                    start + values.len(),
                    buf.len()
                ),
            });
        }
        buf.write_range(start, values);
        Ok(())
    }
}

/// The largest `f32` magnitude that stays finite when rounded (to nearest, ties to even) to
/// `dtype`: halfway to the next power of two above the dtype's largest value rounds up to
/// infinity, since that largest value has an odd significand.
fn finite_limit(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => f32::MAX,
        DType::F16 => f32::from_bits(65520f32.to_bits() - 1),
        DType::BF16 => f32::from_bits(0x7F7F_7FFF),
    }
}

#[cfg(test)]
#[test]
fn finite_limit_is_where_the_dtype_rounds_to_infinity() {
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let limit = finite_limit(dtype);
        let finite = |v: f32| match dtype {
            DType::F32 => v.is_finite(),
            DType::F16 => half::f16::from_f32(v).is_finite(),
            DType::BF16 => half::bf16::from_f32(v).is_finite(),
        };
        assert!(finite(limit) && finite(-limit), "{dtype}");
        let above = f32::from_bits(limit.to_bits() + 1);
        assert!(!finite(above) && !finite(-above), "{dtype}: {above}");
    }
}

/// Refuses non-finite merged values before they reach the inner sink: NaN, ±inf, or a finite
/// `f32` that becomes infinite in the output dtype (e.g. above 65504 in `f16`). The error names
/// the tensor, the first bad element and its value.
struct FiniteSink<'a> {
    inner: &'a dyn Sink,
    dtype: DType,
}

impl FiniteSink<'_> {
    fn check(&self, tensor: &PlannedTensor, start: usize, values: &[f32]) -> Result<()> {
        // Fast path, one vectorised pass: no magnitude above the largest `f32` that rounds to a
        // finite value of the output dtype (NaN fails the comparison too).
        let limit = finite_limit(self.dtype);
        if values.iter().fold(true, |ok, v| ok & (v.abs() <= limit)) {
            return Ok(());
        }
        let stored_finite = |v: f32| match self.dtype {
            DType::F32 => v.is_finite(),
            DType::F16 => half::f16::from_f32(v).is_finite(),
            DType::BF16 => half::bf16::from_f32(v).is_finite(),
        };
        match values.iter().position(|&v| !stored_finite(v)) {
            None => Ok(()),
            Some(i) => Err(Error::Tensor {
                tensor: tensor.name.clone(),
                msg: format!(
                    "the merge produced a non-finite value ({} at element {}{}): check the \
                     recipe's weights and lambda, or pass --allow-nonfinite (MergeOptions::\
                     allow_nonfinite) to write it anyway",
                    values[i],
                    start + i,
                    if values[i].is_finite() {
                        format!(", infinite in {}", self.dtype)
                    } else {
                        String::new()
                    }
                ),
            }),
        }
    }
}

impl Sink for FiniteSink<'_> {
    fn put(&self, tensor: &PlannedTensor, values: Vec<f32>) -> Result<()> {
        self.check(tensor, 0, &values)?;
        self.inner.put(tensor, values)
    }

    fn takes_ranges(&self) -> bool {
        self.inner.takes_ranges()
    }

    fn put_range(&self, tensor: &PlannedTensor, start: usize, values: &[f32]) -> Result<()> {
        self.check(tensor, start, values)?;
        self.inner.put_range(tensor, start, values)
    }
}

/// Caps the bytes of tensors being merged at once. A request larger than the whole budget waits
/// until nothing else is in flight, then runs alone.
struct InFlight {
    budget: usize,
    used: Mutex<usize>,
    freed: Condvar,
}

struct Permit<'a> {
    pool: &'a InFlight,
    bytes: usize,
}

impl InFlight {
    fn new(budget: usize) -> Self {
        InFlight {
            budget,
            used: Mutex::new(0),
            freed: Condvar::new(),
        }
    }

    fn acquire(&self, bytes: usize) -> Permit<'_> {
        let mut used = self.used.lock().expect("in-flight budget poisoned");
        while *used > 0 && *used + bytes > self.budget {
            used = self.freed.wait(used).expect("in-flight budget poisoned");
        }
        *used += bytes;
        Permit { pool: self, bytes }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let mut used = self.pool.used.lock().expect("in-flight budget poisoned");
        *used -= self.bytes;
        self.pool.freed.notify_all();
    }
}

/// Keep large freed buffers in the allocator instead of unmapping them. By default glibc hands
/// every allocation above its mmap threshold (at most 32 MiB) back to the kernel when freed, so
/// each tensor's buffers would be page-faulted and zeroed afresh — that, not the arithmetic,
/// dominated merge time. Raising the thresholds once lets the next tensor reuse the memory. Peak
/// memory is unchanged (it is the most that is ever live at once).
fn recycle_large_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only changes allocator tuning; it is called before our parallel
            // work starts and glibc serialises it internally.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
                libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
                // Per-thread arenas cannot hold blocks above 64 MiB and mmap them afresh every
                // time; one arena keeps even an embedding matrix's buffers for reuse.
                libc::mallopt(libc::M_ARENA_MAX, 1);
            }
        });
    }
}

/// Run a plan: merge every output tensor (in parallel) and hand each to `sink` when ready.
/// A method that streams ([`crate::merge::MergeMethod::stream`]) runs chunk by chunk, reading
/// each chunk of its inputs just before merging it; other methods get whole tensors, within the
/// in-flight byte budget. Stops at the first error; the error names the tensor.
///
/// `compute` is the arithmetic (see [`ComputeDtype`]): `None` for evomerge's `f32`, or
/// mergekit's in that dtype ([`crate::merge::MergeMethod::stream_in`]), which a method takes
/// only where it [`crate::merge::MergeMethod::computes_in`] it (checked by [`merge_to_disk`]
/// before it writes anything); in `bf16` / `f16` every tensor is streamed.
pub fn execute(
    plan: &Plan,
    models: &ModelSet,
    seed: u64,
    compute: Option<DType>,
    in_flight_bytes: usize,
    sink: &dyn Sink,
    progress: &ProgressBar,
) -> Result<()> {
    recycle_large_buffers();
    let budget = InFlight::new(in_flight_bytes);
    let aux_files = AuxFiles::default();
    plan.tensors.par_iter().try_for_each(|t| {
        let numel: usize = t.shape.iter().product();
        let spec = StreamSpec {
            tensor: &t.name,
            shape: &t.shape,
            has_base: t.base.is_some(),
            models: t.models.len(),
            model_params: &t.model_params,
            global: &t.global,
            seed: tensor_seed(seed, &t.name),
        };
        // aux data (Fisher, Gram) is per tensor, not per chunk: such methods take whole tensors
        let stream = if let Some(dtype) = compute {
            let stream = plan.method.stream_in(&spec, dtype);
            match stream.map_err(|e| in_tensor(plan, t, e))? {
                None if dtype != DType::F32 => {
                    return Err(in_tensor(
                        plan,
                        t,
                        Error::msg(format!("{dtype} arithmetic needs a streamed merge")),
                    ));
                }
                stream => stream,
            }
        } else if t.aux.is_empty() {
            plan.method
                .stream(&spec)
                .map_err(|e| in_tensor(plan, t, e))?
        } else {
            None
        };
        match stream {
            Some(stream) => run_streamed(plan, t, stream, models, &budget, sink)?,
            None => {
                let inputs = t.models.len() + usize::from(t.base.is_some()) + 1;
                let _permit = budget.acquire(numel * 4 * inputs);
                let values = merge_one(plan, t, models, &aux_files, seed)?;
                sink.put(t, values)?;
            }
        }
        progress.inc(1);
        Ok(())
    })
}

/// A method's error about one tensor, named once: errors that already name the tensor (or the
/// method) pass through, others get the tensor and method prefixed.
fn in_tensor(plan: &Plan, t: &PlannedTensor, e: Error) -> Error {
    match e {
        Error::Tensor { .. } | Error::Method { .. } => e,
        other => Error::Tensor {
            tensor: t.name.clone(),
            msg: format!("{}: {other}", plan.method.name()),
        },
    }
}

/// Per-thread buffers for one chunk of a streamed merge's inputs and output.
#[derive(Default)]
struct ChunkBufs {
    base: Vec<f32>,
    models: Vec<Vec<f32>>,
    out: Vec<f32>,
}

/// Merge one tensor chunk by chunk: the stream's statistics passes, then every chunk merged and
/// handed to the sink (in pieces when it takes them, else assembled first).
fn run_streamed(
    plan: &Plan,
    t: &PlannedTensor,
    mut stream: Box<dyn Stream>,
    models: &ModelSet,
    budget: &InFlight,
    sink: &dyn Sink,
) -> Result<()> {
    let n: usize = t.shape.iter().product();
    let len = stream.chunk_len();
    let total = chunk_count_of(n, len);
    let base = match (&t.base, stream.uses_base()) {
        (Some(b), true) => Some((source(models, b, n)?, b)),
        _ => None,
    };
    let inputs = t
        .models
        .iter()
        .map(|m| Ok((source(models, m, n)?, m)))
        .collect::<Result<Vec<_>>>()?;
    // read chunk `c` into `bufs` and call `f` on it
    let with_chunk = |c: usize,
                      bufs: &mut ChunkBufs,
                      f: &mut dyn FnMut(&Chunk<'_>, &mut Vec<f32>) -> Result<()>|
     -> Result<()> {
        let r = chunk_range_of(c, n, len);
        bufs.models.resize_with(inputs.len(), Vec::new);
        for ((model, src), buf) in inputs.iter().zip(&mut bufs.models) {
            buf.resize(r.len(), 0.0);
            model.read_range_into(&src.tensor, r.start, buf)?;
        }
        if let Some((model, src)) = &base {
            bufs.base.resize(r.len(), 0.0);
            model.read_range_into(&src.tensor, r.start, &mut bufs.base)?;
        }
        let views: Vec<&[f32]> = bufs.models.iter().map(Vec::as_slice).collect();
        let chunk = Chunk {
            index: c,
            start: r.start,
            base: base.as_ref().map(|_| bufs.base.as_slice()),
            models: &views,
        };
        f(&chunk, &mut bufs.out).map_err(|e| in_tensor(plan, t, e))
    };

    let mut partials = Vec::new();
    while let Some(pass) = stream
        .next_pass(partials)
        .map_err(|e| in_tensor(plan, t, e))?
    {
        let stream = &*stream;
        partials = pass
            .chunks(total)
            .into_par_iter()
            .map_init(ChunkBufs::default, |bufs, c| {
                let mut part = None;
                with_chunk(c, bufs, &mut |chunk, _| {
                    part = Some(stream.observe(chunk)?);
                    Ok(())
                })?;
                Ok(part.expect("observed"))
            })
            .collect::<Result<Vec<_>>>()?;
    }
    let stream = &*stream;
    if sink.takes_ranges() {
        (0..total)
            .into_par_iter()
            .try_for_each_init(ChunkBufs::default, |bufs, c| {
                with_chunk(c, bufs, &mut |chunk, out| {
                    out.resize(chunk.len(), 0.0);
                    stream.apply(chunk, out)?;
                    sink.put_range(t, chunk.start, out)
                })
            })
    } else {
        let _permit = budget.acquire(n * 4);
        let mut values = vec![0f32; n];
        values
            .par_chunks_mut(len.max(1))
            .enumerate()
            .try_for_each_init(ChunkBufs::default, |bufs, (c, o)| {
                with_chunk(c, bufs, &mut |chunk, _| stream.apply(chunk, o))
            })?;
        sink.put(t, values)
    }
}

/// The opened model holding `src`, checked to have `numel` elements.
fn source(models: &ModelSet, src: &SourceRef, numel: usize) -> Result<Arc<dyn TensorSource>> {
    let model = models.get(&src.model).ok_or_else(|| {
        Error::msg(format!(
            "model {} was not opened by the planner",
            src.model.display()
        ))
    })?;
    let info = model
        .info(&src.tensor)
        .ok_or_else(|| Error::MissingTensor {
            model: src.model.clone(),
            tensor: src.tensor.clone(),
        })?;
    if info.numel() != numel {
        return Err(Error::BadTensor {
            path: src.model.clone(),
            tensor: src.tensor.clone(),
            msg: format!(
                "has shape {:?} ({} elements), the merge expects {numel}",
                info.shape,
                info.numel()
            ),
        });
    }
    Ok(model)
}

/// Read one source tensor as f32.
fn read(models: &ModelSet, src: &SourceRef, numel: usize) -> Result<Vec<f32>> {
    let model = source(models, src, numel)?;
    let mut out = vec![0f32; numel];
    model.read_into(&src.tensor, &mut out)?;
    Ok(out)
}

/// Merge one planned tensor.
fn merge_one(
    plan: &Plan,
    t: &PlannedTensor,
    models: &ModelSet,
    aux_files: &AuxFiles,
    seed: u64,
) -> Result<Vec<f32>> {
    let numel: usize = t.shape.iter().product();
    let base = t
        .base
        .as_ref()
        .map(|b| read(models, b, numel))
        .transpose()?;
    let inputs = t
        .models
        .iter()
        .map(|m| read(models, m, numel))
        .collect::<Result<Vec<_>>>()?;
    let aux = t
        .aux
        .iter()
        .map(|a| a.as_ref().map_or(Ok(None), |a| aux_files.read(a)))
        .collect::<Result<Vec<_>>>()?;
    let input = MergeInput {
        tensor: &t.name,
        shape: &t.shape,
        base: base.as_deref(),
        models: inputs.iter().map(Vec::as_slice).collect(),
        model_params: t.model_params.clone(),
        global: t.global.clone(),
        aux: aux.iter().map(|a| a.as_deref()).collect(),
        seed: tensor_seed(seed, &t.name),
    };
    let out = plan
        .method
        .merge(&input)
        .map_err(|e| in_tensor(plan, t, e))?;
    if out.len() != numel {
        return Err(Error::Tensor {
            tensor: t.name.clone(),
            msg: format!(
                "{} returned {} values for shape {:?}",
                plan.method.name(),
                out.len(),
                t.shape
            ),
        });
    }
    Ok(out)
}

/// Auxiliary safetensors files (Fisher diagonals, Gram matrices) beside the input models, each
/// read and validated once per merge.
#[derive(Default)]
struct AuxFiles {
    files: Mutex<HashMap<PathBuf, Arc<AuxFile>>>,
}

struct AuxFile {
    bytes: Vec<u8>,
    entries: Vec<HeaderEntry>,
}

impl AuxFiles {
    /// The tensor `src.tensor` of the file `src.model` as f32; `None` when the file lacks it.
    fn read(&self, src: &SourceRef) -> Result<Option<Vec<f32>>> {
        let file = {
            let mut files = self.files.lock().expect("aux cache poisoned");
            match files.get(&src.model) {
                Some(f) => f.clone(),
                None => {
                    let bytes = std::fs::read(&src.model).map_err(|e| Error::io(&src.model, e))?;
                    let entries = parse_header(&src.model, &bytes)?;
                    let f = Arc::new(AuxFile { bytes, entries });
                    files.insert(src.model.clone(), f.clone());
                    f
                }
            }
        };
        let Some(e) = file.entries.iter().find(|e| e.info.name == src.tensor) else {
            return Ok(None);
        };
        let mut out = vec![0f32; e.info.numel()];
        e.info
            .dtype
            .decode_into(&file.bytes[e.start..e.end], &mut out);
        Ok(Some(out))
    }
}

fn progress_bar(len: usize, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} merging [{bar:40}] {pos}/{len} tensors {elapsed_precise} eta {eta}",
        )
        .expect("valid progress template")
        .progress_chars("=> "),
    );
    bar
}

/// Merge `recipe` into memory (the search's candidates). Models are taken from (or opened into)
/// `models`, so repeated candidates reuse the same memory maps. Nothing touches the disk. A
/// non-finite merged value is an error naming the tensor (a search logs it as a failed
/// candidate). Each
/// tensor is held in the plan's output dtype (bf16 inputs, or `out_dtype: bfloat16`, give a
/// bf16 model: half the memory of `f32`); the math runs in `f32` a chunk or a tensor at a time.
pub fn merge_in_memory(recipe: &Recipe, models: &mut ModelSet, seed: u64) -> Result<MemModel> {
    let plan = plan(recipe, models)?;
    let sink = MemSink::new(&plan);
    execute(
        &plan,
        models,
        seed,
        None,
        MergeOptions::default().in_flight_bytes,
        &FiniteSink {
            inner: &sink,
            dtype: plan.out_dtype,
        },
        &ProgressBar::hidden(),
    )?;
    Ok(MemModel {
        config: plan.config,
        tensors: sink.into_map(),
    })
}

/// Merge `recipe` into a Hugging Face model directory at `out_dir`: written into a temporary
/// directory beside it and renamed at the end, so a failed or killed merge leaves nothing under
/// the final name.
pub fn merge_to_disk(
    recipe: &Recipe,
    models: &mut ModelSet,
    out_dir: &Path,
    options: &MergeOptions,
) -> Result<PathBuf> {
    let mut plan = plan(recipe, models)?;
    if let Some(dt) = options.out_dtype {
        plan.out_dtype = dt;
        crate::merge::plan::set_config_dtype(&mut plan.config, dt);
    }
    let compute = compute_dtype(recipe, &plan, models, options.compute_dtype)?;
    let infos: Vec<TensorInfo> = plan
        .tensors
        .iter()
        .map(|t| TensorInfo {
            name: t.name.clone(),
            dtype: plan.out_dtype,
            shape: t.shape.clone(),
        })
        .collect();
    let writer = ModelWriter::create(
        out_dir,
        &infos,
        &WriteConfig {
            max_shard_size: options.max_shard_size,
        },
    )?;
    let bar = progress_bar(plan.tensors.len(), options.progress);
    let checked = FiniteSink {
        inner: &writer,
        dtype: plan.out_dtype,
    };
    let sink: &dyn Sink = if options.allow_nonfinite {
        &writer
    } else {
        &checked
    };
    execute(
        &plan,
        models,
        options.seed,
        compute,
        options.in_flight_bytes,
        sink,
        &bar,
    )?;
    bar.finish_and_clear();
    let card = model_card(&plan);
    writer.finish(&plan.config, plan.donor.as_deref(), &card)
}

/// The dtype a merge computes in ([`ComputeDtype`]; `None`: evomerge's `f32`); an error naming
/// the method, and those that implement it, when the method cannot compute in the recipe's
/// dtype.
fn compute_dtype(
    recipe: &Recipe,
    plan: &Plan,
    models: &ModelSet,
    option: ComputeDtype,
) -> Result<Option<DType>> {
    if option == ComputeDtype::F32 {
        return Ok(None);
    }
    let stored = || {
        let t = plan.tensors.first()?;
        let src = t.base.as_ref().or(t.models.first())?;
        Some(models.get(&src.model)?.info(&src.tensor)?.dtype)
    };
    let dtype = recipe.dtype.or_else(stored).unwrap_or(DType::F32);
    if plan.method.computes_in(dtype) {
        return Ok(Some(dtype));
    }
    Err(Error::Method {
        method: plan.method.name().to_string(),
        msg: format!(
            "--compute-dtype recipe is implemented for: {} (in {dtype}, the recipe's dtype); \
             `{}` computes in f32 only: use --compute-dtype f32 (the default) or `dtype: \
             float32`",
            crate::merge::computing_in(dtype).join(", "),
            plan.method.name()
        ),
    })
}

/// The README.md written beside a merged model: what made it, and the recipe to make it again.
fn model_card(plan: &Plan) -> String {
    format!(
        "---\nlibrary_name: transformers\ntags:\n- merge\n- mergekit\n- evomerge\n---\n\
         # Merged model\n\n\
         This model was merged with evomerge using the \
         `{method}` merge method. The recipe below is mergekit-compatible YAML: \
         `evomerge merge recipe.yml OUT` (or `mergekit-yaml recipe.yml OUT`) builds it again.\n\n\
         ## Recipe\n\n```yaml\n{yaml}```\n",
        method = plan.method.name(),
        yaml = plan.recipe_yaml,
    )
}
