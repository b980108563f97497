//! Model soups (Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned
//! models improves accuracy without increasing inference time", ICML) and SWA (Izmailov et al.
//! 2018, "Averaging Weights Leads to Wider Optima and Better Generalization", UAI).
//!
//! - **Uniform soup**: the plain average of the fine-tunes, `θ = (1/N) Σᵢ θᵢ` — the same as the
//!   `linear` method with equal weights, so a recipe can ask for it too.
//! - **Greedy soup** (the paper's recipe 1): sort the models by dev score, best first; start the
//!   soup with the best; add each next model only if the dev score of the average of the soup's
//!   members and it *strictly* improves. Any [`Evaluator`] does; only the dev split is used.
//! - **SWA**: the uniform soup of checkpoints saved along one training run (e.g. at the end of each
//!   of the last epochs, with a constant or cyclic learning rate). Save the checkpoints, then
//!   `uniform_soup(&checkpoints)` — or a `linear` recipe listing them with equal weights.
//!
//! All of this runs on in-memory models ([`MemModel`]); they must have the same tensor names and
//! shapes. [`merge_mem`] applies any registered [`MergeMethod`] to in-memory models the same way
//! (no recipe, no files), which the digits example and tests use for `fisher` and `regmean`.

use std::sync::Arc;

use crate::candidate::{Candidate, CandidateBody, MemModel, TensorMap};
use crate::error::{Error, Result};
use crate::eval::{Evaluator, Split};
use crate::merge::{MergeInput, MergeMethod, Params, Scope, tensor_seed};
use crate::tensor::TensorBuf;

/// The uniform average of `models` (config taken from the first), summed in `f64` and stored in
/// the first model's dtype, tensor by tensor.
pub fn uniform_soup(models: &[&MemModel]) -> Result<MemModel> {
    let first = models
        .first()
        .ok_or_else(|| Error::msg("a soup needs at least one model"))?;
    let mut tensors = TensorMap::new();
    for (name, t) in &first.tensors {
        let mut acc = vec![0f64; t.len()];
        for (i, m) in models.iter().enumerate() {
            let other = m.tensors.get(name).ok_or_else(|| {
                Error::Mismatch(format!("model {i} of the soup has no tensor `{name}`"))
            })?;
            if other.shape != t.shape {
                return Err(Error::Mismatch(format!(
                    "tensor `{name}`: shape {:?} in model {i}, {:?} in model 0",
                    other.shape, t.shape
                )));
            }
            for (a, v) in acc.iter_mut().zip(other.values().iter()) {
                *a += f64::from(*v);
            }
        }
        let n = models.len() as f64;
        let data = acc.into_iter().map(|a| (a / n) as f32).collect();
        tensors.insert(
            name.clone(),
            TensorBuf::from_f32(t.shape.clone(), data, t.dtype()),
        );
    }
    for (i, m) in models.iter().enumerate() {
        if m.tensors.len() != first.tensors.len() {
            return Err(Error::Mismatch(format!(
                "model {i} of the soup has {} tensors, model 0 has {}",
                m.tensors.len(),
                first.tensors.len()
            )));
        }
    }
    Ok(MemModel {
        config: first.config.clone(),
        tensors,
    })
}

/// Stochastic weight averaging: the uniform soup of checkpoints of one run.
pub fn swa(checkpoints: &[&MemModel]) -> Result<MemModel> {
    uniform_soup(checkpoints)
}

/// The outcome of [`greedy_soup`].
#[derive(Clone, Debug)]
pub struct GreedySoup {
    /// The averaged model.
    pub model: MemModel,
    /// Indices (into the input) of the models in the soup, in the order they were added.
    pub members: Vec<usize>,
    /// Dev score of every input model, in input order.
    pub individual: Vec<f64>,
    /// Dev score of the soup.
    pub score: f64,
}

