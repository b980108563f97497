//! Which entries of a task vector `δ = θ − θ_base` survive, decided over streamed chunks
//! (see [`super::stream`]) — the selection stage of TIES, Model Breadcrumbs and DARE.
//!
//! **Rank windows** (TIES's top-k, Breadcrumbs' top-and-bottom drop): keep the entries whose
//! ascending |δ| rank lies in `[lo, hi)`, equal magnitudes ranked in index order. Each cut
//! (`lo`, `hi` when strictly inside `(0, n)`) is found exactly, never by sorting the tensor.
//!
//! *Tie rule.* Ranks ascend by `(|δ|, index)`, |δ| the exact `f32` difference of the inputs.
//! So when entries of equal magnitude straddle a cut, TIES's top-k keeps those with the
//! **largest** indices; Breadcrumbs keeps the largest indices at its lower cut and the
//! **smallest** at its upper (outlier) cut. mergekit 0.1.5 ranks with torch's `argsort` /
//! `sort`, which is not stable, so among tied entries it keeps whichever the sort happens to
//! put first; it also ranks the task vector in the recipe's dtype (rounded to bf16 in a bf16
//! recipe), where evomerge ranks the exact differences — a refinement of that order, since
//! rounding is monotone. Both keep the same count, every entry whose magnitude is strictly
//! inside the kept range and none strictly outside; only which of the entries tied at a cut
//! magnitude survive can differ. With `f32` inputs ties are rare; bf16 task vectors take few
//! distinct magnitudes, so on the bf16 golden cases (`tests/methods_bf16.rs`) a few per cent of
//! the entries are kept by one implementation and not the other.
//!
//!
//! 1. a sampled pass (16 evenly spaced chunks; the whole tensor when it has no more) gives the cut's sample quantile and a bracket of magnitudes around it,
//!    wide enough to hold the true cut with a margin of about four binomial standard deviations
//!    (a single value when the sample is the whole tensor, or when the cut falls in a run of
//!    equal magnitudes — bf16 task vectors tie a lot);
//! 2. one pass counts, per chunk, the entries below the bracket and keeps the magnitudes inside
//!    it (only a count when the bracket is one value); `select_nth_unstable` on those gives the
//!    exact cut value and how many entries of that value rank below the cut, and the per-chunk
//!    counts say which chunk holds the cut's entry;
//! 3. only if the cut fell outside the bracket: a pass builds a 32768-bucket histogram of the
//!    magnitudes' top bits, and step 2 runs again on the bucket holding the cut.
//!
//! The result is a [`Rule`] — per cut a magnitude, a chunk and a rank within that chunk —
//! applied entry by entry while merging (the chunk holding a cut finds its entry by counting),
//! so nothing of the tensor's size is stored.
//!
//! **Bernoulli** (DARE): each entry survives with probability `density`, drawn from `StdRng`s
//! seeded by the tensor's seed, the model index and the [`CHUNK`] index ([`Draws`]). Nothing is
//! stored: the draws are made again while merging; the L1 rescale costs one pass for its sums.
//!
//! With `rescale`, the kept entries are multiplied by `Σ|δ| / Σ|δ_kept|` (mergekit 0.1.5's L1
//! match; 1 when either sum is below 1e-7), which for rank windows costs one more pass.

use std::sync::Mutex;

use super::stream::{Pass, STREAM_CHUNK, chunk_count};
use super::util::{CHUNK, mix_seed};
use crate::simd::avx2_fn;

/// How many chunks a sampling pass visits.
const SAMPLE_CHUNKS: usize = 16;
const BUCKET_SHIFT: u32 = 16;
const BUCKETS: usize = 1 << (31 - BUCKET_SHIFT);

/// The float bits of `|x|`: ordered like the magnitudes for every non-NaN `x`.
#[inline(always)]
pub(crate) fn abs_bits(x: f32) -> u32 {
    x.to_bits() & 0x7fff_ffff
}

/// Where a cut of a rank window lies: at magnitude bits `value`, before the `rank`-th entry
/// (0-based, index order) of that magnitude in chunk `chunk`. Entries of that magnitude in
/// earlier chunks lie below the cut, those in later chunks above it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CutAt {
    value: u32,
    chunk: usize,
    rank: usize,
}

/// The kept entries of a rank window: entry `i` with magnitude bits `v` is kept when `(v, i)`
/// is at or above the lower cut and below the upper cut (lexicographic order, equal magnitudes
/// ranked by index); a missing cut is open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Rule {
    lo: Option<CutAt>,
    hi: Option<CutAt>,
}

