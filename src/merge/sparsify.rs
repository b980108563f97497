//! Sparsification of task vectors `δ = θ − θ_base`, the first stage of the task-arithmetic
//! family (see [`super::task_arithmetic`]). Each method decides which entries of δ survive;
//! nothing here materialises δ, it is recomputed from the two inputs. The merge itself streams
//! the selection (`select.rs`: sampled bracket, one counting pass, exact cut); [`sparsify`]
//! runs the same selection over whole tensors and returns a bitset.
//!
//! - [`Sparsify::Magnitude`] (TIES, Yadav et al. 2023): keep the `k = max(1, ⌊density·n⌋)`
//!   entries of largest |δ| (equal magnitudes ranked in index order). Linear-time selection with
//!   `select_nth_unstable` on the few entries near the cut — never a full sort.
//! - [`Sparsify::Random`] (DARE, Yu et al. 2024): keep each entry with probability `density`.
//! - [`Sparsify::Breadcrumbs`] (Davari & Belilovsky 2024): drop the `⌊gamma·n⌋` largest entries
//!   and then the smallest, keeping `⌊density·n⌋` (the outlier drop shrinks when both do not fit).
//! - [`Sparsify::Della`] (Deep et al. 2024, MAGPRUNE): within each row (slice along axis 1; a
//!   1-D tensor is one row) rank |δ|; keep with probability
//!   `p = density − ε + 2ε·(rank−1)/(len−1)`, so the smallest entry gets `density − ε` and the
//!   largest `density + ε`. Needs `0 < density ± ε < 1`.
//!
//! `rescale` multiplies the kept entries by `Σ|δ| / Σ|δ_kept|` — mergekit 0.1.5's L1-norm match,
//! not a bare `1/density` — unless either sum is below 1e-7. A density ≥ 1 keeps everything
//! untouched (and skips the rescale), as in mergekit. Random draws depend only on the tensor's
//! seed, the model index and the entry's place — a keyed hash per chunk piece (DARE) or per row
//! (DELLA), see `select.rs` — so results do not depend on the thread count.

use rayon::prelude::*;

use super::select::{Keep, Kind, Selector, abs_bits, hash_draws};
use super::stream::{chunk_count, chunk_range};
use super::util::{chunked_sum, mix_seed};
use crate::simd::avx2_fn;

/// Which entries of a task vector survive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sparsify {
    /// Top-k by magnitude (TIES).
    Magnitude,
    /// Bernoulli drop (DARE).
    Random,
    /// Drop the largest `gamma` share and the smallest (Model Breadcrumbs).
    Breadcrumbs,
    /// Magnitude-ranked drop probabilities (DELLA's MAGPRUNE).
    Della,
}

/// The parameters of one task vector's sparsification.
#[derive(Clone, Copy, Debug)]
pub struct SparsifyArgs {
    pub density: f64,
    pub gamma: f64,
    pub epsilon: f64,
    pub rescale: bool,
    /// The tensor's seed ([`super::MergeInput::seed`]).
    pub seed: u64,
    /// The model's index among the inputs (keeps models' random draws independent).
    pub model: u64,
}

/// Which entries survive.
#[derive(Clone, Debug, PartialEq)]
pub enum Kept {
    /// Every entry (density ≥ 1, or no sparsification).
    All,
    /// No entry.
    Nothing,
    /// Bit `i % 64` of word `i / 64` is set when entry `i` survives.
    Mask(Vec<u64>),
}

impl Kept {
    /// Whether entry `i` survives.
    pub fn get(&self, i: usize) -> bool {
        match self {
            Kept::All => true,
            Kept::Nothing => false,
            Kept::Mask(w) => (w[i / 64] >> (i % 64)) & 1 == 1,
        }
    }
}

/// A sparsified task vector: which entries survive and the factor applied to them.
#[derive(Clone, Debug, PartialEq)]
pub struct Sparsified {
    pub kept: Kept,
    pub scale: f32,
}

#[inline]
fn mag(m: &[f32], b: &[f32], i: usize) -> u32 {
    abs_bits(m[i] - b[i])
}