fn dev_score(evaluator: &dyn Evaluator, model: &MemModel) -> Result<f64> {
    let candidate = Candidate {
        body: CandidateBody::Merged(Arc::new(model.clone())),
        recipe: None,
    };
    evaluator
        .evaluate(&candidate, Split::Dev)
        .map(|s| s.primary)
        .map_err(|e| Error::Eval(e.to_string()))
}

/// Greedy soup: see the module docs. Ties in the dev ranking keep the input order.
pub fn greedy_soup(models: &[&MemModel], evaluator: &dyn Evaluator) -> Result<GreedySoup> {
    if models.is_empty() {
        return Err(Error::msg("a soup needs at least one model"));
    }
    let individual: Vec<f64> = models
        .iter()
        .map(|m| dev_score(evaluator, m))
        .collect::<Result<_>>()?;
    let mut order: Vec<usize> = (0..models.len()).collect();
    order.sort_by(|&a, &b| individual[b].total_cmp(&individual[a]));
    let mut members = vec![order[0]];
    let mut best = individual[order[0]];
    let mut soup = models[order[0]].clone();
    for &i in &order[1..] {
        let mut trial: Vec<&MemModel> = members.iter().map(|&k| models[k]).collect();
        trial.push(models[i]);
        let candidate = uniform_soup(&trial)?;
        let score = dev_score(evaluator, &candidate)?;
        if score > best {
            best = score;
            members.push(i);
            soup = candidate;
        }
    }
    Ok(GreedySoup {
        model: soup,
        members,
        individual,
        score: best,
    })
}

/// The uniform soup (or SWA over saved checkpoints) of model directories, averaged in memory and
/// written to `out` with the first model's dtypes, config.json and tokenizer files. For large
/// models prefer `evomerge soup`, which streams the same average as a `linear` merge.
pub fn uniform_soup_dirs(dirs: &[&std::path::Path], out: &std::path::Path) -> Result<()> {
    let first = dirs
        .first()
        .ok_or_else(|| Error::msg("a soup needs at least one model directory"))?;
    let models: Vec<MemModel> = dirs
        .iter()
        .map(|d| crate::store::load_mem_f32(d))
        .collect::<Result<_>>()?;
    let refs: Vec<&MemModel> = models.iter().collect();
    let soup = uniform_soup(&refs)?;
    let source = crate::store::Model::open(first)?;
    let writer = crate::store::ModelWriter::create(
        out,
        source.tensors(),
        &crate::store::WriteConfig::default(),
    )?;
    for (name, t) in &soup.tensors {
        writer.write(name, &t.values())?;
    }
    let listed: Vec<String> = dirs
        .iter()
        .map(|d| format!("- `{}`", d.display()))
        .collect();
    let card = format!(
        "# Uniform soup\n\nThe element-wise average of {} models (Wortsman et al. 2022; over \
         checkpoints of one run this is SWA, Izmailov et al. 2018):\n\n{}\n",
        dirs.len(),
        listed.join("\n")
    );
    writer.finish(&soup.config, Some(first), &card)?;
    Ok(())
}

