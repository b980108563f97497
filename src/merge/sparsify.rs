//! Sparsification of task vectors `δ = θ − θ_base`, the first stage of the task-arithmetic
//! family (see [`super::task_arithmetic`]). Each method decides which entries of δ survive and
//! returns a bitset; nothing here materialises δ, it is recomputed from the two inputs.
//!
//! - [`Sparsify::Magnitude`] (TIES, Yadav et al. 2023): keep the `k = max(1, ⌊density·n⌋)`
//!   entries of largest |δ|. Linear-time selection: a parallel 32768-bucket histogram of the
//!   magnitudes' float bits finds the bucket holding the cut, then `select_nth_unstable` on that
//!   bucket's few candidates gives the exact threshold — never a full sort.
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
//! untouched (and skips the rescale), as in mergekit. Random draws come from `StdRng`s seeded by
//! the tensor's seed, the model index and the chunk (DARE) or row (DELLA) index, so results do
//! not depend on the thread count.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use super::util::{CHUNK, chunked_sum, mix_seed};

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
    let (kept, sums) = match kind {
        Sparsify::Magnitude => {
            if density <= 0.0 || n == 0 {
                (Kept::Nothing, None)
            } else {
                let k = ((density * n as f64) as usize).clamp(1, n);
                let (w, sums) = rank_window(model, base, n - k, n);
                (Kept::Mask(w), Some(sums))
            }
        }
        Sparsify::Breadcrumbs => {
            let target = (density * n as f64) as usize;
            let n_top = (args.gamma * n as f64) as usize;
            let n_bot = n.saturating_sub(target + n_top);
            if target == 0 {
                (Kept::Nothing, None)
            } else {
                let (w, sums) = rank_window(model, base, n_bot, (n_bot + target).min(n));
                (Kept::Mask(w), Some(sums))
            }
        }
        Sparsify::Random => {
            if density <= 0.0 {
                (Kept::Nothing, None)
            } else {
                let (w, sums) = bernoulli(model, base, density as f32, args);
                (Kept::Mask(w), Some(sums))
            }
        }
        Sparsify::Della => {
            if density <= 0.0 {
                (Kept::Nothing, None)
            } else {
                let eps = args.epsilon;
                if density + eps >= 1.0 || density - eps <= 0.0 {
                    return Err(format!(
                        "della: density ± epsilon must lie in (0, 1), got density {density} \
                         and epsilon {eps}"
                    ));
                }
                let w = magprune(model, base, shape, density, eps, args);
                let sums = args.rescale.then(|| l1_norms(model, base, &w));
                (Kept::Mask(w), sums)
            }
        }
    };
    let scale = match (sums, args.rescale) {
        (Some([before, after]), true) => {
            if before < 1e-7 || after < 1e-7 {
                1.0
            } else {
                (before / after) as f32
            }
        }
        _ => 1.0,
    };
    Ok(Sparsified { kept, scale })
}

/// Where the `p`-th smallest magnitude (0-based) lies: entries below `value`, plus the first
/// `ties` entries (in index order) equal to it, have rank `< p`. `equal` lists the indices of
/// all entries equal to `value`, ascending.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Cut {
    value: u32,
    ties: usize,
    equal: Vec<usize>,
}

const BUCKET_SHIFT: u32 = 16;
const BUCKETS: usize = 1 << (31 - BUCKET_SHIFT);