/// Sparsify the task vector `model − base` of a tensor with `shape`. The error is a message
/// for the caller to wrap with the tensor's name.
pub fn sparsify(
    kind: Sparsify,
    model: &[f32],
    base: &[f32],
    shape: &[usize],
    args: &SparsifyArgs,
) -> Result<Sparsified, String> {
    let n = model.len();
    let density = args.density;
    if density >= 1.0 {
        return Ok(Sparsified {
            kept: Kept::All,
            scale: 1.0,
        });
    }
    if kind == Sparsify::Della {
        if density <= 0.0 {
            return Ok(Sparsified {
                kept: Kept::Nothing,
                scale: 1.0,
            });
        }
        let eps = args.epsilon;
        if density + eps >= 1.0 || density - eps <= 0.0 {
            return Err(format!(
                "della: density ± epsilon must lie in (0, 1), got density {density} \
                 and epsilon {eps}"
            ));
        }
        let w = magprune(model, base, shape, density, eps, args);
        let scale = if args.rescale {
            let [before, after] = l1_norms(model, base, &w);
            if before < 1e-7 || after < 1e-7 {
                1.0
            } else {
                (before / after) as f32
            }
        } else {
            1.0
        };
        return Ok(Sparsified {
            kept: Kept::Mask(w),
            scale,
        });
    }
    let mut sel = selector(kind, n, args);
    sel.run(model, base);
    let kept = match sel.keep() {
        Keep::All => Kept::All,
        Keep::Nothing => Kept::Nothing,
        Keep::Bits(w) => Kept::Mask(w.clone()),
        keep @ (Keep::Window(_) | Keep::Random(_)) => {
            let mut w = vec![0u64; n.div_ceil(64)];
            for c in 0..chunk_count(n) {
                let r = chunk_range(c, n);
                let (mc, bc) = (&model[r.clone()], &base[r.clone()]);
                let keeps = keep.in_chunk(c, r.start, mc, bc);
                for (k, (x, y)) in mc.iter().zip(bc).enumerate() {
                    if keeps(k, abs_bits(x - y)) {
                        let i = r.start + k;
                        w[i / 64] |= 1 << (i % 64);
                    }
                }
            }
            Kept::Mask(w)
        }
    };
    Ok(Sparsified {
        kept,
        scale: sel.scale(),
    })
}

/// The streamed selection for a task vector of `n` entries (any kind but DELLA, whose
/// per-row ranking needs whole rows). `density ≥ 1` keeps everything, unscaled.
pub(crate) fn selector(kind: Sparsify, n: usize, args: &SparsifyArgs) -> Selector {
    let density = args.density;
    if density >= 1.0 {
        return Selector::decided(n, Keep::All, 1.0);
    }
    let window = |lo: usize, hi: usize| Selector::new(n, Kind::Window { lo, hi }, args.rescale);
    match kind {
        Sparsify::Magnitude => {
            if density <= 0.0 || n == 0 {
                Selector::decided(n, Keep::Nothing, 1.0)
            } else {
                let k = ((density * n as f64) as usize).clamp(1, n);
                window(n - k, n)
            }
        }
        Sparsify::Breadcrumbs => {
            let target = (density * n as f64) as usize;
            let n_top = (args.gamma * n as f64) as usize;
            let n_bot = n.saturating_sub(target + n_top);
            if target == 0 {
                Selector::decided(n, Keep::Nothing, 1.0)
            } else {
                window(n_bot, (n_bot + target).min(n))
            }
        }
        Sparsify::Random => Selector::new(
            n,
            Kind::Bernoulli {
                p: density.max(0.0) as f32,
                seed: args.seed,
                model: args.model,
            },
            args.rescale,
        ),
        Sparsify::Della => unreachable!("DELLA ranks whole rows and does not stream"),
    }
}

