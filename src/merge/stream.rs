//! Streamed merges: one tensor merged chunk by chunk, so the executor never holds a whole input
//! tensor in memory and every chunk's inputs stay in cache from the read to the write.
//!
//! A method that can run this way returns a [`Stream`] from [`super::MergeMethod::stream`]. The
//! executor (or [`run_in_memory`], for inputs already in memory) then drives it:
//!
//! 1. `next_pass(partials)` — the stream asks for a statistics pass over all chunks
//!    ([`Pass::All`]) or a few evenly spaced ones ([`Pass::Sample`]), or says it is ready;
//! 2. `observe(chunk)` for each chunk of that pass, in parallel, each returning a partial result;
//!    the partials come back to the next `next_pass` in chunk order, so reductions are
//!    deterministic whatever the thread count;
//! 3. once ready, `apply(chunk, out)` writes the merged values of every chunk (in parallel).
//!
//! Elementwise methods (`linear`, `task_arithmetic`) need no pass; TIES needs the top-k cut of
//! each task vector (a sampled pass, then one counting pass, see
//! [`super::task_arithmetic`]); SLERP needs two norms and a dot product, model stock the task
//! vectors' Gram matrix per tensor or per row (one pass each); nuslerp three dot products (one
//! pass, or none per row); DELLA every row's mask (one pass over chunks of whole rows).
//!
//! Chunks are [`STREAM_CHUNK`] elements (the last one shorter) and start at multiples of it, so
//! a chunk's index fixes its position — random methods seed their draws by it. A stream whose
//! formula works on whole rows (nuslerp per row, DELLA's per-row ranks) asks for chunks of whole
//! rows instead ([`Stream::chunk_len`]); the same rule holds with its length.

use std::any::Any;

use rayon::prelude::*;

use super::Params;
use crate::error::Result;
use crate::tensor::DType;

/// Elements per streamed chunk: a multiple of 64 (chunks start on a bitset word) and of
/// [`super::util::CHUNK`]. Small enough that a chunk of three inputs and the output, as `f32`,
/// stay in a core's L2 cache.
pub const STREAM_CHUNK: usize = 1 << 15;

/// A statistics pass a stream asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// Every chunk.
    All,
    /// About `chunks` chunks, evenly spaced (all of them when the tensor has no more).
    Sample { chunks: usize },
}

impl Pass {
    /// The chunk indices this pass visits out of `total`, ascending.
    pub fn chunks(self, total: usize) -> Vec<usize> {
        match self {
            Pass::Sample { chunks } if chunks < total => {
                (0..chunks).map(|i| i * total / chunks).collect()
            }
            _ => (0..total).collect(),
        }
    }
}

/// One chunk of a tensor's inputs, decoded to `f32`.
#[derive(Clone, Copy, Debug)]
pub struct Chunk<'a> {
    /// Chunk index (`start / chunk length`, see [`Stream::chunk_len`]).
    pub index: usize,
    /// The chunk's first element in the flattened tensor.
    pub start: usize,
    /// The base model's values, when the merge has a base model.
    pub base: Option<&'a [f32]>,
    /// The other models' values, in recipe order.
    pub models: &'a [&'a [f32]],
}

impl Chunk<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.models
            .first()
            .map(|m| m.len())
            .or(self.base.map(<[f32]>::len))
            .unwrap_or(0)
    }

    /// True for an empty chunk.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A partial statistic of one chunk (each stream knows its own type).
pub type Partial = Box<dyn Any + Send>;

