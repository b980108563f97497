//! Cheaper fitness: score a candidate one slice of the dev examples at a time and stop as soon as
//! it can no longer reach the bar the search selects by (`[evaluator] subsample`).
//!
//! Two ideas combined. MERGE³ (Mencattini et al. 2025, *MERGE³: Efficient Evolutionary Merging
//! on Consumer-grade GPUs*) scores evolutionary-merge candidates on a small subsample of the data
//! instead of the whole dev set; racing (Maron & Moore 1994, *Hoeffding Races*; irace, López-Ibáñez
//! et al. 2016) stops evaluating a contender as soon as it is known to lose. Here the contest is
//! CMA-ES's selection: only the μ = ⌊λ/2⌋ best of a generation move the mean, so a candidate that
//! cannot reach the μ-th best fitness need not be scored exactly.
//!
//! # The slices
//!
//! Each task's examples are put in a fixed order ([`order`]: a Fisher–Yates shuffle seeded by a
//! hash of the task's name, the same on every machine and every run) and cut into slices of
//! `round(subsample × n)` examples (at least one), rounded up to whole forward batches
//! ([`slices`]: 1/8 of 200 examples in batches of 32 → 32). Slice 1 of every task is scored (the
//! tasks at once), then slice 2, and so on; after each slice but the last the candidate's
//! **upper bound** is computed: the fitness it would get if every example not yet scored were
//! scored perfectly ([`accuracy_upper`]: `(right + remaining) / n`; perplexity tasks:
//! [`loglik_upper`], every remaining token at probability 1), weighted over the tasks as the
//! fitness is. When the upper bound is below the bar the candidate is **stopped** ([`stops`]):
//! it cannot reach the bar whatever the rest of its examples give. Otherwise the next slice is
//! scored, and after the last one the candidate has its exact dev fitness (the same counts as an
//! evaluation of the whole split, so the same value; perplexity sums are added slice by slice,
//! so they may differ from a whole evaluation in the last bits).
//!
//! # The statistical bound (`subsample_confidence`)
//!
//! The exact bound stops only candidates that are hopeless *whatever* their remaining examples
//! give, which in a tight generation is rarely before the last slices. With
//! `subsample_confidence = c` an accuracy task's bound is also `partial + ε`, ε Serfling's margin
//! for `k` of `n` examples drawn without replacement ([`serfling_margin`]; the Hoeffding bound
//! of Maron & Moore's races with the finite-population factor), at risk δ = (1 − c) / (checks ×
//! tasks) each (a union bound), and the smaller of the two bounds is used. A candidate that
//! would reach the bar is then stopped with probability at most 1 − c — over the draw of the
//! example order, which is one seeded shuffle shared by every candidate, so the risk is per
//! search rather than independent per candidate. Perplexity tasks keep the exact bound (their
//! score is not a mean of per-example values in [0, 1]).
//!
//! # The bar
//!
//! The bar of generation g is the **μ-th best fitness of generation g − 1** of the same CMA-ES
//! run ([`generation_bound`]); the first generation of each run (restarts included) has no bar
//! and is scored whole. A bar from the generation *in flight* ("the μ-th best so far") would
//! depend on which evaluations finished first, which with several slots is a matter of timing:
//! the same search would stop different candidates from run to run, and a resumed search (which
//! replays the history, [`crate::search::history`]) would not reach the result of an
//! uninterrupted one. The previous generation's μ-th best is known before the generation starts,
//! is read back from the history on resume, and does not depend on the order in which anything
//! finishes; each decision depends only on the candidate's own slices and that number, so a
//! subsampled search is as deterministic and as exactly resumable as a full one. It is also the
//! natural estimate of the current generation's μ-th best: CMA-ES generations improve slowly.
//!
//! # What a stopped candidate is told as
//!
//! Its fitness is its **partial score**: the same weighted mean of task scores, over the examples
//! scored so far (an unbiased estimate of its full score, the slices being a seeded shuffle),
//! flagged in the metrics. The partial score is at most the bound, which is below the bar, so a
//! stopped candidate always ranks below every candidate that reached the bar. Hence, with the
//! exact bound (with the statistical one, unless it stopped a candidate that would have
//! reached the bar):
//!
//! - if at least μ candidates of the generation reach the bar, the μ selected candidates, their
//!   order and their fitness are exactly those of a full evaluation, and so is the new mean;
//! - a stopped candidate is never the search's best (the best is always fully scored);
//! - what may differ from a full evaluation is the order *among* candidates below the bar, which
//!   the `cmaes` crate's default active CMA-ES (negative weights for the worst λ − μ) uses in its
//!   covariance update, and the selection in a generation where fewer than μ reach the bar.
//!
//! So a subsampled search is not bit-identical to a full one; the README measures what it costs.
//!
//! # What is recorded
//!
//! [`Raced::into_score`] adds to the candidate's metrics (and so to `history.jsonl`):
//! `subsample/examples` (examples scored, all tasks), `subsample/total` (examples of the split),
//! `subsample/stopped` (1 or 0), `subsample/upper` (the bound it stopped on; the fitness when it
//! did not stop), and `subsample/bound` (the bar, when there was one).