/// `[Σ|δ|, Σ|δ_kept|]` over the whole tensor for a given mask (deterministic chunked sum).
fn l1_norms(m: &[f32], b: &[f32], words: &[u64]) -> [f64; 2] {
    chunked_sum(m.len(), |r| {
        let (mut before, mut after) = (0.0f64, 0.0f64);
        let start = r.start;
        let (mc, bc) = (&m[r.clone()], &b[r]);
        for (g, (m64, b64)) in mc.chunks(64).zip(bc.chunks(64)).enumerate() {
            let word = words[start / 64 + g];
            let (mut all, mut kept) = ([0.0f32; 8], [0.0f32; 8]);
            for (k, (&x, &y)) in m64.iter().zip(b64).enumerate() {
                let a = (x - y).abs();
                all[k % 8] += a;
                kept[k % 8] += if (word >> k) & 1 == 1 { a } else { 0.0 };
            }
            before += f64::from(all.iter().sum::<f32>());
            after += f64::from(kept.iter().sum::<f32>());
        }
        [before, after]
    })
}

/// Sort `keys` (`magnitude bits << 32 | index`, in index order) by magnitude, equal magnitudes
/// keeping their index order — the order `sort_unstable` gives such keys — with a stable LSD
/// radix sort of the 31 magnitude bits (three 11-bit digits; a digit every key shares is
/// skipped). `spare` is scratch.
fn sort_by_magnitude(keys: &mut Vec<u64>, spare: &mut Vec<u64>) {
    spare.resize(keys.len(), 0);
    let mut counts = vec![0usize; 1 << 11];
    for shift in [32, 43, 54] {
        counts.fill(0);
        for &k in keys.iter() {
            counts[((k >> shift) & 0x7ff) as usize] += 1;
        }
        if counts.contains(&keys.len()) {
            continue;
        }
        let mut at = 0;
        for c in counts.iter_mut() {
            let here = *c;
            *c = at;
            at += here;
        }
        for &k in keys.iter() {
            let d = ((k >> shift) & 0x7ff) as usize;
            spare[counts[d]] = k;
            counts[d] += 1;
        }
        std::mem::swap(keys, spare);
    }
}

/// MAGPRUNE over rows of `len` entries: keep probability `lo + two_eps · rank / (len − 1)`.
pub(crate) struct RowProbs {
    len: usize,
    lo: f32,
    two_eps: f32,
    seed: u64,
    model: u64,
}

/// Reusable buffers for [`RowProbs::mask`] (one set per [`RowProbs`]: the probability table
/// is kept while the row length stays the same).
#[derive(Default)]
pub(crate) struct RowBufs {
    keys: Vec<u64>,
    spare: Vec<u64>,
    draws: Vec<u32>,
    /// `p(rank)` for every rank of a row (computed once per row length).
    probs: Vec<f32>,
}

impl RowProbs {
    /// Keep probability of rank `rank` (0 = smallest magnitude).
    #[inline(always)]
    fn p(&self, rank: usize) -> f32 {
        let norm = if self.len > 1 {
            rank as f32 / (self.len - 1) as f32
        } else {
            0.5
        };
        self.lo + norm * self.two_eps
    }

    /// Keep flags of row number `row`, whose entry `c` has magnitude bits `mag(c)`, handed to
    /// `out(c, flag)`: entry `c` is kept when its uniform draw `u_c < p(rank_c)`, ranks counted
    /// from the smallest magnitude, equal magnitudes in index order (a stable radix sort).
    fn mask(
        &self,
        row: usize,
        mag: impl Fn(usize) -> u32,
        bufs: &mut RowBufs,
        mut out: impl FnMut(usize, u8),
    ) {
        let len = self.len;
        if bufs.probs.len() != len {
            bufs.probs.clear();
            bufs.probs.extend((0..len).map(|r| self.p(r)));
        }
        let RowBufs {
            keys,
            spare,
            draws,
            probs,
        } = bufs;
        keys.clear();
        keys.extend((0..len).map(|c| (u64::from(mag(c)) << 32) | c as u64));
        sort_by_magnitude(keys, spare);
        // uniform draws in [0, 1) from the row's keyed hash (24 bits each)
        draws.resize(len, 0);
        let key = mix_seed(self.seed, self.model, row as u64);
        hash_draws(key as u32, (key >> 32) as u32, draws);
        for (k, &p) in keys.iter().zip(probs.iter()) {
            let c = (*k & 0xffff_ffff) as usize;
            let u = (draws[c] >> 8) as f32 * (1.0 / 16_777_216.0);
            out(c, u8::from(u < p));
        }
    }
}