/// Bitset of the entries whose ascending magnitude rank is in `[lo, hi)` (`0 < hi ≤ n`), and
/// `[Σ|δ|, Σ|δ_kept|]`. Three passes: histogram, gather one bucket, mask.
fn rank_window(m: &[f32], b: &[f32], lo: usize, hi: usize) -> (Vec<u64>, [f64; 2]) {
    let n = m.len();
    let chunks = n.div_ceil(CHUNK);
    let range = |c: usize| c * CHUNK..((c + 1) * CHUNK).min(n);
    let needs_cut = |p: usize| p > 0 && p < n;

    let mut lo_cut = None;
    let mut hi_cut = None;
    if needs_cut(lo) || needs_cut(hi) {
        // 1. histogram of the magnitudes' top bits (sign cleared, so the order is numeric);
        //    two interleaved tables per part keep repeated buckets from serialising
        let parts = (rayon::current_num_threads() * 2).min(chunks).max(1);
        let per = n.div_ceil(parts).next_multiple_of(2);
        let hist = (0..parts)
            .into_par_iter()
            .map(|t| {
                let mut h = vec![0u32; 2 * BUCKETS];
                let r = (t * per).min(n)..((t + 1) * per).min(n);
                let (mc, bc) = (&m[r.clone()], &b[r]);
                let (h0, h1) = h.split_at_mut(BUCKETS);
                let mut pairs_m = mc.chunks_exact(2);
                let mut pairs_b = bc.chunks_exact(2);
                for (x, y) in (&mut pairs_m).zip(&mut pairs_b) {
                    h0[(abs_bits(x[0] - y[0]) >> BUCKET_SHIFT) as usize] += 1;
                    h1[(abs_bits(x[1] - y[1]) >> BUCKET_SHIFT) as usize] += 1;
                }
                for (x, y) in pairs_m.remainder().iter().zip(pairs_b.remainder()) {
                    h0[(abs_bits(x - y) >> BUCKET_SHIFT) as usize] += 1;
                }
                for i in 0..BUCKETS {
                    h0[i] += h1[i];
                }
                h.truncate(BUCKETS);
                h
            })
            .reduce(
                || vec![0u32; BUCKETS],
                |mut a, h| {
                    for (a, h) in a.iter_mut().zip(h) {
                        *a += h;
                    }
                    a
                },
            );
        // the bucket holding position p, and how many entries lie in lower buckets
        let locate = |p: usize| {
            let mut below = 0usize;
            for (k, &count) in hist.iter().enumerate() {
                let count = count as usize;
                if below + count > p {
                    return (k as u32, below);
                }
                below += count;
            }
            unreachable!("position {p} < n lies in some bucket")
        };
        // 2. gather the candidates of a bucket (value, index), in index order; 3. select
        let cut = |p: usize| -> Cut {
            let (bucket, below) = locate(p);
            let cand: Vec<(u32, usize)> = (0..chunks)
                .into_par_iter()
                .map(|c| {
                    let r = range(c);
                    let start = r.start;
                    let (mc, bc) = (&m[r.clone()], &b[r]);
                    mc.iter()
                        .zip(bc)
                        .enumerate()
                        .filter_map(|(i, (x, y))| {
                            let v = abs_bits(x - y);
                            (v >> BUCKET_SHIFT == bucket).then_some((v, start + i))
                        })
                        .collect::<Vec<_>>()
                })
                .flatten()
                .collect();
            let mut values: Vec<u32> = cand.iter().map(|c| c.0).collect();
            let (_, &mut value, _) = values.select_nth_unstable(p - below);
            let lower = values.iter().filter(|&&v| v < value).count();
            Cut {
                value,
                ties: p - below - lower,
                equal: cand.iter().filter(|c| c.0 == value).map(|c| c.1).collect(),
            }
        };
        lo_cut = needs_cut(lo).then(|| cut(lo));
        hi_cut = needs_cut(hi).then(|| cut(hi));
    }

    // 4. the mask for entries strictly between the cut values (any value on a side without a
    //    cut), with L1 sums; then the entries equal to a cut value, by rank
    let lo_v = lo_cut.as_ref().map(|c| c.value);
    let hi_v = hi_cut.as_ref().map(|c| c.value);
    let mut words = vec![0u64; n.div_ceil(64)];
    let parts: Vec<[f64; 2]> = words
        .par_chunks_mut(CHUNK / 64)
        .enumerate()
        .map(|(c, w)| {
            let r = range(c);
            let (mc, bc) = (&m[r.clone()], &b[r]);
            match (lo_v, hi_v) {
                (Some(l), Some(h)) => fill_bits(mc, bc, w, |v| v > l && v < h),
                (Some(l), None) => fill_bits(mc, bc, w, |v| v > l),
                (None, Some(h)) => fill_bits(mc, bc, w, |v| v < h),
                (None, None) => fill_bits(mc, bc, w, |_| true),
            }
        })
        .collect();
    let [before, mut after] = parts
        .iter()
        .fold([0.0; 2], |a, p| [a[0] + p[0], a[1] + p[1]]);
    let mut set = |i: usize, v: u32| {
        words[i / 64] |= 1 << (i % 64);
        after += f64::from(f32::from_bits(v));
    };
    match (&lo_cut, &hi_cut) {
        (Some(l), Some(h)) if l.value == h.value => {
            // both cuts inside one run of equal values: ranks lo..hi of that run
            for &i in &l.equal[l.ties..h.ties] {
                set(i, l.value);
            }
        }
        (l, h) => {
            if let Some(l) = l {
                // equal to the lower cut: kept from its `ties`-th on (all below `hi`)
                for &i in &l.equal[l.ties..] {
                    set(i, l.value);
                }
            }
            if let Some(h) = h {
                // equal to the upper cut: the first `ties` have rank < hi
                for &i in &h.equal[..h.ties] {
                    set(i, h.value);
                }
            }
        }
    }
    (words, [before, after])
}

#[inline]
fn abs_bits(x: f32) -> u32 {
    x.to_bits() & 0x7fff_ffff
}