use std::ops::Range;

use crate::eval::{EvalError, Evaluator, Score, Split};

/// Metric key: examples scored (all tasks together).
pub const EXAMPLES_KEY: &str = "subsample/examples";
/// Metric key: examples of the split (all tasks together).
pub const TOTAL_KEY: &str = "subsample/total";
/// Metric key: 1 when the candidate was stopped early, else 0.
pub const STOPPED_KEY: &str = "subsample/stopped";
/// Metric key: the upper bound when stopped (the fitness when not).
pub const UPPER_KEY: &str = "subsample/upper";
/// Metric key: the bar the candidate raced against (absent when there was none).
pub const BOUND_KEY: &str = "subsample/bound";

/// Salt of the example order's seed, so it differs from the few-shot draw of the same task.
const ORDER_SALT: u64 = 0x5ab5_a3b1_e000_0001;

/// One evaluation's race: the share of each task's examples per slice, the bar (`None`: no
/// bar, every example is scored) and, optionally, the confidence of a statistical bound.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Race {
    /// `(0, 1)`: examples per slice as a share of each task's examples.
    pub fraction: f64,
    /// Stop when the upper bound falls below this.
    pub bound: Option<f64>,
    /// `(0, 1)`: also bound accuracy tasks statistically ([`serfling_margin`]), so a
    /// candidate that would reach the bar is stopped with probability at most `1 − confidence`.
    /// `None`: only the exact bound, which never stops such a candidate.
    pub confidence: Option<f64>,
}

/// Checks a `subsample_confidence` value: strictly between 0 and 1.
pub fn check_confidence(confidence: f64) -> std::result::Result<(), String> {
    if confidence.is_finite() && confidence > 0.0 && confidence < 1.0 {
        Ok(())
    } else {
        Err(format!(
            "{confidence:?} must be in (0, 1): the probability that a candidate which would \
             reach the bar is not stopped (e.g. 0.95)"
        ))
    }
}

/// Checks a `subsample` value: a share strictly between 0 and 1.
pub fn check_fraction(fraction: f64) -> std::result::Result<(), String> {
    if fraction.is_finite() && fraction > 0.0 && fraction < 1.0 {
        Ok(())
    } else {
        Err(format!(
            "{fraction:?} must be in (0, 1): the share of each task's dev examples scored per \
             slice (1 would be one slice, i.e. no early stop)"
        ))
    }
}

/// The order in which the examples of task `name` (n of them) are scored: a permutation of
/// `0..n`, fixed by the name (a seeded Fisher–Yates shuffle, the same on every machine).
pub fn order(name: &str, n: usize) -> Vec<usize> {
    crate::eval::tasks::sample_indices(n, n, crate::eval::tasks::fnv1a(name) ^ ORDER_SALT)
}

