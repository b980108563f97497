//! The optimizer: an adapter over the `cmaes` crate (0.2.2) that runs one generation at a time.
//!
//! `cmaes` has no ask/tell interface: it calls the objective itself. [`Optimizer::step`] runs
//! exactly one generation. With `slots ≥ 2` it runs `CMAES::next_parallel` inside a rayon pool
//! of `slots` threads, so `slots` candidates are evaluated at once and each evaluation's own
//! parallel work (merge, batches, matmuls) shares those threads: the search never runs more
//! than `slots` busy threads. With `slots = 1` it runs `CMAES::next` on the caller's thread, one
//! candidate after another, so each evaluation uses the caller's whole pool (every core, or
//! `--threads`). Both draw the same proposals (the sampling is the same; only the evaluation
//! loop differs). The objective is
//! minimised (the search passes −fitness) and must return a finite value: failures are the
//! caller's finite penalty. Runs are seeded, so the same seed and the same objective values give
//! the same proposals, in parallel or not — the basis of resume-by-replay.
//!
//! Restarts are driven here (the crate's `Restarter` runs to the end on its own and cannot be
//! stepped): when a CMA-ES run meets one of its termination criteria, a new run starts from a
//! random genome with a derived seed —
//! * IPOP (Auger & Hansen 2005): population doubled at each restart;
//! * BIPOP (Hansen 2009): alternates that large-population regime with small-population runs
//!   (λ = ⌊λ₀·(½·λ_large/λ₀)^(U²)⌋, σ = σ₀·10^(−2U), U uniform in [0, 1)), picking the regime that
//!   has spent fewer evaluations so far.
//!
//! The budget (generations, evaluations) counts every run together; a generation that would
//! exceed `max_evaluations` is not started.

use std::sync::Arc;

use cmaes::{CMAES, CMAESOptions, DVector, ParallelObjectiveFunction};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::search::def::Restarts;

/// The function minimised: a genome in, a finite value out. Called from several threads.
pub type Objective = Arc<dyn Fn(&[f64]) -> f64 + Send + Sync>;

/// Draws the initial mean of a restart.
pub type RandomStart = Box<dyn Fn(&mut StdRng) -> Vec<f64> + Send>;

/// Optimizer settings.
#[derive(Clone, Debug, PartialEq)]
pub struct OptimizerConfig {
    pub sigma0: f64,
    /// λ of the first run; `None` = 4 + ⌊3 ln n⌋.
    pub population: Option<usize>,
    pub generations: Option<usize>,
    pub max_evaluations: Option<usize>,
    pub seed: u64,
    pub restarts: Restarts,
    /// Evaluations run at once (the rayon pool's size; 1 = one after another on the caller's
    /// thread, each using the caller's whole pool).
    pub slots: usize,
}

struct Obj(Objective);

impl ParallelObjectiveFunction for Obj {
    fn evaluate_parallel(&self, x: &DVector<f64>) -> f64 {
        (self.0)(x.as_slice())
    }
}

impl cmaes::ObjectiveFunction for Obj {
    fn evaluate(&mut self, x: &DVector<f64>) -> f64 {
        (self.0)(x.as_slice())
    }
}

/// What one generation did.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationInfo {
    /// Which CMA-ES run (0 = the first, then one per restart).
    pub run: usize,
    /// The generation's index over all runs (0-based).
    pub generation: usize,
    /// Its population size.
    pub lambda: usize,
    /// Evaluations so far, all runs.
    pub evals: usize,
    /// Step size after the update.
    pub sigma: f64,
    /// Why the run ended after this generation, if it did.
    pub termination: Option<String>,
}