impl Rule {
    /// The rule for chunk `index` with the chunk's inputs `m`, `b` (needed only by the chunk
    /// holding a cut, to find the cut's entry), with indices relative to the chunk.
    pub(crate) fn local(&self, index: usize, m: &[f32], b: &[f32]) -> LocalRule {
        let len = m.len() as u32;
        // the chunk-relative index of the cut: 0 (all of the cut's magnitude kept above it)
        // before, `len` after, found by counting inside the cut's own chunk
        let at = |c: &CutAt| -> u32 {
            match index.cmp(&c.chunk) {
                std::cmp::Ordering::Less => len,
                std::cmp::Ordering::Greater => 0,
                std::cmp::Ordering::Equal => m
                    .iter()
                    .zip(b)
                    .enumerate()
                    .filter(|(_, (x, y))| abs_bits(*x - *y) == c.value)
                    .nth(c.rank)
                    .map_or(len, |(k, _)| k as u32),
            }
        };
        LocalRule {
            lo_v: self.lo.map_or(0, |c| c.value),
            lo_i: self.lo.as_ref().map_or(0, at),
            hi_v: self.hi.map_or(u32::MAX, |c| c.value),
            hi_i: self.hi.as_ref().map_or(len, at),
        }
    }
}

/// A [`Rule`] for one chunk, indices relative to the chunk's start (so the hot loop compares
/// `u32`s): keep `(v, k) ≥ (lo_v, lo_i)` and `(v, k) < (hi_v, hi_i)`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LocalRule {
    lo_v: u32,
    lo_i: u32,
    hi_v: u32,
    hi_i: u32,
}

impl LocalRule {
    /// Whether entry `k` of the chunk, with magnitude bits `v`, is kept (branch-free).
    #[inline(always)]
    pub(crate) fn keeps(&self, v: u32, k: u32) -> bool {
        ((v > self.lo_v) | ((v == self.lo_v) & (k >= self.lo_i)))
            & ((v < self.hi_v) | ((v == self.hi_v) & (k < self.hi_i)))
    }
}

/// Which entries of a task vector survive, once decided.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Keep {
    All,
    Nothing,
    Window(Rule),
    /// Bit `i % 64` of word `i / 64` is set when entry `i` survives.
    Bits(Vec<u64>),
    /// DARE: entry `i` survives when its seeded draw is below a threshold (nothing stored; the
    /// draws are made again wherever needed).
    Random(Draws),
}

/// DARE's draws: a `u32` per entry from a counter-based hash — the entry's offset in its
/// [`CHUNK`] piece, keyed by a 64-bit key mixed from the run seed, the model and the piece index,
/// through MurmurHash3's 32-bit finaliser (Appleby) — so any range of entries is drawn directly,
/// in parallel and vectorised, the same on every run. An entry survives when its draw is below
/// `p · 2³²` (`0 < p < 1`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Draws {
    threshold: u32,
    seed: u64,
    model: u64,
}

impl Draws {
    fn new(p: f32, seed: u64, model: u64) -> Self {
        Draws {
            threshold: (f64::from(p) * 4_294_967_296.0).min(f64::from(u32::MAX)) as u32,
            seed,
            model,
        }
    }

    /// Entries with a draw below this survive.
    pub(crate) fn threshold(&self) -> u32 {
        self.threshold
    }

    /// The draws of entries `start .. start + out.len()` (`start` a multiple of [`CHUNK`]).
    pub(crate) fn fill(&self, start: usize, out: &mut [u32]) {
        debug_assert!(start.is_multiple_of(CHUNK));
        for (q, piece) in out.chunks_mut(CHUNK).enumerate() {
            let key = mix_seed(self.seed, self.model, (start / CHUNK + q) as u64);
            hash_draws(key as u32, (key >> 32) as u32, piece);
        }
    }
}

avx2_fn!(pub(crate) fn hash_draws(k0: u32, k1: u32, out: &mut [u32]) => hash_draws_body);

/// `out[i] = fmix32(((i ⊕ k0) · φ) ⊕ k1)`: a bijection of `i` for each key (φ the 32-bit
/// golden-ratio constant), with MurmurHash3's avalanche.
#[inline(always)]
fn hash_draws_body(k0: u32, k1: u32, out: &mut [u32]) {
    for (i, o) in out.iter_mut().enumerate() {
        let mut x = ((i as u32) ^ k0).wrapping_mul(0x9e37_79b9) ^ k1;
        x ^= x >> 16;
        x = x.wrapping_mul(0x85eb_ca6b);
        x ^= x >> 13;
        x = x.wrapping_mul(0xc2b2_ae35);
        x ^= x >> 16;
        *o = x;
    }
}