/// The slices of a task of `n` examples, as ranges of positions in its [`order`]: consecutive,
/// `round(fraction × n)` long (at least 1) rounded up to whole batches of `batch` examples (so
/// a slice runs as many forward batches as its share of a whole evaluation would: 200 examples,
/// 1/8, batches of 32 → slices of 32), the last one shorter if need be. None when `n = 0`.
pub fn slices(n: usize, fraction: f64, batch: usize) -> Vec<Range<usize>> {
    if n == 0 {
        return Vec::new();
    }
    let batch = batch.max(1);
    let m = ((fraction * n as f64).round() as usize).max(1);
    let m = (m.div_ceil(batch) * batch).min(n);
    (0..n).step_by(m).map(|s| s..(s + m).min(n)).collect()
}

/// The highest accuracy a task can end with: `right` of `scored` examples so far, `total` in
/// all, every remaining one right. Equals the accuracy when all are scored; 0 for no examples
/// (what an evaluation of an empty split gives).
pub fn accuracy_upper(right: usize, scored: usize, total: usize) -> f64 {
    (right + total.saturating_sub(scored)) as f64 / total.max(1) as f64
}

/// The highest `exp(Σ log p / units)` a perplexity score can end with: `sum` (≤ 0) over the
/// texts scored so far and `total_units` bytes (or tokens) of every text; each remaining token
/// adds `log p ≤ 0` to the sum, so at best nothing.
pub fn loglik_upper(sum: f64, total_units: usize) -> f64 {
    (sum.min(0.0) / total_units.max(1) as f64).exp()
}

/// Serfling's bound for sampling without replacement (Serfling 1974, *Probability inequalities
/// for the sum in sampling without replacement*; Hoeffding's bound, which Maron & Moore's races
/// use, tightened by the finite-population factor): after `k` of `n` values in [0, 1] drawn in
/// random order, their mean exceeds the mean of all `n` by more than
/// `sqrt((1 − (k − 1)/n) · ln(1/δ) / (2k))` with probability at most δ.
pub fn serfling_margin(k: usize, n: usize, delta: f64) -> f64 {
    if k == 0 || n == 0 {
        return f64::INFINITY;
    }
    let rest = 1.0 - (k - 1) as f64 / n as f64;
    (rest * (1.0 / delta).ln() / (2.0 * k as f64)).sqrt()
}

/// The stopping rule: stop when the upper bound is below the bar (a candidate that can still
/// equal the bar goes on).
pub fn stops(upper: f64, bound: Option<f64>) -> bool {
    bound.is_some_and(|b| upper < b)
}

/// The bar of the next generation: the μ-th best (μ = ⌊λ/2⌋, as CMA-ES selects) of the
/// `fitness` values of the generation just finished (λ = how many; `None` = a failed
/// evaluation). `None` when fewer than μ succeeded (the μ-th best is a failure).
pub fn generation_bound(fitness: impl IntoIterator<Item = Option<f64>>) -> Option<f64> {
    let all: Vec<Option<f64>> = fitness.into_iter().collect();
    let mu = all.len() / 2;
    let mut ok: Vec<f64> = all
        .into_iter()
        .flatten()
        .filter(|f| f.is_finite())
        .collect();
    if mu == 0 || ok.len() < mu {
        return None;
    }
    ok.sort_by(|a, b| b.total_cmp(a));
    Some(ok[mu - 1])
}

/// One task's standing after a slice.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TaskState {
    /// The task's weight in the fitness.
    pub weight: f64,
    /// The highest score the task can end with ([`accuracy_upper`], [`loglik_upper`]).
    pub upper: f64,
    /// Its score over the examples scored so far.
    pub partial: f64,
    /// Examples scored so far, and in all.
    pub scored: usize,
    pub total: usize,
    /// The score is a mean of per-example values in [0, 1] (an accuracy), so
    /// [`serfling_margin`] applies; not for perplexity.
    pub mean_of_unit_values: bool,
}

impl TaskState {
    /// The task's bound in a race: [`TaskState::upper`], or with a confidence the smaller of
    /// it and `partial + serfling_margin(scored, total, delta)` for accuracy tasks.
    pub fn race_upper(&self, delta: Option<f64>) -> f64 {
        match delta {
            Some(d) if self.mean_of_unit_values && self.scored < self.total => self
                .upper
                .min(self.partial + serfling_margin(self.scored, self.total, d)),
            _ => self.upper,
        }
    }
}

