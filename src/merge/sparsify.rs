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
    (m[i] - b[i]).to_bits() & 0x7fff_ffff
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
    let kept = match kind {
        Sparsify::Magnitude => {
            if density <= 0.0 || n == 0 {
                Kept::Nothing
            } else {
                let k = ((density * n as f64) as usize).clamp(1, n);
                Kept::Mask(rank_window(model, base, n - k, n))
            }
        }
        Sparsify::Breadcrumbs => {
            let target = (density * n as f64) as usize;
            let n_top = (args.gamma * n as f64) as usize;
            let n_bot = n.saturating_sub(target + n_top);
            if target == 0 {
                Kept::Nothing
            } else {
                Kept::Mask(rank_window(model, base, n_bot, (n_bot + target).min(n)))
            }
        }
        Sparsify::Random => {
            if density <= 0.0 {
                Kept::Nothing
            } else {
                Kept::Mask(bernoulli(n, density as f32, args))
            }
        }
        Sparsify::Della => {
            if density <= 0.0 {
                Kept::Nothing
            } else {
                let eps = args.epsilon;
                if density + eps >= 1.0 || density - eps <= 0.0 {
                    return Err(format!(
                        "della: density ± epsilon must lie in (0, 1), got density {density} \
                         and epsilon {eps}"
                    ));
                }
                Kept::Mask(magprune(model, base, shape, density, eps, args))
            }
        }
    };
    let scale = match (&kept, args.rescale) {
        (Kept::Mask(words), true) => {
            let [before, after] = l1_norms(model, base, words);
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
/// `ties` entries (in index order) equal to it, have rank `< p`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cut {
    value: u32,
    ties: usize,
}

const BUCKET_SHIFT: u32 = 16;
const BUCKETS: usize = 1 << (31 - BUCKET_SHIFT);

/// Bitset of the entries whose ascending magnitude rank is in `[lo, hi)`.
fn rank_window(m: &[f32], b: &[f32], lo: usize, hi: usize) -> Vec<u64> {
    let n = m.len();
    let chunks = n.div_ceil(CHUNK);
    let range = |c: usize| c * CHUNK..((c + 1) * CHUNK).min(n);
    let positions: Vec<usize> = [lo, hi].into_iter().filter(|&p| p > 0 && p < n).collect();

    let mut cuts: Vec<(usize, Cut)> = Vec::new();
    let t0 = std::time::Instant::now();
    if !positions.is_empty() {
        // 1. histogram of the magnitudes' top bits (sign cleared, so the order is numeric);
        //    a few contiguous parts per thread, each with its own histogram
        let parts = (rayon::current_num_threads() * 2).min(chunks).max(1);
        let per = n.div_ceil(parts);
        let hist = (0..parts)
            .into_par_iter()
            .map(|t| {
                let mut h = vec![0u32; BUCKETS];
                for i in t * per..((t + 1) * per).min(n) {
                    h[(mag(m, b, i) >> BUCKET_SHIFT) as usize] += 1;
                }
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
        eprintln!("hist {:?}", t0.elapsed());
        // the bucket holding each position, and how many entries lie in lower buckets
        let locate = |p: usize| {
            let mut below = 0;
            for (k, &count) in hist.iter().enumerate() {
                let count = count as usize;
                if below + count > p {
                    return (k as u32, below);
                }
                below += count;
            }
            unreachable!("position {p} < n lies in some bucket")
        };
        let located: Vec<(usize, u32, usize)> = positions
            .iter()
            .map(|&p| {
                let (k, below) = locate(p);
                (p, k, below)
            })
            .collect();
        // 2. gather the candidates of those buckets, 3. select inside them
        for (p, bucket, below) in located {
            let mut cand: Vec<u32> = (0..chunks)
                .into_par_iter()
                .map(|c| {
                    range(c)
                        .map(|i| mag(m, b, i))
                        .filter(|v| v >> BUCKET_SHIFT == bucket)
                        .collect::<Vec<u32>>()
                })
                .flatten()
                .collect();
            let r = p - below;
            let (_, &mut value, _) = cand.select_nth_unstable(r);
            let lower = cand.iter().filter(|&&v| v < value).count();
            cuts.push((
                p,
                Cut {
                    value,
                    ties: p - below - lower,
                },
            ));
        }
    }
    eprintln!("cuts {:?}", t0.elapsed());
    let cut_at = |p: usize| cuts.iter().find(|(q, _)| *q == p).map(|(_, c)| *c);
    // `None`: rank < p for no entry (p = 0) or for all (p = n)
    let lo_cut = cut_at(lo);
    let hi_cut = cut_at(hi);
    let hi_all = hi >= n;

    // 4. for ties at a cut, how many equal entries precede each chunk
    let tie_offsets = |cut: Option<Cut>| -> Vec<usize> {
        match cut {
            Some(c) if c.ties > 0 => {
                let counts: Vec<usize> = (0..chunks)
                    .into_par_iter()
                    .map(|k| range(k).filter(|&i| mag(m, b, i) == c.value).count())
                    .collect();
                let mut acc = 0;
                counts
                    .into_iter()
                    .map(|x| {
                        let o = acc;
                        acc += x;
                        o
                    })
                    .collect()
            }
            _ => vec![0; chunks],
        }
    };
    let lo_off = tie_offsets(lo_cut);
    let hi_off = tie_offsets(hi_cut);

    eprintln!("ties {:?}", t0.elapsed());
    // 5. the mask
    let mut words = vec![0u64; n.div_ceil(64)];
    let ties = lo_cut.is_some_and(|c| c.ties > 0) || hi_cut.is_some_and(|c| c.ties > 0);
    if !ties {
        // rank in [lo, hi) ⟺ lo_value ≤ |δ| < hi_value: branch-free, 8 entries per byte
        let lo_v = lo_cut.map_or(0, |c| c.value);
        let (hi_v, hi_inclusive) = match hi_cut {
            Some(c) => (c.value, false),
            None => (u32::MAX, hi_all),
        };
        words
            .par_chunks_mut(CHUNK / 64)
            .enumerate()
            .for_each(|(c, w)| {
                let r = range(c);
                let (mc, bc) = (&m[r.clone()], &b[r]);
                for_each_bit_group(mc, bc, w, |v| {
                    v >= lo_v && (v < hi_v || (hi_inclusive && v == hi_v))
                });
            });
        eprintln!("mask {:?}", t0.elapsed());
        return words;
    }
    words
        .par_chunks_mut(CHUNK / 64)
        .enumerate()
        .for_each(|(c, w)| {
            let (mut seen_lo, mut seen_hi) = (lo_off[c], hi_off[c]);
            for (off, i) in range(c).enumerate() {
                let v = mag(m, b, i);
                let below = |cut: Cut, seen: &mut usize| {
                    if v == cut.value {
                        *seen += 1;
                        *seen <= cut.ties
                    } else {
                        v < cut.value
                    }
                };
                let below_lo = match lo_cut {
                    Some(cut) => below(cut, &mut seen_lo),
                    None => false,
                };
                let below_hi = match hi_cut {
                    Some(cut) => below(cut, &mut seen_hi),
                    None => hi_all,
                };
                if !below_lo && below_hi {
                    w[off / 64] |= 1 << (off % 64);
                }
            }
        });
    words
}

/// Fill bitset words `w` from `keep(|m − b| bits)`, eight entries per byte so the compiler can
/// vectorise the comparisons.
#[inline]
fn for_each_bit_group(m: &[f32], b: &[f32], w: &mut [u64], keep: impl Fn(u32) -> bool) {
    let full = m.len() / 8 * 8;
    for (g, (m8, b8)) in m[..full]
        .chunks_exact(8)
        .zip(b[..full].chunks_exact(8))
        .enumerate()
    {
        let mut byte = 0u64;
        for k in 0..8 {
            let v = (m8[k] - b8[k]).to_bits() & 0x7fff_ffff;
            byte |= u64::from(keep(v)) << k;
        }
        w[g / 8] |= byte << ((g % 8) * 8);
    }
    for i in full..m.len() {
        let v = (m[i] - b[i]).to_bits() & 0x7fff_ffff;
        w[i / 64] |= u64::from(keep(v)) << (i % 64);
    }
}

/// `[Σ|δ|, Σ|δ_kept|]` over the whole tensor (deterministic chunked sum; `f32` within groups
/// of 64 entries, `f64` across them).
fn l1_norms(m: &[f32], b: &[f32], words: &[u64]) -> [f64; 2] {
    chunked_sum(m.len(), |r| {
        let (mut before, mut after) = (0.0f64, 0.0f64);
        let start = r.start;
        let (mc, bc) = (&m[r.clone()], &b[r]);
        for (g, (m64, b64)) in mc.chunks(64).zip(bc.chunks(64)).enumerate() {
            let word = words[start / 64 + g];
            let (mut all, mut kept) = (0.0f32, 0.0f32);
            for (k, (&x, &y)) in m64.iter().zip(b64).enumerate() {
                let a = (x - y).abs();
                all += a;
                kept += if (word >> k) & 1 == 1 { a } else { 0.0 };
            }
            before += f64::from(all);
            after += f64::from(kept);
        }
        [before, after]
    })
}

/// DARE's mask: each entry survives with probability `p`.
fn bernoulli(n: usize, p: f32, args: &SparsifyArgs) -> Vec<u64> {
    let mut words = vec![0u64; n.div_ceil(64)];
    words
        .par_chunks_mut(CHUNK / 64)
        .enumerate()
        .for_each(|(c, w)| {
            let mut rng = StdRng::seed_from_u64(mix_seed(args.seed, args.model, c as u64));
            let len = CHUNK.min(n - c * CHUNK);
            for off in 0..len {
                if rng.random::<f32>() < p {
                    w[off / 64] |= 1 << (off % 64);
                }
            }
        });
    words
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