impl Keep {
    /// Which entries of chunk `index` (entries `start ..`, inputs `m`, `b`) survive:
    /// `keeps(k, v)` for entry `k` of the chunk with magnitude bits `v`.
    pub(crate) fn in_chunk<'a>(
        &'a self,
        index: usize,
        start: usize,
        m: &[f32],
        b: &[f32],
    ) -> impl Fn(usize, u32) -> bool + 'a {
        let rule = match self {
            Keep::Window(r) => Some(r.local(index, m, b)),
            _ => None,
        };
        let draws = match self {
            Keep::Random(d) => {
                let mut out = vec![0u32; m.len()];
                d.fill(start, &mut out);
                out
            }
            _ => Vec::new(),
        };
        move |k, v| match self {
            Keep::All => true,
            Keep::Nothing => false,
            Keep::Window(_) => rule.expect("local rule").keeps(v, k as u32),
            Keep::Random(d) => draws[k] < d.threshold(),
            Keep::Bits(w) => {
                let i = start + k;
                (w[i / 64] >> (i % 64)) & 1 == 1
            }
        }
    }
}

/// What a selection does, set up from the method's parameters.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Kind {
    /// Keep ascending ranks `[lo, hi)` (`0 ≤ lo < hi ≤ n`).
    Window { lo: usize, hi: usize },
    /// Keep each entry with probability `p`; `seed` and `model` seed the draws.
    Bernoulli { p: f32, seed: u64, model: u64 },
}

/// One cut of a rank window being searched for.
struct Cut {
    /// Ascending rank of the cut (`0 < pos < n`).
    pos: usize,
    phase: CutPhase,
    /// The histogram of the fallback pass (shared by the chunks; integer sums, so order-free).
    hist: Mutex<Vec<u64>>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum CutPhase {
    Sample,
    /// Magnitude bits `[lo, hi]` (inclusive) expected to hold the cut.
    Bracket(u32, u32),
    Histogram,
    Found(CutAt),
}

enum State {
    Window(Vec<Cut>, [bool; 2]),
    /// The kept set is known; the L1 sums for the rescale are not.
    Sums(Keep),
    Ready(Keep),
}

/// One chunk's contribution to a selection pass.
#[derive(Default)]
pub(crate) struct Part {
    sample: Vec<u32>,
    /// One per cut in its bracket phase.
    gather: Vec<Gathered>,
    sums: [f64; 2],
}

/// What one chunk holds of a cut's bracket `[lo, hi]`. The ends are counted, not listed:
/// task vectors of bf16 checkpoints take few distinct magnitudes, so a bracket's ends are often
/// long runs of ties.
#[derive(Default)]
struct Gathered {
    /// Entries below `lo`.
    below: usize,
    /// Entries equal to `lo`.
    at_lo: usize,
    /// Entries equal to `hi` (when `hi > lo`).
    at_hi: usize,
    /// The magnitudes strictly between `lo` and `hi`, in index order.
    between: Vec<u32>,
}

/// The selection of one task vector over a streamed tensor of `n` entries: ask [`Selector::pass`]
/// what it needs, feed it every chunk of that pass ([`Selector::observe`]), hand the parts back
/// in chunk order ([`Selector::absorb`]), until [`Selector::keep`] is known.
pub(crate) struct Selector {
    n: usize,
    rescale: bool,
    state: State,
    /// The L1 rescale factor (1 without rescale).
    scale: f32,
}

impl Selector {
    /// A selection of `kind` over `n` entries.
    pub(crate) fn new(n: usize, kind: Kind, rescale: bool) -> Self {
        let state = match kind {
            Kind::Window { lo, hi } if lo >= hi || n == 0 => State::Ready(Keep::Nothing),
            Kind::Window { lo, hi } if lo == 0 && hi >= n => {
                // every entry is kept; the rescale is then exactly 1
                State::Ready(Keep::All)
            }
            Kind::Window { lo, hi } => {
                let needed = [lo > 0, hi < n];
                let cuts = [lo, hi]
                    .into_iter()
                    .zip(needed)
                    .filter(|(_, need)| *need)
                    .map(|(pos, _)| Cut {
                        pos,
                        phase: CutPhase::Sample,
                        hist: Mutex::new(Vec::new()),
                    })
                    .collect();
                State::Window(cuts, needed)
            }
            Kind::Bernoulli { p, .. } if p <= 0.0 => State::Ready(Keep::Nothing),
            Kind::Bernoulli { p, seed, model } => {
                let keep = Keep::Random(Draws::new(p, seed, model));
                // without the rescale nothing is needed before merging
                if rescale {
                    State::Sums(keep)
                } else {
                    State::Ready(keep)
                }
            }
        };
        Selector {
            n,
            rescale,
            state,
            scale: 1.0,
        }
    }