/// A task as a race sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct SliceTask {
    /// Its name (seeds its [`order`]).
    pub name: String,
    /// Its examples on the split.
    pub examples: usize,
    /// Examples per forward batch (slices are whole batches, [`slices`]); 1 for no alignment.
    pub batch: usize,
}

/// An evaluation that can be scored a slice at a time (the LM evaluator implements it for one
/// built model).
pub trait Sliced {
    /// Each task, in task order.
    fn tasks(&self) -> Vec<SliceTask>;
    /// Score one slice: for each `(task, indices)`, examples `indices` (indices into the task's
    /// examples of the split) of task `task`, added to what it has scored. The tasks may be
    /// scored at once (the LM evaluator does, so a slice keeps the pool's threads busy).
    fn score(&mut self, slice: &[(usize, &[usize])]) -> Result<(), EvalError>;
    /// Task `task`'s weight and upper bound given what it has scored.
    fn state(&self, task: usize) -> TaskState;
    /// The score of what has been scored so far: with every example scored, the evaluation's
    /// score of the whole split.
    fn score_so_far(&self) -> Result<Score, EvalError>;
}

/// The outcome of a race.
#[derive(Clone, Debug, PartialEq)]
pub struct Raced {
    /// The score (the partial score when stopped).
    pub score: Score,
    /// Examples scored, all tasks together.
    pub examples: usize,
    /// Examples of the split, all tasks together.
    pub total: usize,
    /// Stopped before the last slice.
    pub stopped: bool,
    /// The upper bound when stopped; the fitness otherwise.
    pub upper: f64,
    /// The bar raced against.
    pub bound: Option<f64>,
}

impl Raced {
    /// The score with the race recorded in its metrics (see the module docs).
    pub fn into_score(self) -> Score {
        let mut score = self.score;
        let mut put = |k: &str, v: f64| score.metrics.insert(k.to_string(), v);
        put(EXAMPLES_KEY, self.examples as f64);
        put(TOTAL_KEY, self.total as f64);
        put(STOPPED_KEY, f64::from(u8::from(self.stopped)));
        put(UPPER_KEY, self.upper);
        if let Some(b) = self.bound {
            put(BOUND_KEY, b);
        }
        score
    }
}

/// The weighted mean of the tasks' bounds (the fitness's formula, in the same order).
fn weighted_upper(states: &[TaskState], delta: Option<f64>) -> f64 {
    let (mut sum, mut weight) = (0.0, 0.0);
    for s in states {
        sum += s.weight * s.race_upper(delta);
        weight += s.weight;
    }
    sum / weight
}

/// Race `sliced` (see the module docs): score slice k of every task, k = 1, 2, ...; after each
/// slice but the last, stop when the weighted upper bound is below `race.bound`.
pub fn race(sliced: &mut dyn Sliced, race: &Race) -> Result<Raced, EvalError> {
    let tasks = sliced.tasks();
    let orders: Vec<Vec<usize>> = tasks.iter().map(|t| order(&t.name, t.examples)).collect();
    let plan: Vec<Vec<Range<usize>>> = tasks
        .iter()
        .map(|t| slices(t.examples, race.fraction, t.batch))
        .collect();
    let total: usize = tasks.iter().map(|t| t.examples).sum();
    let stages = plan.iter().map(Vec::len).max().unwrap_or(0);
    // A union bound over every check (stages − 1) of every task: a candidate that would reach
    // the bar is stopped with probability at most 1 − confidence in all.
    let checks = (stages.saturating_sub(1) * tasks.len()).max(1);
    let delta = race.confidence.map(|c| (1.0 - c) / checks as f64);
    let mut examples = 0;
    for stage in 0..stages {
        let slice: Vec<(usize, &[usize])> = plan
            .iter()
            .enumerate()
            .filter_map(|(t, ranges)| Some((t, &orders[t][ranges.get(stage)?.clone()])))
            .collect();
        sliced.score(&slice)?;
        examples += slice.iter().map(|(_, idx)| idx.len()).sum::<usize>();
        if stage + 1 < stages {
            let states: Vec<TaskState> = (0..tasks.len()).map(|t| sliced.state(t)).collect();
            let upper = weighted_upper(&states, delta);
            if stops(upper, race.bound) {
                let mut score = sliced.score_so_far()?;
                // The partial score is at most the upper bound (mathematically; kept so under
                // rounding), hence below the bar.
                score.primary = score.primary.min(upper);
                return Ok(Raced {
                    score,
                    examples,
                    total,
                    stopped: true,
                    upper,
                    bound: race.bound,
                });
            }
        }
    }
    let score = sliced.score_so_far()?;
    Ok(Raced {
        upper: score.primary,
        score,
        examples,
        total,
        stopped: false,
        bound: race.bound,
    })
}