/// Set bits of `w` where `keep(|m − b| bits)`; returns `[Σ|δ|, Σ|δ_kept|]` (`f32` lanes within
/// 64 entries, `f64` across). Fixed-size groups with constant shifts, so the loop vectorises.
#[inline]
fn fill_bits(m: &[f32], b: &[f32], w: &mut [u64], keep: impl Fn(u32) -> bool) -> [f64; 2] {
    let (mut before, mut after) = (0.0f64, 0.0f64);
    let mut groups_m = m.chunks_exact(64);
    let mut groups_b = b.chunks_exact(64);
    for (g, (m64, b64)) in (&mut groups_m).zip(&mut groups_b).enumerate() {
        let mut word = 0u64;
        let mut all = [0.0f32; 8];
        let mut kept = [0.0f32; 8];
        for (q, (m8, b8)) in m64.chunks_exact(8).zip(b64.chunks_exact(8)).enumerate() {
            let m8: &[f32; 8] = m8.try_into().expect("8 entries");
            let b8: &[f32; 8] = b8.try_into().expect("8 entries");
            let mut v = [0u32; 8];
            for k in 0..8 {
                v[k] = abs_bits(m8[k] - b8[k]);
            }
            let mut flag = [0u32; 8];
            for k in 0..8 {
                flag[k] = u32::from(keep(v[k]));
            }
            let mut byte = 0u32;
            for k in 0..8 {
                all[k] += f32::from_bits(v[k]);
                kept[k] += f32::from_bits(v[k]) * flag[k] as f32;
                byte |= flag[k] << k;
            }
            word |= u64::from(byte) << (q * 8);
        }
        w[g] = word;
        before += f64::from(all.iter().sum::<f32>());
        after += f64::from(kept.iter().sum::<f32>());
    }
    let full = m.len() / 64;
    let mut word = 0u64;
    for (k, (&x, &y)) in groups_m
        .remainder()
        .iter()
        .zip(groups_b.remainder())
        .enumerate()
    {
        let v = abs_bits(x - y);
        let a = f64::from(f32::from_bits(v));
        before += a;
        if keep(v) {
            word |= 1 << k;
            after += a;
        }
    }
    if !m.len().is_multiple_of(64) {
        w[full] = word;
    }
    [before, after]
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

/// DARE's mask: each entry survives with probability `p` (and the L1 sums).
fn bernoulli(m: &[f32], b: &[f32], p: f32, args: &SparsifyArgs) -> (Vec<u64>, [f64; 2]) {
    let n = m.len();
    let mut words = vec![0u64; n.div_ceil(64)];
    let parts: Vec<[f64; 2]> = words
        .par_chunks_mut(CHUNK / 64)
        .enumerate()
        .map(|(c, w)| {
            let mut rng = StdRng::seed_from_u64(mix_seed(args.seed, args.model, c as u64));
            let r = c * CHUNK..((c + 1) * CHUNK).min(n);
            let len = r.len();
            for off in 0..len {
                if rng.random::<f32>() < p {
                    w[off / 64] |= 1 << (off % 64);
                }
            }
            if args.rescale {
                let words_here: &[u64] = w;
                l1_norms(&m[r.clone()], &b[r], words_here)
            } else {
                [0.0; 2]
            }
        })
        .collect();
    let sums = parts
        .iter()
        .fold([0.0; 2], |a, p| [a[0] + p[0], a[1] + p[1]]);
    (words, sums)
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
    // one row: indices idx(c) = start + c*inner; writes keep flags for row number `row`
    let row_mask = |row: usize, idx: &dyn Fn(usize) -> usize, out: &mut dyn FnMut(usize, u8)| {
        let mut keys: Vec<u64> = (0..len)
            .map(|c| (u64::from(mag(m, b, idx(c))) << 32) | c as u64)
            .collect();
        keys.sort_unstable();
        let mut prob = vec![0.0f32; len];
        for (rank, k) in keys.iter().enumerate() {
            let norm = if len > 1 {
                rank as f32 / (len - 1) as f32
            } else {
                0.5
            };
            prob[(*k & 0xffff_ffff) as usize] = lo + norm * two_eps;
        }
        let mut rng = StdRng::seed_from_u64(mix_seed(args.seed, args.model, row as u64));
        for (c, &p) in prob.iter().enumerate() {
            out(c, u8::from(rng.random::<f32>() < p));
        }
    };
    if inner == 1 {
        keep.par_chunks_mut(len).enumerate().for_each(|(r, k)| {
            let start = r * len;
            row_mask(r, &|c| start + c, &mut |c, v| k[c] = v);
        });
    } else {
        let d0 = n / (len * inner);
        for i0 in 0..d0 {
            for j in 0..inner {
                let start = i0 * len * inner + j;
                row_mask(i0 * inner + j, &|c| start + c * inner, &mut |c, v| {
                    keep[start + c * inner] = v
                });
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