/// DELLA's decision for one task vector with rows of `len` entries, before seeing the data: `None`
/// when it keeps everything or nothing (`density` ≥ 1 or ≤ 0, as [`sparsify`] decides, with
/// the same error for `density ± epsilon` outside (0, 1)), else the rows' keep probabilities.
pub(crate) fn della_rows(args: &SparsifyArgs, len: usize) -> Result<Option<RowProbs>, String> {
    let (density, eps) = (args.density, args.epsilon);
    if density >= 1.0 || density <= 0.0 {
        return Ok(None);
    }
    if density + eps >= 1.0 || density - eps <= 0.0 {
        return Err(format!(
            "della: density ± epsilon must lie in (0, 1), got density {density} \
             and epsilon {eps}"
        ));
    }
    Ok(Some(RowProbs {
        len,
        lo: (density - eps) as f32,
        two_eps: (2.0 * eps) as f32,
        seed: args.seed,
        model: args.model,
    }))
}

/// MAGPRUNE over one streamed chunk of whole rows (entries `start ..` of the tensor, `start` a
/// multiple of the row length): the chunk's keep bitset (bit `i` for entry `start + i`) and,
/// for the rescale, its share of [`l1_norms`]' sums ([`L1Piece`]).
pub(crate) fn della_chunk(
    rows: &RowProbs,
    start: usize,
    m: &[f32],
    b: &[f32],
    rescale: bool,
) -> (Vec<u64>, Option<L1Piece>) {
    let n = m.len();
    let mut words = vec![0u64; n.div_ceil(64)];
    let mut bufs = RowBufs::default();
    let first_row = start / rows.len.max(1);
    for (r, (mr, br)) in m.chunks(rows.len).zip(b.chunks(rows.len)).enumerate() {
        let off = r * rows.len;
        rows.mask(
            first_row + r,
            |c| mag(mr, br, c),
            &mut bufs,
            |c, v| {
                let i = off + c;
                words[i / 64] |= u64::from(v) << (i % 64);
            },
        );
    }
    let piece = rescale.then(|| L1Piece::new(start, m, b, &words));
    (words, piece)
}

/// One chunk's share of [`l1_norms`]: the `|δ|` and kept flags of the entries before its first
/// and after its last whole 64-entry group (groups are counted from the tensor's start, and a
/// group split between chunks must be summed in its entries' order), and each whole group's
/// `[Σ|δ|, Σ|δ_kept|]` in between. [`L1Fold`] puts the chunks back together.
pub(crate) struct L1Piece {
    head: Vec<(f32, bool)>,
    start: usize,
    groups: Vec<[f32; 2]>,
    tail: Vec<(f32, bool)>,
}

/// `[Σ|δ|, Σ|δ_kept|]` of up to 64 entries in [`l1_norms`]' order (eight lanes, then summed).
#[inline(always)]
fn group_sums(entries: impl Iterator<Item = (f32, bool)>) -> [f32; 2] {
    let (mut all, mut kept) = ([0.0f32; 8], [0.0f32; 8]);
    for (k, (a, keep)) in entries.enumerate() {
        all[k % 8] += a;
        kept[k % 8] += if keep { a } else { 0.0 };
    }
    [all.iter().sum::<f32>(), kept.iter().sum::<f32>()]
}

avx2_fn!(fn l1_groups(
    m: &[f32],
    b: &[f32],
    words: &[u64],
    first: usize,
    out: &mut Vec<[f32; 2]>,
) => l1_groups_body);