/// Merge in-memory `models` with `method`, tensor by tensor. `aux[i]` holds model `i`'s auxiliary
/// tensors (its Fisher diagonal or Gram matrices) for methods that declare [`MergeMethod::aux`];
/// `global` and `per_model` override the declared defaults. No base model. Each output tensor is
/// stored in the first model's dtype for it.
pub fn merge_mem(
    method: &dyn MergeMethod,
    models: &[&MemModel],
    aux: &[&TensorMap],
    global: &Params,
    per_model: &[Params],
    seed: u64,
) -> Result<MemModel> {
    let first = models
        .first()
        .ok_or_else(|| Error::msg("a merge needs at least one model"))?;
    let mut defaults_global = Params::default();
    let mut defaults_model = Params::default();
    for d in method.params() {
        if let Some(v) = d.default {
            match d.scope {
                Scope::Global => defaults_global.set(d.name, v),
                Scope::PerModel => defaults_model.set(d.name, v),
            }
        }
    }
    defaults_global.0.extend(global.0.clone());
    let model_params: Vec<Params> = (0..models.len())
        .map(|i| {
            let mut p = defaults_model.clone();
            if let Some(o) = per_model.get(i) {
                p.0.extend(o.0.clone());
            }
            p
        })
        .collect();
    let mut tensors = TensorMap::new();
    for (name, t) in &first.tensors {
        let mut inputs = Vec::with_capacity(models.len());
        for (i, m) in models.iter().enumerate() {
            let other = m
                .tensors
                .get(name)
                .ok_or_else(|| Error::Mismatch(format!("model {i} has no tensor `{name}`")))?;
            if other.shape != t.shape {
                return Err(Error::Mismatch(format!(
                    "tensor `{name}`: shape {:?} in model {i}, {:?} in model 0",
                    other.shape, t.shape
                )));
            }
            inputs.push(other.values());
        }
        let aux_values: Vec<Option<std::borrow::Cow<'_, [f32]>>> = if method.aux().is_some() {
            (0..models.len())
                .map(|i| aux.get(i).and_then(|a| a.get(name)).map(TensorBuf::values))
                .collect()
        } else {
            Vec::new()
        };
        let input = MergeInput {
            tensor: name,
            shape: &t.shape,
            base: None,
            models: inputs.iter().map(|v| v.as_ref()).collect(),
            model_params: model_params.clone(),
            global: defaults_global.clone(),
            aux: aux_values.iter().map(|a| a.as_deref()).collect(),
            seed: tensor_seed(seed, name),
        };
        let data = method.merge(&input)?;
        tensors.insert(
            name.clone(),
            TensorBuf::from_f32(t.shape.clone(), data, t.dtype()),
        );
    }
    Ok(MemModel {
        config: first.config.clone(),
        tensors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::{EvalError, Score};

    fn model(v: f32) -> MemModel {
        let mut tensors = TensorMap::new();
        tensors.insert("w".into(), TensorBuf::new(vec![1], vec![v]));
        MemModel {
            config: serde_json::json!({}),
            tensors,
        }
    }

    /// Scores a one-number model by −|w − 1|: the best soup averages to 1.
    struct Target;
    impl Evaluator for Target {
        fn name(&self) -> &str {
            "target"
        }
        fn evaluate(&self, c: &Candidate, _: Split) -> Result<Score, EvalError> {
            let CandidateBody::Merged(m) = &c.body else {
                unreachable!()
            };
            Ok(Score {
                primary: -f64::from((m.tensors["w"].values()[0] - 1.0).abs()),
                ..Default::default()
            })
        }
    }

    #[test]
    fn uniform_soup_averages() {
        let (a, b, c) = (model(1.0), model(2.0), model(6.0));
        let s = uniform_soup(&[&a, &b, &c]).unwrap();
        assert_eq!(*s.tensors["w"].values(), [3.0]);
    }

    #[test]
    fn greedy_soup_adds_only_strict_improvements() {
        // Dev scores: 1.5 → −0.5, 0.0 → −1, 3.0 → −2, 0.8 → −0.2 (best first).
        let ms = [model(1.5), model(0.0), model(3.0), model(0.8)];
        let refs: Vec<&MemModel> = ms.iter().collect();
        let g = greedy_soup(&refs, &Target).unwrap();
        // Start {0.8}: + 1.5 → 1.15 (−0.15, better); + 0.0 → 0.767 (−0.233, worse);
        // + 3.0 → 1.767 (worse). Soup = {0.8, 1.5}.
        assert_eq!(g.members, vec![3, 0]);
        assert!((g.model.tensors["w"].values()[0] - 1.15).abs() < 1e-6);
        assert!((g.score + 0.15).abs() < 1e-6);
        let want = [-0.5, -1.0, -2.0, -0.2];
        assert!(
            g.individual
                .iter()
                .zip(want)
                .all(|(a, b)| (a - b).abs() < 1e-6)
        );
    }
}
