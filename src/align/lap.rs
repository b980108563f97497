//! The linear assignment problem: given an `n × n` matrix, pick one entry per row and per column
//! with the largest (or smallest) total. Solved exactly by the Hungarian method with row/column
//! potentials and shortest augmenting paths (Kuhn 1955; Munkres 1957; in the O(n³) form of
//! Jonker & Volgenant 1987), in `f64`.

/// The assignment `perm` (row `i` takes column `perm[i]`) that maximises `Σ_i score[i][perm[i]]`.
/// `score` is row-major `n × n`. Non-finite entries are treated as very bad.
pub fn maximize(score: &[f64], n: usize) -> Vec<usize> {
    let cost: Vec<f64> = score
        .iter()
        .map(|&s| if s.is_finite() { -s } else { f64::MAX / 4.0 })
        .collect();
    minimize(&cost, n)
}

/// The assignment `perm` (row `i` takes column `perm[i]`) that minimises `Σ_i cost[i][perm[i]]`.
/// `cost` is row-major `n × n`.
pub fn minimize(cost: &[f64], n: usize) -> Vec<usize> {
    assert_eq!(cost.len(), n * n, "cost matrix must be n × n");
    if n == 0 {
        return Vec::new();
    }
    // Rows and columns are 1-based below; index 0 is the virtual start of each augmenting path.
    // u, v: dual potentials; way[j]: previous column on the shortest path to column j;
    // p[j]: the row assigned to column j (0 = free).
    let inf = f64::INFINITY;
    let mut u = vec![0.0; n + 1];
    let mut v = vec![0.0; n + 1];
    let mut p = vec![0usize; n + 1];
    let mut way = vec![0usize; n + 1];
    for i in 1..=n {
        p[0] = i;
        let mut j0 = 0usize;
        let mut minv = vec![inf; n + 1];
        let mut used = vec![false; n + 1];
        loop {
            used[j0] = true;
            let i0 = p[j0];
            let mut delta = inf;
            let mut j1 = 0usize;
            for j in 1..=n {
                if used[j] {
                    continue;
                }
                let reduced = cost[(i0 - 1) * n + (j - 1)] - u[i0] - v[j];
                if reduced < minv[j] {
                    minv[j] = reduced;
                    way[j] = j0;
                }
                if minv[j] < delta {
                    delta = minv[j];
                    j1 = j;
                }
            }
            if j1 == 0 {
                // Only possible with NaN costs; take any free column to stay total.
                j1 = (1..=n).find(|&j| !used[j]).unwrap_or(1);
                delta = 0.0;
            }
            for j in 0..=n {
                if used[j] {
                    u[p[j]] += delta;
                    v[j] -= delta;
                } else {
                    minv[j] -= delta;
                }
            }
            j0 = j1;
            if p[j0] == 0 {
                break;
            }
        }
        // Flip the augmenting path.
        loop {
            let j1 = way[j0];
            p[j0] = p[j1];
            j0 = j1;
            if j0 == 0 {
                break;
            }
        }
    }
    let mut perm = vec![0usize; n];
    for j in 1..=n {
        if p[j] > 0 {
            perm[p[j] - 1] = j - 1;
        }
    }
    perm
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn total(cost: &[f64], n: usize, perm: &[usize]) -> f64 {
        (0..n).map(|i| cost[i * n + perm[i]]).sum()
    }

    fn permutations(n: usize) -> Vec<Vec<usize>> {
        if n == 0 {
            return vec![vec![]];
        }
        let mut out = Vec::new();
        for p in permutations(n - 1) {
            for k in 0..n {
                let mut q = p.clone();
                q.insert(k, n - 1);
                out.push(q);
            }
        }
        out
    }

    #[test]
    fn hand_example() {
        // Rows: workers, columns: jobs. The optimum 1 + 2 + 2 = 5 takes (0,1), (1,0), (2,2).
        let cost = [4., 1., 3., 2., 0., 5., 3., 2., 2.];
        let perm = minimize(&cost, 3);
        assert_eq!(perm, vec![1, 0, 2]);
        assert_eq!(total(&cost, 3, &perm), 5.0);
        let perm = maximize(&cost, 3);
        // Best total: 4 + 5 + 2 = 11 via (0,0), (1,2), (2,1).
        assert_eq!(total(&cost, 3, &perm), 11.0);
    }

    #[test]
    fn matches_brute_force_on_random_matrices() {
        let mut rng = StdRng::seed_from_u64(5);
        for n in 1..=6 {
            let all = permutations(n);
            for _ in 0..30 {
                // Integer costs make ties frequent, which exercises the degenerate paths.
                let cost: Vec<f64> = (0..n * n)
                    .map(|_| f64::from(rng.random_range(-5i32..6)))
                    .collect();
                let best = all
                    .iter()
                    .map(|p| total(&cost, n, p))
                    .fold(f64::INFINITY, f64::min);
                let perm = minimize(&cost, n);
                let mut seen = perm.clone();
                seen.sort_unstable();
                assert_eq!(seen, (0..n).collect::<Vec<_>>(), "not a permutation");
                assert_eq!(total(&cost, n, &perm), best, "n={n} cost={cost:?}");
            }
        }
    }

    #[test]
    fn identity_is_optimal_for_a_dominant_diagonal() {
        let n = 50;
        let score: Vec<f64> = (0..n * n)
            .map(|k| {
                if k / n == k % n {
                    10.0
                } else {
                    (k % 7) as f64 * 0.1
                }
            })
            .collect();
        assert_eq!(maximize(&score, n), (0..n).collect::<Vec<_>>());
    }
}