/// [`group_sums`] of each whole 64-entry group of `m − b`, whose keep flags are bits `first ..`
/// of `words`; fixed-size arrays so the lanes vectorise (same order of additions).
#[inline(always)]
fn l1_groups_body(m: &[f32], b: &[f32], words: &[u64], first: usize, out: &mut Vec<[f32; 2]>) {
    for (g, (m64, b64)) in m.chunks_exact(64).zip(b.chunks_exact(64)).enumerate() {
        let i = first + 64 * g;
        let (w, r) = (i / 64, i % 64);
        let word = if r == 0 {
            words[w]
        } else {
            (words[w] >> r) | (words[w + 1] << (64 - r))
        };
        let m64: &[f32; 64] = m64.try_into().expect("64 entries");
        let b64: &[f32; 64] = b64.try_into().expect("64 entries");
        let (mut all, mut kept) = ([0.0f32; 8], [0.0f32; 8]);
        for k8 in 0..8 {
            for l in 0..8 {
                let k = 8 * k8 + l;
                let a = (m64[k] - b64[k]).abs();
                all[l] += a;
                kept[l] += if (word >> k) & 1 == 1 { a } else { 0.0 };
            }
        }
        out.push([all.iter().sum::<f32>(), kept.iter().sum::<f32>()]);
    }
}

impl L1Piece {
    fn new(start: usize, m: &[f32], b: &[f32], words: &[u64]) -> Self {
        let n = m.len();
        let entry = |i: usize| ((m[i] - b[i]).abs(), (words[i / 64] >> (i % 64)) & 1 == 1);
        let head_end = (start.next_multiple_of(64) - start).min(n);
        let body_end = head_end + (n - head_end) / 64 * 64;
        L1Piece {
            head: (0..head_end).map(entry).collect(),
            start: start + head_end,
            groups: {
                let mut groups = Vec::with_capacity((body_end - head_end) / 64);
                l1_groups(
                    &m[head_end..body_end],
                    &b[head_end..body_end],
                    words,
                    head_end,
                    &mut groups,
                );
                groups
            },
            tail: (body_end..n).map(entry).collect(),
        }
    }
}

/// Adds [`L1Piece`]s, in chunk order, exactly as [`l1_norms`] sums a whole tensor of `n`
/// entries: group sums in order within each [`super::util::CHUNK`], those partials in order.
pub(crate) struct L1Fold {
    n: usize,
    /// The next entry expected.
    at: usize,
    /// The group being assembled from single entries.
    pending: Vec<(f32, bool)>,
    /// The `CHUNK` being summed, its partial sum, and the total of those before it.
    chunk: usize,
    part: [f64; 2],
    acc: [f64; 2],
}

impl L1Fold {
    pub(crate) fn new(n: usize) -> Self {
        L1Fold {
            n,
            at: 0,
            pending: Vec::new(),
            chunk: 0,
            part: [0.0; 2],
            acc: [0.0; 2],
        }
    }

    fn group(&mut self, first: usize, sums: [f32; 2]) {
        let c = first / super::util::CHUNK;
        if c != self.chunk {
            self.acc[0] += self.part[0];
            self.acc[1] += self.part[1];
            self.part = [0.0; 2];
            self.chunk = c;
        }
        self.part[0] += f64::from(sums[0]);
        self.part[1] += f64::from(sums[1]);
    }

    fn entry(&mut self, e: (f32, bool)) {
        self.pending.push(e);
        self.at += 1;
        if self.at.is_multiple_of(64) || self.at == self.n {
            let first = self.at - self.pending.len();
            let sums = group_sums(self.pending.drain(..));
            self.group(first, sums);
        }
    }

    /// Add the next chunk's piece.
    pub(crate) fn add(&mut self, piece: &L1Piece) {
        for &e in &piece.head {
            self.entry(e);
        }
        debug_assert!(piece.groups.is_empty() || self.at == piece.start);
        for (g, &sums) in piece.groups.iter().enumerate() {
            self.group(piece.start + 64 * g, sums);
        }
        self.at = piece.start + 64 * piece.groups.len();
        for &e in &piece.tail {
            self.entry(e);
        }
    }

    /// `[Σ|δ|, Σ|δ_kept|]` of the whole tensor.
    pub(crate) fn finish(mut self) -> [f64; 2] {
        self.acc[0] += self.part[0];
        self.acc[1] += self.part[1];
        self.acc
    }
}

/// The L1 rescale factor from `[Σ|δ|, Σ|δ_kept|]` (1 when either is below 1e-7).
pub(crate) fn l1_scale([before, after]: [f64; 2]) -> f32 {
    if before < 1e-7 || after < 1e-7 {
        1.0
    } else {
        (before / after) as f32
    }
}

