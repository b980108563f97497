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

    /// Right-padded `[b, L]` ids of `seqs` (each non-empty) and `L`. Right padding is exact
    /// without a mask: the model is causal, so no position sees the padding after it.
    fn padded(&self, seqs: &[&[u32]]) -> Result<(Tensor, usize)> {
        let len = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut ids = vec![0u32; seqs.len() * len];
        for (row, s) in ids.chunks_mut(len.max(1)).zip(seqs) {
            row[..s.len()].copy_from_slice(s);
        }
        Ok((Tensor::from_vec(ids, (seqs.len(), len), self.device)?, len))
    }

    /// Run the model on right-padded `seqs` (each non-empty). Returns logits `[b, L, V]`.
    fn forward_padded(&self, seqs: &[&[u32]]) -> Result<(Tensor, usize)> {
        let (input, len) = self.padded(seqs)?;
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
    ///
    /// Only the positions that predict a scored token (position t − 1 predicts s[t]) go
    /// through the LM head and the log-softmax, [`LOGIT_CHUNK`] positions at a time
    /// ([`CausalLm::logits_at`]): memory is set by the batch's hidden states, not by
    /// batch × length × vocabulary.
    pub fn log_likelihoods(&self, seqs: &[(Vec<u32>, usize)]) -> Result<Vec<f64>> {
        let lens: Vec<usize> = seqs.iter().map(|(s, _)| s.len()).collect();
        let batches = self.batches(&lens);
        let results = batches
            .par_iter()
            .map(|batch| -> Result<Vec<(usize, f64)>> {
                let rows: Vec<&[u32]> = batch.iter().map(|&i| seqs[i].0.as_slice()).collect();
                let (input, len) = self.padded(&rows)?;
                let mut positions = Vec::new();
                let mut targets = Vec::new();
                for (r, &i) in batch.iter().enumerate() {
                    let (s, start) = &seqs[i];
                    for (t, &token) in s.iter().enumerate().skip(*start) {
                        positions.push((r * len + t - 1) as u32);
                        targets.push(token);
                    }
                }
                let mut logp: Vec<f32> = Vec::with_capacity(positions.len());
                if !positions.is_empty() {
                    let vocab = self.model.vocab_size();
                    let mut sink = |logits: Tensor| -> Result<()> {
                        let n = logits.dim(0)?;
                        if logits.dims() != [n, vocab] {
                            return Err(Error::Eval(format!(
                                "model returned logits of shape {:?}, expected [{n}, {vocab}]",
                                logits.dims()
                            )));
                        }
                        let at = logp.len();
                        let t = Tensor::from_slice(&targets[at..at + n], (n, 1), self.device)?;
                        let picked =
                            candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?
                                .gather(&t, 1)?
                                .squeeze(1)?;
                        logp.extend(picked.to_vec1::<f32>()?);
                        Ok(())
                    };
                    self.model
                        .logits_at(&input, &positions, LOGIT_CHUNK, &mut sink)?;
                }
                if logp.len() != positions.len() {
                    return Err(Error::Eval(format!(
                        "model returned {} scored positions, expected {}",
                        logp.len(),
                        positions.len()
                    )));
                }
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
    ///
    /// Models with a cache ([`CausalLm::decoder`]) prefill each batch once and then decode one
    /// token per step; finished rows leave the batch. Others re-run the whole sequence at every
    /// step. Both give the same tokens.
    pub fn generate(
        &self,
        prompts: &[&[u32]],
        max_new_tokens: usize,
        stop: &str,
        tok: &dyn TextTokenizer,
    ) -> Result<Vec<String>, EvalError> {
        let lens: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
        let batches = self.batches(&lens);
        let eos = tok.eos_ids();
        let results = batches
            .par_iter()
            .map(|batch| -> Result<Vec<(usize, String)>, EvalError> {
                let mut state = Generation {
                    new: vec![Vec::new(); batch.len()],
                    texts: vec![String::new(); batch.len()],
                    done: vec![max_new_tokens == 0; batch.len()],
                    eos: &eos,
                    stop,
                    tok,
                };
                if max_new_tokens > 0 {
                    let rows: Vec<&[u32]> = batch.iter().map(|&i| prompts[i]).collect();
                    match self
                        .model
                        .decoder(&rows, max_new_tokens)
                        .map_err(candidate_err)?
                    {
                        Some((dec, logits)) => {
                            self.decode_cached(dec, logits, &mut state, max_new_tokens)?
                        }
                        None => self.decode_full(&rows, &mut state, max_new_tokens)?,
                    }
                }
                Ok(batch.iter().copied().zip(state.texts).collect())
            })
            .collect::<Result<Vec<_>, EvalError>>()?;
        let mut out = vec![String::new(); prompts.len()];
        for (i, t) in results.into_iter().flatten() {
            out[i] = t;
        }
        Ok(out)
    }

    /// Incremental decoding: `logits` are the prefill's; row `k` of the decoder is the `k`-th
    /// row of `state` not yet done.
    fn decode_cached(
        &self,
        mut dec: Box<dyn crate::model::Decode + '_>,
        mut logits: Tensor,
        state: &mut Generation<'_>,
        max_new_tokens: usize,
    ) -> Result<(), EvalError> {
        let mut active: Vec<usize> = (0..state.done.len()).collect();
        for step in 0..max_new_tokens {
            let next = logits
                .argmax(D::Minus1)
                .and_then(|t| t.to_vec1::<u32>())
                .map_err(|e| candidate_err(e.into()))?;
            if next.len() != active.len() {
                return Err(EvalError::Candidate(format!(
                    "decoder returned {} rows, expected {}",
                    next.len(),
                    active.len()
                )));
            }
            for (&r, &t) in active.iter().zip(&next) {
                state.push(r, t)?;
            }
            let keep: Vec<usize> = (0..active.len())
                .filter(|&k| !state.done[active[k]])
                .collect();
            if keep.is_empty() || step + 1 == max_new_tokens {
                break;
            }
            dec.retain(&keep).map_err(candidate_err)?;
            let tokens: Vec<u32> = keep.iter().map(|&k| next[k]).collect();
            active = keep.iter().map(|&k| active[k]).collect();
            logits = dec.step(&tokens).map_err(candidate_err)?;
        }
        Ok(())
    }

    /// Generation without a cache: the whole sequence at every step.
    fn decode_full(
        &self,
        prompts: &[&[u32]],
        state: &mut Generation<'_>,
        max_new_tokens: usize,
    ) -> Result<(), EvalError> {
        for _ in 0..max_new_tokens {
            let active: Vec<usize> = (0..prompts.len()).filter(|&r| !state.done[r]).collect();
            if active.is_empty() {
                break;
            }
            let seqs: Vec<Vec<u32>> = active
                .iter()
                .map(|&r| [prompts[r], state.new[r].as_slice()].concat())
                .collect();
            let rows: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
            let next = self.next_tokens(&rows).map_err(candidate_err)?;
            for (&r, t) in active.iter().zip(next) {
                state.push(r, t)?;
            }
        }
        Ok(())
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

/// Positions whose logits exist at once when scoring log-likelihoods: 256 × a 128k vocabulary
/// is 128 MiB of f32.
pub const LOGIT_CHUNK: usize = 256;

/// The generation state of one batch's rows.
struct Generation<'t> {
    /// Tokens generated so far (EOS excluded).
    new: Vec<Vec<u32>>,
    /// Decoded outputs, cut at the stop string.
    texts: Vec<String>,
    done: Vec<bool>,
    /// Ids that end a row (the tokenizer's EOS ids).
    eos: &'t [u32],
    stop: &'t str,
    tok: &'t dyn TextTokenizer,
}

impl Generation<'_> {
    /// Row `r` generated `token`: EOS ends it; otherwise the token is kept and the text
    /// re-decoded, ending the row when the stop string appears (the output is cut there).
    fn push(&mut self, r: usize, token: u32) -> Result<(), EvalError> {
        if self.eos.contains(&token) {
            self.done[r] = true;
            return Ok(());
        }
        self.new[r].push(token);
        let text = self.tok.decode(&self.new[r])?;
        if let Some(cut) = (!self.stop.is_empty())
            .then(|| text.find(self.stop))
            .flatten()
        {
            self.texts[r] = text[..cut].to_string();
            self.done[r] = true;
        } else {
            self.texts[r] = text;
        }
        Ok(())
    }
}

fn candidate_err(e: Error) -> EvalError {
    EvalError::Candidate(e.to_string())
}