/// One tensor's merge, run chunk by chunk (see the module docs for the protocol).
pub trait Stream: Send + Sync {
    /// Called once before any chunk (with no partials), then after each pass with that pass's
    /// partials in chunk order. Returns the next pass, or `None` when `apply` may run. The
    /// default asks for none: an elementwise merge.
    fn next_pass(&mut self, partials: Vec<Partial>) -> Result<Option<Pass>> {
        let _ = partials;
        Ok(None)
    }
    /// Look at one chunk during the current pass (never called by the driver when no pass was
    /// asked for).
    fn observe(&self, chunk: &Chunk<'_>) -> Result<Partial> {
        let _ = chunk;
        unreachable!("observe called on a stream that asked for no pass")
    }
    /// Whether the chunks must carry the base model's values (a method that ignores the base,
    /// like `linear`, saves reading it).
    fn uses_base(&self) -> bool {
        true
    }
    /// Elements per chunk (the last one shorter): [`STREAM_CHUNK`] unless the stream needs
    /// chunks of whole rows. Asked once, before the first pass; must not change afterwards.
    fn chunk_len(&self) -> usize {
        STREAM_CHUNK
    }
    /// Write the merged values of one chunk into `out` (`out.len() == chunk.len()`).
    fn apply(&self, chunk: &Chunk<'_>, out: &mut [f32]) -> Result<()>;
}

/// What a method knows of a tensor before it sees the data: everything in
/// [`super::MergeInput`] but the values.
#[derive(Clone, Copy, Debug)]
pub struct StreamSpec<'a> {
    pub tensor: &'a str,
    pub shape: &'a [usize],
    /// Whether the merge has a base model.
    pub has_base: bool,
    /// Number of non-base models.
    pub models: usize,
    /// Per-model parameters, parallel to the models, defaults filled in.
    pub model_params: &'a [Params],
    pub global: &'a Params,
    /// The tensor's seed ([`super::MergeInput::seed`]).
    pub seed: u64,
}

impl StreamSpec<'_> {
    /// Element count.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Number of chunks of an `n`-element tensor.
pub fn chunk_count(n: usize) -> usize {
    n.div_ceil(STREAM_CHUNK)
}

/// The element range of chunk `c` of an `n`-element tensor.
pub fn chunk_range(c: usize, n: usize) -> std::ops::Range<usize> {
    c * STREAM_CHUNK..((c + 1) * STREAM_CHUNK).min(n)
}

/// Number of chunks of `len` elements (the last one shorter) of an `n`-element tensor.
pub fn chunk_count_of(n: usize, len: usize) -> usize {
    n.div_ceil(len.max(1))
}

/// The element range of chunk `c` of `len` elements of an `n`-element tensor.
pub fn chunk_range_of(c: usize, n: usize, len: usize) -> std::ops::Range<usize> {
    (c * len).min(n)..((c + 1) * len).min(n)
}

/// Run a stream over inputs already in memory (all of length `n`); chunks in parallel.
pub fn run_in_memory(
    mut stream: Box<dyn Stream>,
    n: usize,
    base: Option<&[f32]>,
    models: &[&[f32]],
) -> Result<Vec<f32>> {
    let len = stream.chunk_len();
    let total = chunk_count_of(n, len);
    let with_chunk = |c: usize, f: &mut dyn FnMut(&Chunk<'_>) -> Result<()>| {
        let r = chunk_range_of(c, n, len);
        let views: Vec<&[f32]> = models.iter().map(|m| &m[r.clone()]).collect();
        f(&Chunk {
            index: c,
            start: r.start,
            base: base.map(|b| &b[r.clone()]),
            models: &views,
        })
    };
    let mut partials = Vec::new();
    while let Some(pass) = stream.next_pass(partials)? {
        let stream = &*stream;
        partials = pass
            .chunks(total)
            .into_par_iter()
            .map(|c| {
                let mut part = None;
                with_chunk(c, &mut |chunk| {
                    part = Some(stream.observe(chunk)?);
                    Ok(())
                })?;
                Ok(part.expect("observed"))
            })
            .collect::<Result<Vec<_>>>()?;
    }
    let mut out = vec![0f32; n];
    let stream = &*stream;
    out.par_chunks_mut(len.max(1))
        .enumerate()
        .try_for_each(|(c, o)| with_chunk(c, &mut |chunk| stream.apply(chunk, o)))?;
    Ok(out)
}

/// Round an `f32` to `dtype` (round to nearest, ties to even, as torch casts) and widen it
/// back: one operation of mergekit's arithmetic in `dtype` is the `f32` operation on widened
/// operands followed by this (torch on CPU computes `bf16` / `f16` elementwise ops in `f32`).
pub fn rounding(dtype: DType) -> fn(f32) -> f32 {
    match dtype {
        DType::F32 => |x| x,
        DType::BF16 => |x| half::bf16::from_f32(x).to_f32(),
        DType::F16 => |x| half::f16::from_f32(x).to_f32(),
    }
}