/// Score `candidate` on `split`: whole without a race, else raced when the evaluator can score
/// slices ([`Evaluator::evaluate_subsampled`]; the race is recorded in the metrics,
/// [`Raced::into_score`]), whole when it cannot.
pub fn evaluate(
    evaluator: &dyn Evaluator,
    candidate: &crate::candidate::Candidate,
    split: Split,
    race: Option<Race>,
) -> Result<Score, EvalError> {
    match race {
        None => evaluator.evaluate(candidate, split),
        Some(r) => match evaluator.evaluate_subsampled(candidate, split, &r) {
            Some(raced) => raced.map(Raced::into_score),
            None => evaluator.evaluate(candidate, split),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A candidate whose per-example outcomes are known: `outcomes[t][i]` is example i of task
    /// t right (1.0) or wrong (0.0). Counts every example it scores.
    struct Known {
        outcomes: Vec<Vec<bool>>,
        weights: Vec<f64>,
        right: Vec<usize>,
        scored: Vec<usize>,
        seen: Vec<Vec<usize>>,
    }

    impl Known {
        fn new(outcomes: Vec<Vec<bool>>, weights: Vec<f64>) -> Known {
            let n = outcomes.len();
            Known {
                outcomes,
                weights,
                right: vec![0; n],
                scored: vec![0; n],
                seen: vec![Vec::new(); n],
            }
        }

        fn full(&self) -> f64 {
            let (mut s, mut w) = (0.0, 0.0);
            for (o, wt) in self.outcomes.iter().zip(&self.weights) {
                s += wt * o.iter().filter(|&&x| x).count() as f64 / o.len().max(1) as f64;
                w += wt;
            }
            s / w
        }
    }

    impl Sliced for Known {
        fn tasks(&self) -> Vec<SliceTask> {
            (0..self.outcomes.len())
                .map(|t| SliceTask {
                    name: format!("task{t}"),
                    examples: self.outcomes[t].len(),
                    batch: 1 + t,
                })
                .collect()
        }
        fn score(&mut self, slice: &[(usize, &[usize])]) -> Result<(), EvalError> {
            for &(task, indices) in slice {
                for &i in indices {
                    self.right[task] += usize::from(self.outcomes[task][i]);
                    self.scored[task] += 1;
                    self.seen[task].push(i);
                }
            }
            Ok(())
        }
        fn state(&self, task: usize) -> TaskState {
            let (right, scored, total) = (
                self.right[task],
                self.scored[task],
                self.outcomes[task].len(),
            );
            TaskState {
                weight: self.weights[task],
                upper: accuracy_upper(right, scored, total),
                partial: right as f64 / scored.max(1) as f64,
                scored,
                total,
                mean_of_unit_values: true,
            }
        }
        fn score_so_far(&self) -> Result<Score, EvalError> {
            let (mut s, mut w) = (0.0, 0.0);
            for t in 0..self.outcomes.len() {
                s += self.weights[t] * self.right[t] as f64 / self.scored[t].max(1) as f64;
                w += self.weights[t];
            }
            Ok(Score {
                primary: s / w,
                metrics: Default::default(),
            })
        }
    }

    /// SplitMix64, for reproducible random cases.
    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut state = seed;
        move || {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
    }

    #[test]
    fn slices_cover_every_example_once_in_a_fixed_order() {
        assert_eq!(slices(200, 0.125, 1).len(), 8);
        assert_eq!(slices(10, 0.25, 1), vec![0..3, 3..6, 6..9, 9..10]);
        assert_eq!(slices(3, 0.01, 1), vec![0..1, 1..2, 2..3]);
        assert!(slices(0, 0.5, 1).is_empty());
        // whole batches: 25 → 32, so 200 examples run as 6 × 32 + 8, as a whole evaluation
        let s = slices(200, 0.125, 32);
        assert_eq!(s.len(), 7);
        assert!(s[..6].iter().all(|r| r.len() == 32) && s[6].len() == 8);
        assert_eq!(slices(20, 0.1, 32), vec![0..20]);
        for n in [1, 7, 200] {
            let mut o = order("add", n);
            assert_eq!(o, order("add", n), "the order is fixed");
            o.sort_unstable();
            assert_eq!(o, (0..n).collect::<Vec<_>>());
            for batch in [1, 4, 32] {
                let s = slices(n, 0.3, batch);
                assert_eq!(s.iter().map(|r| r.len()).sum::<usize>(), n);
                assert!(s.windows(2).all(|w| w[0].end == w[1].start));
            }
        }
        assert_ne!(order("add", 50), order("cipher", 50), "seeded by the name");
        assert_ne!(order("add", 50), (0..50).collect::<Vec<_>>(), "shuffled");
    }

    #[test]
    fn fraction_is_checked() {
        for ok in [0.01, 0.25, 0.999] {
            assert!(check_fraction(ok).is_ok(), "{ok}");
        }
        for bad in [0.0, 1.0, -0.5, 1.5, f64::NAN, f64::INFINITY] {
            let e = check_fraction(bad).unwrap_err();
            assert!(e.contains("must be in (0, 1)"), "{e}");
        }
    }

    #[test]
    fn upper_bounds_are_reached_by_perfect_completions_and_never_exceeded() {
        let mut next = rng(7);
        for _ in 0..2000 {
            let total = (next() % 50) as usize + 1;
            let scored = (next() % (total as u64 + 1)) as usize;
            let right = (next() % (scored as u64 + 1)) as usize;
            let up = accuracy_upper(right, scored, total);
            // the partial score never exceeds it
            assert!(right as f64 / scored.max(1) as f64 <= up + 1e-15);
            // every completion ends at or below it, the perfect one exactly on it
            let more = (next() % ((total - scored) as u64 + 1)) as usize;
            assert!((right + more) as f64 / total as f64 <= up);
            assert_eq!((right + total - scored) as f64 / total as f64, up);
        }
        assert_eq!(accuracy_upper(3, 4, 4), 0.75);
        assert_eq!(accuracy_upper(0, 0, 0), 0.0);
        // perplexity: remaining log p ≤ 0 only lower the sum
        let up = loglik_upper(-12.0, 40);
        assert_eq!(up, (-12.0f64 / 40.0).exp());
        assert!((-12.0f64 / 30.0).exp() <= up, "partial ≤ upper");
        assert!(((-12.0f64 - 3.0) / 40.0).exp() < up);
    }

    #[test]
    fn generation_bound_is_the_mu_th_best() {
        let f = |v: &[Option<f64>]| generation_bound(v.iter().copied());
        // λ = 6, μ = 3: the third best
        assert_eq!(
            f(&[
                Some(0.1),
                Some(0.5),
                Some(0.3),
                Some(0.9),
                Some(0.2),
                Some(0.7)
            ]),
            Some(0.5)
        );
        // order does not matter
        assert_eq!(
            f(&[
                Some(0.7),
                Some(0.2),
                Some(0.9),
                Some(0.3),
                Some(0.5),
                Some(0.1)
            ]),
            Some(0.5)
        );
        // failures rank last; too many of them: no bar
        assert_eq!(f(&[None, Some(0.4), None, Some(0.6)]), Some(0.4));
        assert_eq!(f(&[None, None, None, Some(0.6)]), None);
        assert_eq!(f(&[]), None);
        // λ = 5 → μ = 2
        assert_eq!(
            f(&[Some(1.0), Some(2.0), Some(3.0), Some(4.0), Some(5.0)]),
            Some(4.0)
        );
    }

    /// The core property, over many random candidates and bars: a candidate is stopped only
    /// when no completion of its unscored examples could reach the bar (so its full score is
    /// below the bar too), its recorded score is below the bar, a candidate that is not stopped
    /// gets its exact full score, and the same case gives the same outcome every time.
    #[test]
    fn never_stops_a_candidate_that_could_still_reach_the_bar() {
        let mut next = rng(42);
        let mut stopped = 0;
        let mut saved = 0;
        for case in 0..3000 {
            let tasks = 1 + (next() % 3) as usize;
            let mut outcomes = Vec::new();
            let mut weights = Vec::new();
            for _ in 0..tasks {
                let n = 1 + (next() % 40) as usize;
                let p = (next() % 101) as f64 / 100.0;
                outcomes.push(
                    (0..n)
                        .map(|_| (next() % 1000) as f64 / 1000.0 < p)
                        .collect::<Vec<bool>>(),
                );
                weights.push(0.5 + (next() % 4) as f64 * 0.5);
            }
            let fraction = [0.1, 0.125, 0.25, 0.5, 0.9][(next() % 5) as usize];
            let bound = match next() % 4 {
                0 => None,
                _ => Some((next() % 101) as f64 / 100.0),
            };
            let r = Race {
                fraction,
                bound,
                confidence: None,
            };
            let mut a = Known::new(outcomes.clone(), weights.clone());
            let got = race(&mut a, &r).unwrap();
            let full = a.full();
            if got.stopped {
                stopped += 1;
                saved += got.total - got.examples;
                let b = bound.expect("only a bar stops");
                // the best completion of what was left: every unscored example right
                let mut best = Known::new(outcomes.clone(), weights.clone());
                for (seen, task) in a.seen.iter().zip(best.outcomes.iter_mut()) {
                    for (i, right) in task.iter_mut().enumerate() {
                        if !seen.contains(&i) {
                            *right = true;
                        }
                    }
                }
                assert!(best.full() < b, "case {case}: stopped but could reach {b}");
                assert!(full < b, "case {case}");
                assert!(
                    got.score.primary <= got.upper && got.upper < b,
                    "case {case}"
                );
                assert!(got.examples < got.total, "case {case}");
            } else {
                assert_eq!(got.examples, got.total, "case {case}");
                assert!((got.score.primary - full).abs() < 1e-12, "case {case}");
                assert_eq!(got.upper, got.score.primary);
            }
            // deterministic: the same case, the same outcome and the same examples
            let mut again = Known::new(outcomes, weights);
            assert_eq!(race(&mut again, &r).unwrap(), got, "case {case}");
            assert_eq!(again.seen, a.seen);
        }
        assert!(
            stopped > 300,
            "the rule must stop some candidates: {stopped}"
        );
        assert!(saved > 0);
    }

    #[test]
    fn serfling_margin_shrinks_with_the_sample_and_the_population_factor() {
        assert_eq!(serfling_margin(0, 10, 0.05), f64::INFINITY);
        let m = |k| serfling_margin(k, 200, 0.01);
        assert!(m(25) > m(50) && m(50) > m(100) && m(100) > m(199));
        // Hoeffding's margin at k = 25, shrunk by the finite-population factor
        let hoeffding = ((1.0f64 / 0.01).ln() / 50.0).sqrt();
        assert!((m(25) - hoeffding * (1.0f64 - 24.0 / 200.0).sqrt()).abs() < 1e-12);
        assert!(m(200) < 0.01, "{}", m(200));
        // a smaller δ (higher confidence) widens it
        assert!(serfling_margin(25, 200, 0.001) > m(25));
    }

    /// With a confidence c, a candidate that reaches the bar is stopped in at most a share
    /// 1 − c of cases (over random candidates; the bound is conservative, so far fewer), and
    /// candidates far below the bar are stopped sooner than by the exact bound.
    #[test]
    fn the_statistical_bound_rarely_stops_a_candidate_that_reaches_the_bar() {
        let mut next = rng(3);
        let (mut reaching, mut wrongly_stopped) = (0, 0);
        let (mut exact_examples, mut stat_examples) = (0, 0);
        for case in 0..1500 {
            let tasks = 1 + (next() % 2) as usize;
            let mut outcomes = Vec::new();
            for _ in 0..tasks {
                let n = 50 + (next() % 150) as usize;
                let p = (next() % 101) as f64 / 100.0;
                outcomes.push(
                    (0..n)
                        .map(|_| (next() % 1000) as f64 / 1000.0 < p)
                        .collect::<Vec<bool>>(),
                );
            }
            let weights = vec![1.0; tasks];
            let full = Known::new(outcomes.clone(), weights.clone()).full();
            // half the cases reach their bar (at or just below the full score), half are far
            // below it
            let reaches = case % 2 == 0;
            let bar = if reaches {
                full - (next() % 50) as f64 / 1000.0
            } else {
                full + 0.15 + (next() % 100) as f64 / 1000.0
            };
            let run = |confidence| {
                let mut k = Known::new(outcomes.clone(), weights.clone());
                let r = Race {
                    fraction: 0.125,
                    bound: Some(bar),
                    confidence,
                };
                race(&mut k, &r).unwrap()
            };
            let exact = run(None);
            let stat = run(Some(0.9));
            assert_eq!(stat, run(Some(0.9)), "deterministic");
            if reaches {
                reaching += 1;
                assert!(
                    !exact.stopped,
                    "case {case}: the exact bound never stops it"
                );
                wrongly_stopped += usize::from(stat.stopped);
            } else {
                exact_examples += exact.examples;
                stat_examples += stat.examples;
                assert!(stat.examples <= exact.examples, "case {case}");
            }
            if stat.stopped {
                assert!(
                    stat.score.primary < bar,
                    "case {case}: flagged below the bar"
                );
            }
        }
        assert!(
            wrongly_stopped * 10 <= reaching,
            "{wrongly_stopped} of {reaching} stopped although they reach the bar"
        );
        assert!(
            stat_examples * 3 < exact_examples * 2,
            "statistical {stat_examples} vs exact {exact_examples} examples"
        );
    }

    #[test]
    fn no_bar_scores_every_example_and_the_race_is_recorded() {
        let mut k = Known::new(vec![vec![true, false, true, true]], vec![1.0]);
        let r = race(
            &mut k,
            &Race {
                fraction: 0.25,
                bound: None,
                confidence: None,
            },
        )
        .unwrap();
        assert!(!r.stopped);
        assert_eq!((r.examples, r.total), (4, 4));
        assert_eq!(r.score.primary, 0.75);
        let s = r.into_score();
        assert_eq!(s.metrics[EXAMPLES_KEY], 4.0);
        assert_eq!(s.metrics[TOTAL_KEY], 4.0);
        assert_eq!(s.metrics[STOPPED_KEY], 0.0);
        assert!(!s.metrics.contains_key(BOUND_KEY));

        // all wrong against a bar of 0.5: after 2 of 8 the bound is 6/8, after 4 it is 4/8
        // (not below), after 5 it is 3/8 → stopped with 5 scored
        let mut k = Known::new(vec![vec![false; 8]], vec![1.0]);
        let r = race(
            &mut k,
            &Race {
                fraction: 1.0 / 8.0,
                bound: Some(0.5),
                confidence: None,
            },
        )
        .unwrap();
        assert!(r.stopped);
        assert_eq!(r.examples, 5);
        assert_eq!(r.upper, 3.0 / 8.0);
        let s = r.into_score();
        assert_eq!(s.primary, 0.0);
        assert_eq!(s.metrics[STOPPED_KEY], 1.0);
        assert_eq!(s.metrics[BOUND_KEY], 0.5);
    }
}