/// DELLA's MAGPRUNE mask: rank-dependent keep probabilities within each row.
fn magprune(
    m: &[f32],
    b: &[f32],
    shape: &[usize],
    density: f64,
    eps: f64,
    args: &SparsifyArgs,
) -> Vec<u64> {
    let n = m.len();
    // rows along axis 1: shape [d0, len, inner]; a 1-D tensor is one row
    let (len, inner) = if shape.len() < 2 {
        (n, 1)
    } else {
        (shape[1], shape[2..].iter().product::<usize>())
    };
    let lo = (density - eps) as f32;
    let two_eps = (2.0 * eps) as f32;
    let mut keep = vec![0u8; n];
    if len == 0 || n == 0 {
        return vec![0u64; n.div_ceil(64)];
    }
    let rows = RowProbs {
        len,
        lo,
        two_eps,
        seed: args.seed,
        model: args.model,
    };
    if inner == 1 {
        keep.par_chunks_mut(len)
            .enumerate()
            .for_each_init(RowBufs::default, |bufs, (r, k)| {
                let start = r * len;
                rows.mask(r, |c| mag(m, b, start + c), bufs, |c, v| k[c] = v);
            });
    } else {
        let d0 = n / (len * inner);
        let mut bufs = RowBufs::default();
        for i0 in 0..d0 {
            for j in 0..inner {
                let start = i0 * len * inner + j;
                rows.mask(
                    i0 * inner + j,
                    |c| mag(m, b, start + c * inner),
                    &mut bufs,
                    |c, v| keep[start + c * inner] = v,
                );
            }
        }
    }
    let mut words = vec![0u64; n.div_ceil(64)];
    words.par_iter_mut().enumerate().for_each(|(w, word)| {
        for (bit, &k) in keep[w * 64..((w + 1) * 64).min(n)].iter().enumerate() {
            *word |= u64::from(k) << bit;
        }
    });
    words
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn args(density: f64) -> SparsifyArgs {
        SparsifyArgs {
            density,
            gamma: 0.0,
            epsilon: 0.0,
            rescale: false,
            seed: 7,
            model: 0,
        }
    }

    fn kept_indices(s: &Sparsified, n: usize) -> Vec<usize> {
        (0..n).filter(|&i| s.kept.get(i)).collect()
    }

    #[test]
    fn radix_sort_by_magnitude_equals_a_comparison_sort() {
        let mut rng = StdRng::seed_from_u64(9);
        for (len, levels) in [(1usize, 5u32), (7, 3), (2048, 40), (5000, u32::MAX >> 1)] {
            let mut keys: Vec<u64> = (0..len)
                .map(|c| (u64::from(rng.random_range(0..levels.max(1))) << 32) | c as u64)
                .collect();
            let mut want = keys.clone();
            want.sort_unstable();
            sort_by_magnitude(&mut keys, &mut Vec::new());
            assert_eq!(keys, want, "len {len}");
        }
    }

    #[test]
    fn magnitude_keeps_the_largest() {
        let d = [0.1f32, -0.5, 0.3, 0.05, -0.2, 0.4];
        let z = [0.0f32; 6];
        // k = ⌊0.5·6⌋ = 3: |−0.5|, 0.4, 0.3
        let s = sparsify(Sparsify::Magnitude, &d, &z, &[6], &args(0.5)).unwrap();
        assert_eq!(kept_indices(&s, 6), vec![1, 2, 5]);
        assert_eq!(s.scale, 1.0);
        // at least one entry survives a tiny positive density
        let s = sparsify(Sparsify::Magnitude, &d, &z, &[6], &args(0.01)).unwrap();
        assert_eq!(kept_indices(&s, 6), vec![1]);
        // density 0 keeps nothing, density 1 everything
        let s = sparsify(Sparsify::Magnitude, &d, &z, &[6], &args(0.0)).unwrap();
        assert_eq!(s.kept, Kept::Nothing);
        let s = sparsify(Sparsify::Magnitude, &d, &z, &[6], &args(1.0)).unwrap();
        assert_eq!(s.kept, Kept::All);
    }

    #[test]
    fn magnitude_is_relative_to_the_base_and_ties_keep_the_count() {
        let base = [1.0f32, 1.0, 1.0, 1.0];
        let m = [1.5f32, 0.5, 1.5, 1.1];
        // |δ| = 0.5, 0.5, 0.5, 0.1: k = 2 of three equal magnitudes. Equal entries are ranked
        // in index order (ascending), so the top two are the last two.
        let s = sparsify(Sparsify::Magnitude, &m, &base, &[4], &args(0.5)).unwrap();
        assert_eq!(kept_indices(&s, 4), vec![1, 2]);
    }

    #[test]
    fn magnitude_on_a_large_tensor_keeps_exactly_k() {
        let n = 100_003;
        let z = vec![0.0f32; n];
        let mut rng = StdRng::seed_from_u64(3);
        let d: Vec<f32> = (0..n).map(|_| rng.random::<f32>() - 0.5).collect();
        let s = sparsify(Sparsify::Magnitude, &d, &z, &[n], &args(0.3)).unwrap();
        let kept = kept_indices(&s, n);
        assert_eq!(kept.len(), 30_000);
        let mut mags: Vec<f32> = d.iter().map(|x| x.abs()).collect();
        mags.sort_by(f32::total_cmp);
        let threshold = mags[n - 30_000];
        assert!(kept.iter().all(|&i| d[i].abs() >= threshold));
    }

    #[test]
    fn rank_windows_with_many_ties_match_a_sorted_reference() {
        // values quantised to a few levels (like bf16 deltas): ties at every cut
        let n = 10_000;
        let z = vec![0.0f32; n];
        let mut rng = StdRng::seed_from_u64(11);
        let d: Vec<f32> = (0..n)
            .map(|_| (rng.random_range(0..40) as f32 - 20.0) * 0.125)
            .collect();
        // reference: ascending (|δ|, index), keep positions [lo, hi)
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| d[a].abs().total_cmp(&d[b].abs()).then(a.cmp(&b)));
        for (density, gamma) in [
            (0.5, 0.0),
            (0.3, 0.1),
            (0.05, 0.01),
            (0.9, 0.2),
            (0.001, 0.5),
        ] {
            let a = SparsifyArgs {
                gamma,
                ..args(density)
            };
            let (lo, hi, kind) = if gamma == 0.0 {
                let k = (density * n as f64) as usize;
                (n - k, n, Sparsify::Magnitude)
            } else {
                let target = (density * n as f64) as usize;
                let bot = n.saturating_sub(target + (gamma * n as f64) as usize);
                (bot, bot + target, Sparsify::Breadcrumbs)
            };
            let mut want: Vec<usize> = order[lo..hi].to_vec();
            want.sort();
            let s = sparsify(kind, &d, &z, &[n], &a).unwrap();
            assert_eq!(kept_indices(&s, n), want, "density {density} gamma {gamma}");
            // the L1 rescale counts the tied entries too
            let r = sparsify(kind, &d, &z, &[n], &SparsifyArgs { rescale: true, ..a }).unwrap();
            let before: f64 = d.iter().map(|x| f64::from(x.abs())).sum();
            let after: f64 = want.iter().map(|&i| f64::from(d[i].abs())).sum();
            if after > 0.0 {
                assert!((f64::from(r.scale) - before / after).abs() < 1e-5 * before / after);
            }
        }
        // everything equal: both cuts inside one run of ties
        let same = vec![0.5f32; 10];
        let a = SparsifyArgs {
            gamma: 0.2,
            ..args(0.3)
        };
        let s = sparsify(Sparsify::Breadcrumbs, &same, &z[..10], &[10], &a).unwrap();
        assert_eq!(kept_indices(&s, 10), vec![5, 6, 7]);
    }

    #[test]
    fn breadcrumbs_drops_top_and_bottom() {
        // |δ| ascending order: idx 3 (0.05), 0 (0.1), 4 (0.2), 2 (0.3), 5 (0.4), 1 (0.5), ...
        let d = [0.1f32, -0.5, 0.3, 0.05, -0.2, 0.4, 0.6, -0.7, 0.8, 0.9];
        let z = [0.0f32; 10];
        // n = 10, density 0.5 → keep 5; gamma 0.2 → drop 2 largest; drop 3 smallest
        let a = SparsifyArgs {
            gamma: 0.2,
            ..args(0.5)
        };
        let s = sparsify(Sparsify::Breadcrumbs, &d, &z, &[10], &a).unwrap();
        // kept ranks 3..8: 0.3, 0.4, 0.5, 0.6, 0.7
        assert_eq!(kept_indices(&s, 10), vec![1, 2, 5, 6, 7]);
        // density 0.9 + gamma 0.2 do not fit: the outlier drop shrinks to 1
        let a = SparsifyArgs {
            gamma: 0.2,
            ..args(0.9)
        };
        let s = sparsify(Sparsify::Breadcrumbs, &d, &z, &[10], &a).unwrap();
        assert_eq!(kept_indices(&s, 10), vec![0, 1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn dare_keeps_the_density_share_and_matches_l1() {
        let n = 200_000;
        let z = vec![0.0f32; n];
        let d: Vec<f32> = (0..n).map(|i| ((i % 17) as f32 - 8.0) * 0.01).collect();
        let a = SparsifyArgs {
            rescale: true,
            ..args(0.3)
        };
        let s = sparsify(Sparsify::Random, &d, &z, &[n], &a).unwrap();
        let kept = kept_indices(&s, n);
        let share = kept.len() as f64 / n as f64;
        // binomial sd = sqrt(0.21/200000) ≈ 0.001
        assert!((share - 0.3).abs() < 0.005, "kept share {share}");
        // rescale law: scale · Σ|δ_kept| = Σ|δ|
        let before: f64 = d.iter().map(|x| f64::from(x.abs())).sum();
        let after: f64 = kept.iter().map(|&i| f64::from(d[i].abs())).sum();
        assert!((f64::from(s.scale) * after / before - 1.0).abs() < 1e-6);
        // ≈ 1/density in expectation
        assert!((f64::from(s.scale) - 1.0 / 0.3).abs() < 0.05);
        // same seed, same mask; another model index, another mask
        assert_eq!(sparsify(Sparsify::Random, &d, &z, &[n], &a).unwrap(), s);
        let other = SparsifyArgs { model: 1, ..a };
        assert_ne!(sparsify(Sparsify::Random, &d, &z, &[n], &other).unwrap(), s);
    }

    #[test]
    fn della_keeps_large_entries_more_often() {
        // rows of 101 with magnitudes 0..100: rank r keeps with p = 0.2 + 0.6·r/100
        let rows = 2000;
        let len = 101;
        let d: Vec<f32> = (0..rows * len)
            .map(|i| ((i * 37) % len) as f32 * if i % 2 == 0 { 1.0 } else { -1.0 })
            .collect();
        let z = vec![0.0f32; d.len()];
        let a = SparsifyArgs {
            epsilon: 0.3,
            ..args(0.5)
        };
        let s = sparsify(Sparsify::Della, &d, &z, &[rows, len], &a).unwrap();
        let mut kept_small = 0; // ranks 0..10: p from 0.2 to 0.26
        let mut kept_large = 0; // ranks 90..100: p from 0.74 to 0.8
        let mut total = 0;
        for (i, x) in d.iter().enumerate() {
            let r = x.abs() as usize;
            if s.kept.get(i) {
                total += 1;
                if r <= 10 {
                    kept_small += 1;
                } else if r >= 90 {
                    kept_large += 1;
                }
            }
        }
        let per_band = (rows * 11) as f64;
        let small = kept_small as f64 / per_band;
        let large = kept_large as f64 / per_band;
        assert!((small - 0.23).abs() < 0.02, "small {small}");
        assert!((large - 0.77).abs() < 0.02, "large {large}");
        assert!((total as f64 / d.len() as f64 - 0.5).abs() < 0.01);
        // density ± epsilon outside (0, 1) is an error
        let bad = SparsifyArgs {
            epsilon: 0.6,
            ..args(0.5)
        };
        assert!(sparsify(Sparsify::Della, &d, &z, &[rows, len], &bad).is_err());
    }
}