/// A stream whose method computes in `f32` whatever the recipe's `dtype` (mergekit's `linear`),
/// run on inputs rounded to that dtype first, as mergekit casts every input to `dtype` when it
/// loads it (exact when the inputs are stored in it already).
pub struct RoundInputs {
    pub inner: Box<dyn Stream>,
    pub dtype: DType,
}

impl RoundInputs {
    fn rounded<R>(&self, chunk: &Chunk<'_>, f: impl FnOnce(&Chunk<'_>) -> R) -> R {
        let r = rounding(self.dtype);
        let round = |v: &[f32]| v.iter().map(|&x| r(x)).collect::<Vec<f32>>();
        let models: Vec<Vec<f32>> = chunk.models.iter().map(|m| round(m)).collect();
        let views: Vec<&[f32]> = models.iter().map(Vec::as_slice).collect();
        let base = chunk.base.map(round);
        f(&Chunk {
            index: chunk.index,
            start: chunk.start,
            base: base.as_deref(),
            models: &views,
        })
    }
}

impl Stream for RoundInputs {
    fn next_pass(&mut self, partials: Vec<Partial>) -> Result<Option<Pass>> {
        self.inner.next_pass(partials)
    }

    fn observe(&self, chunk: &Chunk<'_>) -> Result<Partial> {
        self.rounded(chunk, |c| self.inner.observe(c))
    }

    fn uses_base(&self) -> bool {
        self.inner.uses_base()
    }

    fn chunk_len(&self) -> usize {
        self.inner.chunk_len()
    }

    fn apply(&self, chunk: &Chunk<'_>, out: &mut [f32]) -> Result<()> {
        self.rounded(chunk, |c| self.inner.apply(c, out))
    }
}

/// Take the partials of a pass back as their concrete type (a stream's own invariant: it only
/// receives what its `observe` returned).
pub fn downcast<T: 'static>(partials: Vec<Partial>) -> Vec<T> {
    partials
        .into_iter()
        .map(|p| {
            *p.downcast::<T>()
                .expect("a stream receives its own partials")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_passes_spread_over_the_tensor() {
        assert_eq!(Pass::Sample { chunks: 4 }.chunks(10), vec![0, 2, 5, 7]);
        assert_eq!(Pass::Sample { chunks: 4 }.chunks(3), vec![0, 1, 2]);
        assert_eq!(Pass::All.chunks(3), vec![0, 1, 2]);
    }

    /// Mean-centres its one input: a pass for the sum, then an elementwise apply.
    struct Centre {
        n: usize,
        asked: bool,
        mean: Option<f32>,
    }

    impl Stream for Centre {
        fn next_pass(&mut self, partials: Vec<Partial>) -> Result<Option<Pass>> {
            if !self.asked {
                self.asked = true;
                return Ok(Some(Pass::All));
            }
            let sum: f64 = downcast::<f64>(partials).into_iter().sum();
            self.mean = Some((sum / self.n as f64) as f32);
            Ok(None)
        }

        fn observe(&self, chunk: &Chunk<'_>) -> Result<Partial> {
            Ok(Box::new(
                chunk.models[0].iter().map(|&x| f64::from(x)).sum::<f64>(),
            ))
        }

        fn apply(&self, chunk: &Chunk<'_>, out: &mut [f32]) -> Result<()> {
            let mean = self.mean.expect("pass ran");
            for (o, &x) in out.iter_mut().zip(chunk.models[0]) {
                *o = x - mean;
            }
            Ok(())
        }
    }

    #[test]
    fn passes_then_apply_over_several_chunks() {
        let n = 2 * STREAM_CHUNK + 5;
        let x: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let out = run_in_memory(
            Box::new(Centre {
                n,
                asked: false,
                mean: None,
            }),
            n,
            None,
            &[&x],
        )
        .unwrap();
        let mean = (n - 1) as f32 / 2.0;
        assert_eq!(out.len(), n);
        assert_eq!(out[0], -mean);
        assert_eq!(out[n - 1], mean);
    }
}