    /// A selection that is already decided, with its rescale factor.
    pub(crate) fn decided(n: usize, keep: Keep, scale: f32) -> Self {
        Selector {
            n,
            rescale: false,
            state: State::Ready(keep),
            scale,
        }
    }

    /// The pass this selection needs next, `None` once decided.
    pub(crate) fn pass(&self) -> Option<Pass> {
        match &self.state {
            State::Ready(_) => None,
            State::Window(cuts, _) => Some(
                if cuts.iter().all(|c| matches!(c.phase, CutPhase::Sample)) {
                    Pass::Sample {
                        chunks: SAMPLE_CHUNKS,
                    }
                } else {
                    Pass::All
                },
            ),
            State::Sums(_) => Some(Pass::All),
        }
    }

    /// The decided selection (after [`Selector::pass`] returned `None`).
    pub(crate) fn keep(&self) -> &Keep {
        match &self.state {
            State::Ready(k) => k,
            _ => panic!("selection used before it was decided"),
        }
    }

    /// The L1 rescale factor of the kept entries (1 without `rescale`).
    pub(crate) fn scale(&self) -> f32 {
        self.scale
    }

    /// Look at chunk `index` (entries `start ..`) of the model `m` and base `b`.
    pub(crate) fn observe(&self, index: usize, start: usize, m: &[f32], b: &[f32]) -> Part {
        let mut part = Part::default();
        let mags = || m.iter().zip(b).map(|(x, y)| abs_bits(x - y));
        match &self.state {
            State::Ready(_) => {}
            State::Window(cuts, _) => {
                for cut in cuts {
                    match cut.phase {
                        CutPhase::Sample => {
                            // every cut of a window samples in the same pass: record once
                            if part.sample.is_empty() {
                                part.sample = mags().collect();
                            }
                        }
                        CutPhase::Bracket(lo, hi) => part.gather.push(gather(lo, hi, m, b)),
                        CutPhase::Histogram => {
                            let mut local = vec![0u32; BUCKETS];
                            for v in mags() {
                                local[(v >> BUCKET_SHIFT) as usize] += 1;
                            }
                            let mut hist = cut.hist.lock().expect("histogram poisoned");
                            hist.resize(BUCKETS, 0);
                            for (h, l) in hist.iter_mut().zip(local) {
                                *h += u64::from(l);
                            }
                        }
                        CutPhase::Found(..) => {}
                    }
                }
            }
            State::Sums(Keep::Random(d)) => {
                DRAWS.with(|buf| {
                    let mut buf = buf.borrow_mut();
                    buf.resize(m.len(), 0);
                    d.fill(start, &mut buf);
                    part.sums = random_sums(d.threshold(), &buf, m, b);
                });
            }
            State::Sums(keep) => {
                part.sums = l1_sums(m, b, keep.in_chunk(index, start, m, b));
            }
        }
        let _ = index;
        part
    }

