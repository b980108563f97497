//! Batched forward passes of one model for the LM evaluator: log-likelihoods of scored
//! positions and greedy generation.

use candle_core::{D, DType, Device, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::eval::EvalError;
use crate::model::CausalLm;
use crate::tokenizer::TextTokenizer;

/// Batched forward passes of one model.
pub(crate) struct Runner<'a> {
    pub model: &'a dyn CausalLm,
    pub device: &'a Device,
    pub batch_size: usize,
}

impl Runner<'_> {
    /// Batches of indices into `lens`, sorted by length so each batch pads little.
    fn batches(&self, lens: &[usize]) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..lens.len()).collect();
        order.sort_by_key(|&i| (lens[i], i));
        order
            .chunks(self.batch_size)
            .map(<[usize]>::to_vec)
            .collect()
    }

    /// Run the model on right-padded `seqs` (each non-empty). Returns logits `[b, L, V]`.
    fn forward_padded(&self, seqs: &[&[u32]]) -> Result<(Tensor, usize)> {
        let len = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut ids = vec![0u32; seqs.len() * len];
        for (row, s) in ids.chunks_mut(len.max(1)).zip(seqs) {
            row[..s.len()].copy_from_slice(s);
        }
        let input = Tensor::from_vec(ids, (seqs.len(), len), self.device)?;
        let logits = self.model.forward(&input)?;
        let want = (seqs.len(), len, self.model.vocab_size());
        if logits.dims() != [want.0, want.1, want.2] {
            return Err(Error::Eval(format!(
                "model returned logits of shape {:?}, expected {want:?}",
                logits.dims()
            )));
        }
        Ok((logits.to_dtype(DType::F32)?, len))
    }

    /// For each `(sequence, start)`: Σ log p(s[t] | s[..t]) over `t` in `start..len`
    /// (`start ≥ 1`).
    pub fn log_likelihoods(&self, seqs: &[(Vec<u32>, usize)]) -> Result<Vec<f64>> {
        let lens: Vec<usize> = seqs.iter().map(|(s, _)| s.len()).collect();
        let batches = self.batches(&lens);
        let results = batches
            .par_iter()
            .map(|batch| -> Result<Vec<(usize, f64)>> {
                let rows: Vec<&[u32]> = batch.iter().map(|&i| seqs[i].0.as_slice()).collect();
                let (logits, len) = self.forward_padded(&rows)?;
                // Only the positions that predict a scored token: position t − 1 predicts s[t]
                // for t in start..len. Selecting them before the log-softmax keeps the work
                // (and memory) proportional to the scored tokens, not to batch × seq × vocab.
                let mut positions = Vec::new();
                let mut targets = Vec::new();
                for (r, &i) in batch.iter().enumerate() {
                    let (s, start) = &seqs[i];
                    for (t, &token) in s.iter().enumerate().skip(*start) {
                        positions.push((r * len + t - 1) as u32);
                        targets.push(token);
                    }
                }
                let n = positions.len();
                let logp = if n == 0 {
                    Vec::new()
                } else {
                    let vocab = self.model.vocab_size();
                    let positions = Tensor::from_vec(positions, n, self.device)?;
                    let targets = Tensor::from_vec(targets, (n, 1), self.device)?;
                    let picked = logits
                        .reshape((rows.len() * len, vocab))?
                        .index_select(&positions, 0)?;
                    candle_nn::ops::log_softmax(&picked, D::Minus1)?
                        .gather(&targets, 1)?
                        .squeeze(1)?
                        .to_vec1::<f32>()?
                };
                let mut offset = 0;
                Ok(batch
                    .iter()
                    .map(|&i| {
                        let (s, start) = &seqs[i];
                        let k = s.len() - start;
                        let sum = logp[offset..offset + k].iter().map(|&x| f64::from(x)).sum();
                        offset += k;
                        (i, sum)
                    })
                    .collect())
            })
            .collect::<Result<Vec<_>>>()?;
        let mut out = vec![0.0; seqs.len()];
        for (i, v) in results.into_iter().flatten() {
            out[i] = v;
        }
        Ok(out)
    }

    /// Greedy generation from each prompt; returns the decoded outputs, cut at `stop`.
    pub fn generate(
        &self,
        prompts: &[&[u32]],
        max_new_tokens: usize,
        stop: &str,
        tok: &dyn TextTokenizer,
    ) -> Result<Vec<String>, EvalError> {
        let lens: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
        let batches = self.batches(&lens);
        let eos = tok.eos_id();
        let results = batches
            .par_iter()
            .map(|batch| -> Result<Vec<(usize, String)>, EvalError> {
                let mut seqs: Vec<Vec<u32>> = batch.iter().map(|&i| prompts[i].to_vec()).collect();
                let mut texts = vec![String::new(); batch.len()];
                let mut done = vec![max_new_tokens == 0; batch.len()];
                for _ in 0..max_new_tokens {
                    let active: Vec<usize> = (0..batch.len()).filter(|&r| !done[r]).collect();
                    if active.is_empty() {
                        break;
                    }
                    let rows: Vec<&[u32]> = active.iter().map(|&r| seqs[r].as_slice()).collect();
                    let next = self.next_tokens(&rows).map_err(candidate_err)?;
                    for (&r, tokn) in active.iter().zip(next) {
                        if Some(tokn) == eos {
                            done[r] = true;
                            continue;
                        }
                        seqs[r].push(tokn);
                        let text = tok.decode(&seqs[r][prompts[batch[r]].len()..])?;
                        if let Some(cut) = (!stop.is_empty()).then(|| text.find(stop)).flatten() {
                            texts[r] = text[..cut].to_string();
                            done[r] = true;
                        } else {
                            texts[r] = text;
                        }
                    }
                }
                Ok(batch.iter().copied().zip(texts).collect())
            })
            .collect::<Result<Vec<_>, EvalError>>()?;
        let mut out = vec![String::new(); prompts.len()];
        for (i, t) in results.into_iter().flatten() {
            out[i] = t;
        }
        Ok(out)
    }

    /// The greedy next token after each (non-empty) sequence.
    fn next_tokens(&self, rows: &[&[u32]]) -> Result<Vec<u32>> {
        let (logits, len) = self.forward_padded(rows)?;
        let vocab = self.model.vocab_size();
        let last: Vec<u32> = rows
            .iter()
            .enumerate()
            .map(|(r, s)| (r * len + s.len() - 1) as u32)
            .collect();
        let last = Tensor::from_vec(last, rows.len(), self.device)?;
        let picked = logits
            .reshape((rows.len() * len, vocab))?
            .index_select(&last, 0)?;
        Ok(picked.argmax(D::Minus1)?.to_vec1::<u32>()?)
    }
}

fn candidate_err(e: Error) -> EvalError {
    EvalError::Candidate(e.to_string())
}