/// A seeded CMA-ES with restarts, stepped one generation at a time.
pub struct Optimizer {
    cfg: OptimizerConfig,
    objective: Objective,
    random_start: RandomStart,
    /// The evaluation pool (`slots ≥ 2` only).
    pool: Option<rayon::ThreadPool>,
    cmaes: Option<CMAES<Obj>>,
    lambda0: usize,
    run: usize,
    generation: usize,
    evals: usize,
    finished: bool,
    rng: StdRng,
    // BIPOP bookkeeping
    large_runs: usize,
    large_lambda: usize,
    large_evals: usize,
    small_evals: usize,
    current_is_small: bool,
    run_start_evals: usize,
}

fn run_seed(seed: u64, run: usize) -> u64 {
    seed ^ (run as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

impl Optimizer {
    /// A new optimizer starting at `x0`.
    pub fn new(
        x0: Vec<f64>,
        cfg: OptimizerConfig,
        objective: Objective,
        random_start: RandomStart,
    ) -> Result<Optimizer> {
        if x0.is_empty() {
            return Err(Error::Search("the search space has no genes".into()));
        }
        let n = x0.len();
        let lambda0 = cfg
            .population
            .unwrap_or(4 + (3.0 * (n as f64).ln()).floor() as usize)
            .max(2);
        let pool = if cfg.slots >= 2 {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(cfg.slots)
                .build()
                .map_err(|e| Error::Search(format!("cannot start the evaluation pool: {e}")))?;
            Some(pool)
        } else {
            None
        };
        let rng = StdRng::seed_from_u64(cfg.seed ^ 0x005e_ed0f_4e57_a475);
        let mut opt = Optimizer {
            cfg,
            objective,
            random_start,
            pool,
            cmaes: None,
            lambda0,
            run: 0,
            generation: 0,
            evals: 0,
            finished: false,
            rng,
            large_runs: 0,
            large_lambda: lambda0,
            large_evals: 0,
            small_evals: 0,
            current_is_small: false,
            run_start_evals: 0,
        };
        let sigma0 = opt.cfg.sigma0;
        opt.cmaes = Some(opt.build(x0, sigma0, lambda0)?);
        Ok(opt)
    }

    fn build(&self, mean: Vec<f64>, sigma: f64, lambda: usize) -> Result<CMAES<Obj>> {
        CMAESOptions::new(mean, sigma)
            .population_size(lambda)
            .seed(run_seed(self.cfg.seed, self.run))
            .build(Obj(self.objective.clone()))
            .map_err(|e| Error::Search(format!("invalid CMA-ES options: {e:?}")))
    }

    /// Which run and global generation the next [`Optimizer::step`] will evaluate.
    pub fn next_generation(&self) -> (usize, usize) {
        (self.run, self.generation)
    }

    /// Evaluations so far.
    pub fn evals(&self) -> usize {
        self.evals
    }

    /// Population size of the current run.
    pub fn lambda(&self) -> usize {
        self.cmaes
            .as_ref()
            .map(|c| c.parameters().lambda())
            .unwrap_or(self.lambda0)
    }

    /// The largest number of evaluations the budget allows (for progress bars).
    pub fn budget_evals(&self) -> Option<usize> {
        match (self.cfg.max_evaluations, self.cfg.generations) {
            (Some(m), _) => Some(m),
            (None, Some(g)) if self.cfg.restarts == Restarts::None => Some(g * self.lambda0),
            _ => None,
        }
    }

    /// True when the budget allows no further generation.
    pub fn is_done(&self) -> bool {
        if self.finished || self.cmaes.is_none() {
            return true;
        }
        if self.cfg.generations.is_some_and(|g| self.generation >= g) {
            return true;
        }
        if self
            .cfg
            .max_evaluations
            .is_some_and(|m| self.evals + self.lambda() > m)
        {
            return true;
        }
        false
    }

    /// Run one generation; `None` when the budget is spent (or the run ended without restarts).
    pub fn step(&mut self) -> Result<Option<GenerationInfo>> {
        if self.is_done() {
            return Ok(None);
        }
        let cmaes = self.cmaes.as_mut().expect("checked in is_done");
        let lambda = cmaes.parameters().lambda();
        let end = match &self.pool {
            Some(pool) => pool.install(|| cmaes.next_parallel()),
            None => cmaes.next(),
        };
        let sigma = cmaes.sigma();
        self.evals += lambda;
        let info = GenerationInfo {
            run: self.run,
            generation: self.generation,
            lambda,
            evals: self.evals,
            sigma,
            termination: end.as_ref().map(|t| format!("{:?}", t.reasons)),
        };
        self.generation += 1;
        if end.is_some() {
            self.restart()?;
        }
        Ok(Some(info))
    }

    fn restart(&mut self) -> Result<()> {
        let spent = self.evals - self.run_start_evals;
        if self.current_is_small {
            self.small_evals += spent;
        } else {
            self.large_evals += spent;
        }
        let (lambda, sigma, small) = match self.cfg.restarts {
            Restarts::None => {
                self.finished = true;
                return Ok(());
            }
            Restarts::Ipop => {
                self.large_runs += 1;
                (
                    self.lambda0 << self.large_runs.min(20),
                    self.cfg.sigma0,
                    false,
                )
            }
            Restarts::Bipop => {
                if self.large_runs > 0 && self.small_evals < self.large_evals {
                    let u: f64 = self.rng.random();
                    let ratio = 0.5 * self.large_lambda as f64 / self.lambda0 as f64;
                    let lambda =
                        (self.lambda0 as f64 * ratio.max(1.0).powf(u * u)).floor() as usize;
                    (lambda.max(2), self.cfg.sigma0 * 10f64.powf(-2.0 * u), true)
                } else {
                    self.large_runs += 1;
                    self.large_lambda = self.lambda0 << self.large_runs.min(20);
                    (self.large_lambda, self.cfg.sigma0, false)
                }
            }
        };
        let mean = (self.random_start)(&mut self.rng);
        self.run += 1;
        self.current_is_small = small;
        self.run_start_evals = self.evals;
        self.cmaes = Some(self.build(mean, sigma, lambda)?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn sphere() -> Objective {
        Arc::new(|x: &[f64]| x.iter().map(|v| (v - 0.3) * (v - 0.3)).sum())
    }

    fn cfg(restarts: Restarts) -> OptimizerConfig {
        OptimizerConfig {
            sigma0: 0.3,
            population: Some(6),
            generations: Some(40),
            max_evaluations: None,
            seed: 7,
            restarts,
            slots: 2,
        }
    }

    fn zero_start() -> RandomStart {
        Box::new(|rng: &mut StdRng| (0..3).map(|_| rng.random::<f64>()).collect())
    }

    #[test]
    fn minimises_a_sphere_and_is_reproducible() {
        let run = || {
            let seen = Arc::new(Mutex::new(Vec::new()));
            let s2 = seen.clone();
            let f: Objective = Arc::new(move |x: &[f64]| {
                let v = sphere()(x);
                s2.lock().unwrap().push(v);
                v
            });
            let mut o = Optimizer::new(vec![0.0; 3], cfg(Restarts::None), f, zero_start()).unwrap();
            let mut gens = 0;
            while let Some(info) = o.step().unwrap() {
                assert_eq!(info.generation, gens);
                gens += 1;
            }
            let mut v = seen.lock().unwrap().clone();
            let best = v.iter().cloned().fold(f64::INFINITY, f64::min);
            v.sort_by(f64::total_cmp);
            (gens, best, v)
        };
        let (g1, b1, v1) = run();
        let (g2, _, v2) = run();
        assert_eq!(g1, 40);
        assert_eq!(g1, g2);
        assert!(b1 < 1e-4, "best {b1}");
        assert_eq!(v1, v2, "same seed, same values");
    }

    #[test]
    fn one_slot_evaluates_in_turn_on_the_callers_thread_with_the_same_proposals() {
        let run = |slots: usize| {
            let seen = Arc::new(Mutex::new(Vec::new()));
            let (running, most) = (
                Arc::new(std::sync::atomic::AtomicUsize::new(0)),
                Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            );
            let (s2, r2, m2) = (seen.clone(), running.clone(), most.clone());
            let caller = std::thread::current().id();
            let f: Objective = Arc::new(move |x: &[f64]| {
                use std::sync::atomic::Ordering::SeqCst;
                let now = r2.fetch_add(1, SeqCst) + 1;
                m2.fetch_max(now, SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(2));
                let on_caller = std::thread::current().id() == caller;
                s2.lock().unwrap().push((x.to_vec(), on_caller));
                r2.fetch_sub(1, SeqCst);
                sphere()(x)
            });
            let mut c = cfg(Restarts::None);
            c.slots = slots;
            c.generations = Some(5);
            let mut o = Optimizer::new(vec![0.0; 3], c, f, zero_start()).unwrap();
            while o.step().unwrap().is_some() {}
            let mut points = seen.lock().unwrap().clone();
            points.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
            let most = most.load(std::sync::atomic::Ordering::SeqCst);
            (points, most)
        };
        let (one, most_one) = run(1);
        let (two, most_two) = run(2);
        assert_eq!(most_one, 1, "one slot: one evaluation at a time");
        assert!(most_two <= 2);
        assert!(
            one.iter().all(|p| p.1),
            "one slot runs on the caller's thread"
        );
        assert!(two.iter().all(|p| !p.1), "two slots run on the pool");
        let xs = |v: &[(Vec<f64>, bool)]| v.iter().map(|p| p.0.clone()).collect::<Vec<_>>();
        assert_eq!(xs(&one), xs(&two), "same proposals either way");
    }

    #[test]
    fn evaluation_budget_is_respected() {
        let mut c = cfg(Restarts::None);
        c.generations = None;
        c.max_evaluations = Some(20);
        let mut o = Optimizer::new(vec![0.0; 3], c, sphere(), zero_start()).unwrap();
        while o.step().unwrap().is_some() {}
        assert_eq!(o.evals(), 18); // 3 generations of 6; a 4th would exceed 20
    }

    #[test]
    fn ipop_restarts_double_the_population() {
        // A flat objective ends each CMA-ES run quickly (no progress in function values).
        let flat: Objective = Arc::new(|_: &[f64]| 1.0);
        let mut c = cfg(Restarts::Ipop);
        c.generations = Some(200);
        let mut o = Optimizer::new(vec![0.0; 3], c, flat, zero_start()).unwrap();
        let mut lambdas = Vec::new();
        while let Some(info) = o.step().unwrap() {
            if lambdas.last() != Some(&info.lambda) {
                lambdas.push(info.lambda);
            }
        }
        assert_eq!(&lambdas[..3], &[6, 12, 24]);
    }

    #[test]
    fn bipop_alternates_large_and_small_populations() {
        let flat: Objective = Arc::new(|_: &[f64]| 1.0);
        let mut c = cfg(Restarts::Bipop);
        c.generations = Some(400);
        let mut o = Optimizer::new(vec![0.0; 3], c, flat, zero_start()).unwrap();
        let mut runs: Vec<(usize, usize)> = Vec::new(); // (run, lambda)
        while let Some(info) = o.step().unwrap() {
            if runs.last().map(|r| r.0) != Some(info.run) {
                runs.push((info.run, info.lambda));
            }
        }
        let lambdas: Vec<usize> = runs.iter().map(|r| r.1).collect();
        // first run λ₀ = 6, then a large run (12), then small runs (≤ 6) until they have spent
        // as much as the large regime, then 24.
        assert_eq!(&lambdas[..2], &[6, 12], "{lambdas:?}");
        assert!(lambdas[2] <= 6, "{lambdas:?}");
        assert!(lambdas.contains(&24), "{lambdas:?}");
    }
}