    /// Take back the parts of the last pass, in chunk order.
    pub(crate) fn absorb(&mut self, parts: Vec<Part>) {
        let n = self.n;
        let state = std::mem::replace(&mut self.state, State::Ready(Keep::Nothing));
        self.state = match state {
            State::Ready(k) => State::Ready(k),
            State::Window(mut cuts, needed) => {
                if cuts.iter().all(|c| c.phase == CutPhase::Sample) {
                    let mut sample = Vec::with_capacity(parts.iter().map(|p| p.sample.len()).sum());
                    for p in parts {
                        sample.extend(p.sample);
                    }
                    let whole = sample.len() == n;
                    for cut in &mut cuts {
                        cut.phase = bracket(&mut sample, cut.pos, n, whole);
                    }
                } else {
                    // per bracketed cut, its chunks' findings in chunk order
                    let bracketed = cuts
                        .iter()
                        .filter(|c| matches!(c.phase, CutPhase::Bracket(..)))
                        .count();
                    let mut columns: Vec<Vec<Gathered>> =
                        (0..bracketed).map(|_| Vec::new()).collect();
                    for part in parts {
                        for (col, g) in columns.iter_mut().zip(part.gather) {
                            col.push(g);
                        }
                    }
                    let mut columns = columns.into_iter();
                    for cut in &mut cuts {
                        cut.phase = match cut.phase {
                            CutPhase::Bracket(lo, hi) => {
                                let chunks = columns.next().expect("one per bracket");
                                settle(cut.pos, lo, hi, chunks)
                            }
                            CutPhase::Histogram => {
                                let hist = std::mem::take(
                                    &mut *cut.hist.lock().expect("histogram poisoned"),
                                );
                                locate(&hist, cut.pos)
                            }
                            other => other,
                        };
                    }
                }
                let found: Vec<CutAt> = cuts
                    .iter()
                    .filter_map(|c| match c.phase {
                        CutPhase::Found(at) => Some(at),
                        _ => None,
                    })
                    .collect();
                if found.len() < cuts.len() {
                    State::Window(cuts, needed)
                } else {
                    let mut found = found.into_iter();
                    let rule = Rule {
                        lo: needed[0].then(|| found.next().expect("lower cut")),
                        hi: needed[1].then(|| found.next().expect("upper cut")),
                    };
                    if self.rescale {
                        State::Sums(Keep::Window(rule))
                    } else {
                        State::Ready(Keep::Window(rule))
                    }
                }
            }
            State::Sums(keep) => {
                let mut sums = [0.0f64; 2];
                for p in parts {
                    sums[0] += p.sums[0];
                    sums[1] += p.sums[1];
                }
                self.scale = rescale_factor(sums);
                State::Ready(keep)
            }
        };
    }

    /// Run every pass over whole in-memory vectors (chunks in parallel).
    pub(crate) fn run(&mut self, m: &[f32], b: &[f32]) {
        use rayon::prelude::*;
        let n = m.len();
        while let Some(pass) = self.pass() {
            let this = &*self;
            let parts = pass
                .chunks(chunk_count(n))
                .into_par_iter()
                .map(|c| {
                    let r = super::stream::chunk_range(c, n);
                    this.observe(c, r.start, &m[r.clone()], &b[r])
                })
                .collect();
            self.absorb(parts);
        }
    }
}

avx2_fn!(fn gather(lo: u32, hi: u32, m: &[f32], b: &[f32]) -> Gathered => gather_body);

thread_local! {
    /// Compaction buffer of [`gather_body`].
    static BETWEEN: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// What the chunk `m`, `b` holds of the bracket `[lo, hi]`. Counters are `u32` (a chunk has
/// fewer entries), so the counting loops vectorise.
#[inline(always)]
fn gather_body(lo: u32, hi: u32, m: &[f32], b: &[f32]) -> Gathered {
    let mags = m.iter().zip(b).map(|(x, y)| abs_bits(x - y));
    let (mut below, mut at_lo, mut at_hi) = (0u32, 0u32, 0u32);
    if lo == hi {
        for v in mags {
            below += u32::from(v < lo);
            at_lo += u32::from(v == lo);
        }
        return Gathered {
            below: below as usize,
            at_lo: at_lo as usize,
            ..Gathered::default()
        };
    }
    let between = BETWEEN.with(|buf| {
        let mut buf = buf.borrow_mut();
        buf.resize(m.len() + 1, 0);
        // branch-free compaction: write every value, advance on a hit
        let mut len = 0usize;
        for v in mags {
            below += u32::from(v < lo);
            at_lo += u32::from(v == lo);
            at_hi += u32::from(v == hi);
            buf[len] = v;
            len += usize::from(v > lo && v < hi);
        }
        buf[..len].to_vec()
    });
    Gathered {
        below: below as usize,
        at_lo: at_lo as usize,
        at_hi: at_hi as usize,
        between,
    }
}

thread_local! {
    /// DARE draws of one chunk, for [`Selector::observe`].
    static DRAWS: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

avx2_fn!(fn random_sums(threshold: u32, draws: &[u32], m: &[f32], b: &[f32]) -> [f64; 2] => random_sums_body);

/// `[Σ|δ|, Σ|δ_kept|]` over one chunk for DARE's draws: `f32` lanes within 64 entries, `f64`
/// across.
#[inline(always)]
fn random_sums_body(threshold: u32, draws: &[u32], m: &[f32], b: &[f32]) -> [f64; 2] {
    let (mut before, mut after) = (0.0f64, 0.0f64);
    for ((m64, b64), r64) in m.chunks(64).zip(b.chunks(64)).zip(draws.chunks(64)) {
        let (mut all, mut kept) = ([0.0f32; 8], [0.0f32; 8]);
        let (m8s, b8s, r8s) = (
            m64.chunks_exact(8),
            b64.chunks_exact(8),
            r64.chunks_exact(8),
        );
        let tail = m8s.remainder().len();
        for ((m8, b8), r8) in m8s.zip(b8s).zip(r8s) {
            for k in 0..8 {
                let v = (m8[k] - b8[k]).abs();
                all[k] += v;
                kept[k] += v * u32::from(r8[k] < threshold) as f32;
            }
        }
        let start = m64.len() - tail;
        for k in 0..tail {
            let v = (m64[start + k] - b64[start + k]).abs();
            all[k] += v;
            kept[k] += v * u32::from(r64[start + k] < threshold) as f32;
        }
        before += f64::from(all.iter().sum::<f32>());
        after += f64::from(kept.iter().sum::<f32>());
    }
    [before, after]
}

/// `Σ|δ| / Σ|δ_kept|`, or 1 when either is below 1e-7.
fn rescale_factor([before, after]: [f64; 2]) -> f32 {
    if before < 1e-7 || after < 1e-7 {
        1.0
    } else {
        (before / after) as f32
    }
}

/// `[Σ|δ|, Σ|δ_kept|]` over one chunk; `keep(k, v)` for entry `k` of the chunk.
fn l1_sums(m: &[f32], b: &[f32], keep: impl Fn(usize, u32) -> bool) -> [f64; 2] {
    let (mut before, mut after) = (0.0f64, 0.0f64);
    for (k, (x, y)) in m.iter().zip(b).enumerate() {
        let v = abs_bits(x - y);
        let a = f64::from(f32::from_bits(v));
        before += a;
        if keep(k, v) {
            after += a;
        }
    }
    [before, after]
}

/// The bracket for the cut at rank `pos` of `n` from a sample of the magnitudes (reordered).
fn bracket(sample: &mut [u32], pos: usize, n: usize, whole: bool) -> CutPhase {
    let m = sample.len();
    if m == 0 {
        return CutPhase::Histogram;
    }
    if whole {
        let (_, &mut v, _) = sample.select_nth_unstable(pos);
        return CutPhase::Bracket(v, v);
    }
    let q = pos as f64 / n as f64;
    let r = (q * m as f64) as usize;
    let margin = (4.0 * (m as f64 * q * (1.0 - q)).sqrt()) as usize + m / 400 + 8;
    let lo = if r > margin {
        *sample.select_nth_unstable(r - margin).1
    } else {
        0
    };
    let hi = if r + margin < m {
        *sample.select_nth_unstable(r + margin).1
    } else {
        u32::MAX
    };
    CutPhase::Bracket(lo, hi)
}

/// Where in a bracket a cut fell.
#[derive(Clone, Copy)]
enum At {
    Lo,
    Between,
    Hi,
}

/// The cut at rank `pos` from each chunk's findings in the bracket `[lo, hi]`; back to the
/// histogram when the cut is not inside the bracket.
fn settle(pos: usize, lo: u32, hi: u32, chunks: Vec<Gathered>) -> CutPhase {
    let sum = |f: fn(&Gathered) -> usize| chunks.iter().map(f).sum::<usize>();
    let (below, at_lo, at_hi) = (sum(|g| g.below), sum(|g| g.at_lo), sum(|g| g.at_hi));
    let between = sum(|g| g.between.len());
    if pos < below || pos >= below + at_lo + between + at_hi {
        return CutPhase::Histogram;
    }
    // the cut's value, how many entries of that value rank below it, and that value's count
    // in each chunk
    let r = pos - below;
    let (value, mut ties, at) = if r < at_lo {
        (lo, r, At::Lo)
    } else if r < at_lo + between {
        let mut values: Vec<u32> = chunks
            .iter()
            .flat_map(|g| g.between.iter().copied())
            .collect();
        let (_, &mut value, _) = values.select_nth_unstable(r - at_lo);
        let lower = values.iter().filter(|&&v| v < value).count();
        (value, r - at_lo - lower, At::Between)
    } else {
        (hi, r - at_lo - between, At::Hi)
    };
    let count = |g: &Gathered| match at {
        At::Lo => g.at_lo,
        At::Hi => g.at_hi,
        At::Between => g.between.iter().filter(|&&v| v == value).count(),
    };
    // the chunk holding the cut's entry
    for (c, g) in chunks.iter().enumerate() {
        let here = count(g);
        if ties < here {
            return CutPhase::Found(CutAt {
                value,
                chunk: c,
                rank: ties,
            });
        }
        ties -= here;
    }
    unreachable!("the cut's own entry is among the equal ones")
}

/// The bracket of the histogram bucket holding rank `pos`.
fn locate(hist: &[u64], pos: usize) -> CutPhase {
    let mut below = 0u64;
    for (k, &count) in hist.iter().enumerate() {
        if below + count > pos as u64 {
            let lo = (k as u32) << BUCKET_SHIFT;
            return CutPhase::Bracket(lo, lo | ((1 << BUCKET_SHIFT) - 1));
        }
        below += count;
    }
    unreachable!("rank {pos} lies in some bucket of a histogram of more entries")
}

/// Entries of a chunk per sampled pass, for the docs' arithmetic.
const _: () = assert!(STREAM_CHUNK.is_multiple_of(CHUNK));

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// Kept indices by brute force: ascending (|δ|, index), ranks [lo, hi).
    fn reference(d: &[f32], lo: usize, hi: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..d.len()).collect();
        order.sort_by(|&a, &b| abs_bits(d[a]).cmp(&abs_bits(d[b])).then(a.cmp(&b)));
        let mut want = order[lo..hi].to_vec();
        want.sort();
        want
    }

    fn kept(sel: &Selector, d: &[f32]) -> Vec<usize> {
        let n = d.len();
        let zero = vec![0.0f32; n];
        let mut out = Vec::new();
        for c in 0..chunk_count(n) {
            let r = super::super::stream::chunk_range(c, n);
            let keeps = sel
                .keep()
                .in_chunk(c, r.start, &d[r.clone()], &zero[r.clone()]);
            out.extend(r.filter(|&i| keeps(i % STREAM_CHUNK, abs_bits(d[i]))));
        }
        out
    }

    #[test]
    fn windows_on_sampled_tensors_match_a_sort() {
        // several chunks, so the bracket comes from a sample; smooth and heavily tied values
        let n = 40 * STREAM_CHUNK + 123;
        let mut rng = StdRng::seed_from_u64(5);
        let smooth: Vec<f32> = (0..n).map(|_| rng.random::<f32>() - 0.5).collect();
        let tied: Vec<f32> = (0..n)
            .map(|_| (rng.random_range(0..9) as f32 - 4.0) * 0.25)
            .collect();
        let zero = vec![0.0f32; n];
        for d in [&smooth, &tied] {
            for (lo, hi) in [(n / 2, n), (n / 10, n / 3), (1, n - 1), (n - 1, n)] {
                let mut sel = Selector::new(n, Kind::Window { lo, hi }, true);
                sel.run(d, &zero);
                assert_eq!(kept(&sel, d), reference(d, lo, hi), "window {lo}..{hi}");
                let before: f64 = d.iter().map(|x| f64::from(x.abs())).sum();
                let after: f64 = reference(d, lo, hi)
                    .iter()
                    .map(|&i| f64::from(d[i].abs()))
                    .sum();
                let want = (before / after) as f32;
                assert!((sel.scale() - want).abs() <= 1e-5 * want, "rescale");
            }
        }
    }

    #[test]
    fn a_sample_that_misses_falls_back_to_the_histogram() {
        // the sampled chunks (every 40/16-th) are all small; the rest is large, so the sample's
        // median is far from the true one
        let n = 40 * STREAM_CHUNK;
        let sampled = Pass::Sample {
            chunks: SAMPLE_CHUNKS,
        }
        .chunks(chunk_count(n));
        let d: Vec<f32> = (0..n)
            .map(|i| {
                let c = i / STREAM_CHUNK;
                let x = (i % 977) as f32 * 1e-3;
                if sampled.contains(&c) { x } else { 10.0 + x }
            })
            .collect();
        let zero = vec![0.0f32; n];
        let mut sel = Selector::new(n, Kind::Window { lo: n / 2, hi: n }, false);
        let mut passes = 0;
        while let Some(pass) = sel.pass() {
            passes += 1;
            let parts = pass
                .chunks(chunk_count(n))
                .into_iter()
                .map(|c| {
                    let r = super::super::stream::chunk_range(c, n);
                    sel.observe(c, r.start, &d[r.clone()], &zero[r])
                })
                .collect();
            sel.absorb(parts);
        }
        assert_eq!(passes, 4, "sample, bracket (missed), histogram, bucket");
        assert_eq!(kept(&sel, &d), reference(&d, n / 2, n));
    }

    /// The hashed draws behave like independent uniform ones: the kept share matches `p`,
    /// neighbours are uncorrelated, and another model or seed draws another mask.
    #[test]
    fn dare_draws_keep_the_share_independently() {
        let n = 64 * CHUNK;
        let d = Draws::new(0.3, 7, 0);
        let mut r = vec![0u32; n];
        d.fill(0, &mut r);
        let keep: Vec<f64> = r
            .iter()
            .map(|&x| f64::from(u8::from(x < d.threshold())))
            .collect();
        let share = keep.iter().sum::<f64>() / n as f64;
        // binomial sd = sqrt(0.21 / 2^20) ≈ 0.00045
        assert!((share - 0.3).abs() < 0.002, "share {share}");
        let cov = keep
            .windows(2)
            .map(|w| (w[0] - 0.3) * (w[1] - 0.3))
            .sum::<f64>()
            / n as f64;
        assert!(
            (cov / 0.21).abs() < 0.01,
            "lag-1 correlation {}",
            cov / 0.21
        );
        // a range drawn on its own equals the same range of a longer draw
        let mut part = vec![0u32; 2 * CHUNK];
        d.fill(3 * CHUNK, &mut part);
        assert_eq!(part, r[3 * CHUNK..5 * CHUNK]);
        for other in [Draws::new(0.3, 7, 1), Draws::new(0.3, 8, 0)] {
            let mut o = vec![0u32; CHUNK];
            other.fill(0, &mut o);
            let same = o
                .iter()
                .zip(&r)
                .filter(|(a, b)| (**a < d.threshold()) == (**b < d.threshold()))
                .count();
            // independent masks agree on 0.3² + 0.7² = 58 % of entries
            let agree = same as f64 / CHUNK as f64;
            assert!((agree - 0.58).abs() < 0.02, "agreement {agree}");
        }
    }

    #[test]
    fn settle_locates_cuts_at_either_end_or_between() {
        let chunks = || {
            vec![
                Gathered {
                    below: 2,
                    at_lo: 3,
                    at_hi: 4,
                    between: vec![7, 5],
                },
                Gathered {
                    below: 1,
                    at_lo: 1,
                    at_hi: 2,
                    between: vec![6],
                },
            ]
        };
        // ascending ranks: 3 below, four 4s (3..7), 5 6 7 (7..10), six 8s (10..16)
        let found = |value, chunk, rank| CutPhase::Found(CutAt { value, chunk, rank });
        assert_eq!(settle(5, 4, 8, chunks()), found(4, 0, 2));
        assert_eq!(settle(6, 4, 8, chunks()), found(4, 1, 0));
        assert_eq!(settle(8, 4, 8, chunks()), found(6, 1, 0));
        assert_eq!(settle(9, 4, 8, chunks()), found(7, 0, 0));
        assert_eq!(settle(12, 4, 8, chunks()), found(8, 0, 2));
        assert_eq!(settle(15, 4, 8, chunks()), found(8, 1, 1));
        assert_eq!(settle(2, 4, 8, chunks()), CutPhase::Histogram);
        assert_eq!(settle(16, 4, 8, chunks()), CutPhase::Histogram);
    }

    #[test]
    fn a_cut_inside_a_run_of_ties_splits_it_by_index() {
        // |δ| ∈ {1, 2}: 2.5 chunks of ones then twos; keep the top n − pos: the cut falls
        // inside the ones, in the middle chunk, so only that chunk needs the count
        let n = 5 * STREAM_CHUNK / 2;
        let d: Vec<f32> = (0..n)
            .map(|i| if i < 2 * STREAM_CHUNK { 1.0 } else { -2.0 })
            .collect();
        let zero = vec![0.0f32; n];
        let pos = STREAM_CHUNK + 17;
        let mut sel = Selector::new(n, Kind::Window { lo: pos, hi: n }, false);
        sel.run(&d, &zero);
        let got = kept(&sel, &d);
        assert_eq!(got.len(), n - pos);
        assert_eq!(got[0], pos, "equal magnitudes rank by index");
        assert_eq!(got, reference(&d, pos, n));
    }
}
