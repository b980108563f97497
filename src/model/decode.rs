//! Incremental decoding with a key/value cache: prefill a batch of prompts once, then feed one
//! token per sequence per step.
//!
//! **Batching.** Prompts of different lengths are *left*-padded to the longest, so every row's
//! last prompt token sits in the same column and one step appends one column for all rows. Each
//! row's pad columns are masked out of every attention (−∞ before the softmax, so they contribute
//! exactly zero), and RoPE positions skip them, so a row sees exactly what it would see alone:
//! token `p` of a prompt gets angle `p · f`, whatever the padding. Pad *queries* attend to
//! themselves only (their outputs are never read), which keeps every softmax row finite.
//!
//! **Shared prefix.** The tokens every prompt of a batch starts with (few-shot examples, a
//! system prompt) are prefilled once, for one row, and that row's cache is copied to every row;
//! the padding goes between the shared prefix and each row's own tokens
//! (`[prefix][pad_r][own tokens]`), masked and skipped by the positions as above.
//!
//! **Cache.** One slot per hop of the stack: a plain model has one hop per layer; a data-flow
//! route ([`crate::candidate::Route`]) has one hop per visit, so a layer that a route runs twice
//! gets two slots. Each slot holds keys and values `[batch, kv_heads, capacity, head_dim]` (the
//! kv heads, not the repeated query heads), allocated once for prompt + `max_new_tokens` columns
//! and filled in place. Attention over the cache groups the query heads by their kv head
//! (`[b, kv, rep·s, d] × [b, kv, d, C]`), so no repeated copy of the cache is made.
//!
//! **Finished rows** leave the batch ([`Decoder::retain`]): the cache keeps only the rows still
//! generating, so a batch gets cheaper as its sequences end.
//!
//! Greedy outputs equal those of the full forward ([`Transformer::logits`] re-run on the whole
//! sequence at every step) token for token; `tests/decode.rs` checks it on the toy world, random
//! Llama / Qwen2 / Mistral checkpoints and data-flow routes.

use candle_core::{DType, Device, Tensor};

use crate::candidate::Route;
use crate::error::{Error, Result};
use crate::model::transformer::{
    Kernels, Layer, Transformer, apply_rope, grouped_attention, mlp_block, norm, project,
    rope_values,
};

/// The layers a decoder runs: embeddings and head of one model, then a sequence of
/// `(model, layer, scale)` hops (the hidden state is multiplied by `scale` before the hop).
#[derive(Clone)]
pub struct Stack<'a> {
    embed: &'a Transformer,
    hops: Vec<(&'a Transformer, usize, f32)>,
}

impl<'a> Stack<'a> {
    /// Every layer of one model, in order.
    pub fn plain(model: &'a Transformer) -> Self {
        Stack {
            embed: model,
            hops: (0..model.layers.len()).map(|l| (model, l, 1.0)).collect(),
        }
    }

    /// A data-flow route over `models`; indices are checked here.
    pub fn route(models: &'a [Transformer], route: &Route) -> Result<Self> {
        let embed = models.get(route.embed_model).ok_or_else(|| {
            Error::msg(format!(
                "route: embed_model {} out of range ({} models)",
                route.embed_model,
                models.len()
            ))
        })?;
        let hidden = embed.config.hidden_size;
        let mut hops = Vec::with_capacity(route.hops.len());
        for (n, hop) in route.hops.iter().enumerate() {
            let m = models.get(hop.model).ok_or_else(|| {
                Error::msg(format!(
                    "route hop {n}: model {} out of range ({} models)",
                    hop.model,
                    models.len()
                ))
            })?;
            if hop.layer >= m.layers.len() {
                return Err(Error::msg(format!(
                    "route hop {n}: layer {} out of range (model {} has {} layers)",
                    hop.layer,
                    hop.model,
                    m.layers.len()
                )));
            }
            if m.config.hidden_size != hidden {
                return Err(Error::Mismatch(format!(
                    "route hop {n}: model {} has hidden_size {}, the route's embeddings {hidden}",
                    hop.model, m.config.hidden_size
                )));
            }
            hops.push((m, hop.layer, hop.scale));
        }
        Ok(Stack { embed, hops })
    }

    /// Prefill `prompts` (each non-empty) and return the decoder with the logits `[batch, vocab]`
    /// (f32) of each prompt's next token. The cache has room for `max_new_tokens` more tokens.
    ///
    /// Tokens that every prompt of the batch starts with (a few-shot prefix, a system prompt)
    /// are run once, for one row, and their cache copied to every row; the padding then sits
    /// between that shared prefix and each row's own tokens.
    pub fn start(self, prompts: &[&[u32]], max_new_tokens: usize) -> Result<(Decoder<'a>, Tensor)> {
        if prompts.is_empty() || prompts.iter().any(|p| p.is_empty()) {
            return Err(Error::msg("decode: every prompt needs at least one token"));
        }
        let b = prompts.len();
        // the shared prefix, leaving every row at least one token of its own
        let shortest = prompts.iter().map(|p| p.len()).min().unwrap_or(0);
        let shared = if b > 1 {
            (0..shortest - 1)
                .take_while(|&i| prompts.iter().all(|p| p[i] == prompts[0][i]))
                .count()
        } else {
            0
        };
        let width = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let pads: Vec<usize> = prompts.iter().map(|p| width - p.len()).collect();
        let device = self.embed.device.clone();
        let mut dec = Decoder {
            stack: self,
            slots: Vec::new(),
            shared,
            pads: vec![0],
            filled: 0,
            capacity: width + max_new_tokens,
            device,
        };
        if shared > 0 {
            let prefix = Tensor::from_slice(&prompts[0][..shared], (1, shared), &dec.device)?;
            dec.run(&prefix)?;
            for slot in &mut dec.slots {
                if let Slot::Device { k, v } = slot {
                    let dims = k.dims4()?;
                    let rows = (b, dims.1, dims.2, dims.3);
                    *k = k.broadcast_as(rows)?.contiguous()?;
                    *v = v.broadcast_as(rows)?.contiguous()?;
                }
            }
        }
        dec.pads = pads;
        let rest = width - shared;
        let mut ids = vec![0u32; b * rest];
        for (row, (p, &pad)) in ids.chunks_mut(rest).zip(prompts.iter().zip(&dec.pads)) {
            row[pad..].copy_from_slice(&p[shared..]);
        }
        let input = Tensor::from_vec(ids, (b, rest), &dec.device)?;
        let logits = dec.run(&input)?;
        for (slot, &(m, _, _)) in dec.slots.iter_mut().zip(&dec.stack.hops) {
            if let (true, Slot::Device { k, v }) = (host_attention(m), &*slot) {
                *slot = Slot::Host {
                    k: k.flatten_all()?.to_vec1::<f32>()?,
                    v: v.flatten_all()?.to_vec1::<f32>()?,
                };
            }
        }
        Ok((dec, logits))
    }
}

/// Key and value cache of one hop, `[batch, kv_heads, capacity, head_dim]`.
enum Slot {
    /// Candle tensors on the model's device, filled in place.
    Device { k: Tensor, v: Tensor },
    /// The same layout in host memory. Used after the prefill when the hop runs in f32 on the
    /// CPU with inference kernels: a decode step's attention is then a few dot products per
    /// head, which plain loops do without the per-call cost of dozens of tiny batched gemms.
    Host { k: Vec<f32>, v: Vec<f32> },
}

/// Whether a hop's decode steps attend over a host-memory cache (see [`Slot::host`]).
fn host_attention(m: &Transformer) -> bool {
    m.device.is_cpu() && m.dtype == DType::F32 && m.kernels == Kernels::Inference
}

/// A batch being decoded; see the module docs.
pub struct Decoder<'a> {
    stack: Stack<'a>,
    /// One per hop, created by the prefill.
    slots: Vec<Slot>,
    /// Columns of the prefix every row shares (before the padding).
    shared: usize,
    /// Pad columns of each row, right after the shared prefix.
    pads: Vec<usize>,
    /// Columns of the cache in use.
    filled: usize,
    capacity: usize,
    device: Device,
}

impl Decoder<'_> {
    /// Rows still in the batch.
    pub fn rows(&self) -> usize {
        self.pads.len()
    }

    /// Append one token to each row and return the logits `[rows, vocab]` of the next.
    pub fn step(&mut self, tokens: &[u32]) -> Result<Tensor> {
        if tokens.len() != self.rows() {
            return Err(Error::msg(format!(
                "decode: {} tokens for {} rows",
                tokens.len(),
                self.rows()
            )));
        }
        if self.filled >= self.capacity {
            return Err(Error::msg(format!(
                "decode: the cache is full ({} columns)",
                self.capacity
            )));
        }
        let input = Tensor::from_vec(tokens.to_vec(), (tokens.len(), 1), &self.device)?;
        self.run(&input)
    }

    /// Keep only the rows at `keep` (indices into the current rows, ascending).
    pub fn retain(&mut self, keep: &[usize]) -> Result<()> {
        if keep.len() == self.rows() {
            return Ok(());
        }
        if let Some(&bad) = keep.iter().find(|&&r| r >= self.rows()) {
            return Err(Error::msg(format!(
                "decode: row {bad} out of range ({} rows)",
                self.rows()
            )));
        }
        let old_rows = self.rows();
        self.pads = keep.iter().map(|&r| self.pads[r]).collect();
        if keep.is_empty() {
            self.slots.clear();
            return Ok(());
        }
        let idx = Tensor::from_vec(
            keep.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            keep.len(),
            &self.device,
        )?;
        for slot in &mut self.slots {
            match slot {
                Slot::Device { k, v } => {
                    *k = k.index_select(&idx, 0)?;
                    *v = v.index_select(&idx, 0)?;
                }
                Slot::Host { k, v } => {
                    let row = k.len() / old_rows;
                    let pick = |t: &[f32]| -> Vec<f32> {
                        keep.iter()
                            .flat_map(|&r| t[r * row..(r + 1) * row].iter().copied())
                            .collect()
                    };
                    *k = pick(k);
                    *v = pick(v);
                }
            }
        }
        Ok(())
    }

    /// Run `input` (`[rows, s]`, the next `s` columns) through the stack, filling the cache;
    /// returns the last column's logits.
    fn run(&mut self, input: &Tensor) -> Result<Tensor> {
        let (b, s) = input.dims2()?;
        let start = self.filled;
        let total = start + s;
        let embed = self.stack.embed;
        let mut x = embed.embed(input)?;
        // RoPE angles per row and column; the additive mask [b, 1, 1, s, total].
        let mut positions = Vec::with_capacity(b * s);
        let mut mask = vec![0f32; b * s * total];
        let p = self.shared;
        for (r, &pad) in self.pads.iter().enumerate() {
            for i in 0..s {
                let col = start + i;
                positions.push(if col < p {
                    col
                } else {
                    col.saturating_sub(pad)
                });
                let row = &mut mask[(r * s + i) * total..(r * s + i + 1) * total];
                for (j, m) in row.iter_mut().enumerate() {
                    if j > col || (j >= p && j < p + pad && j != col) {
                        *m = f32::NEG_INFINITY;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(mask, (b, 1, 1, s, total), &self.device)?;
        let fresh = self.slots.is_empty();
        let mut ropes: Vec<(*const Transformer, (Tensor, Tensor))> = Vec::new();
        let mut masks: Vec<(DType, Tensor)> = Vec::new();
        for h in 0..self.stack.hops.len() {
            let (m, layer, scale) = self.stack.hops[h];
            let key = m as *const Transformer;
            let rope = match ropes.iter().find(|(k, _)| *k == key) {
                Some((_, t)) => t.clone(),
                None => {
                    let (cos, sin) = rope_values(&positions, &m.config, m.kernels);
                    let d = cos.len() / (b * s);
                    // per-row angles: [b, s, d/2] for the fused kernel, [b, 1, s, d] to
                    // broadcast over the heads otherwise
                    let shape: &[usize] = match m.kernels {
                        Kernels::Inference => &[b, s, d],
                        Kernels::Differentiable => &[b, 1, s, d],
                    };
                    let t = (
                        Tensor::from_vec(cos, shape, &self.device)?.to_dtype(m.dtype)?,
                        Tensor::from_vec(sin, shape, &self.device)?.to_dtype(m.dtype)?,
                    );
                    ropes.push((key, t.clone()));
                    t
                }
            };
            let mask = match masks.iter().find(|(d, _)| *d == m.dtype) {
                Some((_, t)) => t.clone(),
                None => {
                    let t = mask.to_dtype(m.dtype)?;
                    masks.push((m.dtype, t.clone()));
                    t
                }
            };
            if scale != 1.0 {
                x = (x * f64::from(scale))?;
            }
            if x.dtype() != m.dtype {
                x = x.to_dtype(m.dtype)?;
            }
            if fresh {
                let c = &m.config;
                let shape = (b, c.num_key_value_heads, self.capacity, c.head_dim);
                self.slots.push(Slot::Device {
                    k: Tensor::zeros(shape, m.dtype, &self.device)?,
                    v: Tensor::zeros(shape, m.dtype, &self.device)?,
                });
            }
            let l = &m.layers[layer];
            x = match &mut self.slots[h] {
                Slot::Device { k, v } => cached_layer(m, l, &x, &rope, &mask, (k, v), start)?,
                Slot::Host { k, v } => {
                    let rows = Rows {
                        positions: &positions,
                        shared: p,
                        pads: &self.pads,
                        capacity: self.capacity,
                    };
                    host_layer(m, l, &x, &rows, (k, v), start)?
                }
            };
        }
        self.filled = total;
        let last = x.narrow(1, s - 1, 1)?.squeeze(1)?;
        if last.dtype() != embed.dtype {
            return embed.head(&last.to_dtype(embed.dtype)?);
        }
        embed.head(&last)
    }
}

/// One decoder layer over the new columns `x` (`[b, s, hidden]`, starting at cache column
/// `start`), writing their keys and values into `slot` and attending over columns `..start + s`.
fn cached_layer(
    m: &Transformer,
    l: &Layer,
    x: &Tensor,
    rope: &(Tensor, Tensor),
    mask: &Tensor,
    (cache_k, cache_v): (&mut Tensor, &mut Tensor),
    start: usize,
) -> Result<Tensor> {
    let c = &m.config;
    let (b, s, _) = x.dims3()?;
    let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
    let total = start + s;
    let kn = m.kernels;
    let h = norm(x, &l.input_norm, c.rms_norm_eps, kn)?;
    let heads = |t: Tensor, n: usize| -> candle_core::Result<Tensor> {
        t.reshape((b, s, n, hd))?.transpose(1, 2)?.contiguous()
    };
    let q = heads(project(&h, &l.q, l.q_bias.as_ref(), kn)?, nh)?;
    let k = heads(project(&h, &l.k, l.k_bias.as_ref(), kn)?, nkv)?;
    let v = heads(project(&h, &l.v, l.v_bias.as_ref(), kn)?, nkv)?;
    let q = apply_rope(&q, rope)?;
    let k = apply_rope(&k, rope)?.contiguous()?;
    cache_k.slice_set(&k, 2, start)?;
    cache_v.slice_set(&v, 2, start)?;
    let keys = cache_k.narrow(2, 0, total)?;
    let values = cache_v.narrow(2, 0, total)?;
    let attn = grouped_attention(&q, &keys, &values, mask, nh, kn)?;
    let x = (x + project(&attn, &l.o, None, kn)?)?;
    mlp_block(l, &x, c.rms_norm_eps, kn)
}

/// What a host-memory attention needs to know of the batch's rows.
struct Rows<'r> {
    /// RoPE position of each row's new token.
    positions: &'r [usize],
    shared: usize,
    pads: &'r [usize],
    capacity: usize,
}

/// [`cached_layer`] for one new column with the cache in host memory: projections, norms and
/// the MLP on candle as before; RoPE, the cache write and the attention in plain loops, rows in
/// parallel.
fn host_layer(
    m: &Transformer,
    l: &Layer,
    x: &Tensor,
    rows: &Rows<'_>,
    (cache_k, cache_v): (&mut Vec<f32>, &mut Vec<f32>),
    start: usize,
) -> Result<Tensor> {
    use rayon::prelude::*;

    let c = &m.config;
    let (b, s, _) = x.dims3()?;
    if s != 1 {
        return Err(Error::msg(
            "decode: a host-memory cache takes one column per step",
        ));
    }
    let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
    let (rep, half, cap, total) = (nh / nkv, hd / 2, rows.capacity, start + 1);
    let kn = m.kernels;
    let h = norm(x, &l.input_norm, c.rms_norm_eps, kn)?;
    let q = project(&h, &l.q, l.q_bias.as_ref(), kn)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let k = project(&h, &l.k, l.k_bias.as_ref(), kn)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let v = project(&h, &l.v, l.v_bias.as_ref(), kn)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let (cos, sin) = rope_values(rows.positions, c, Kernels::Inference);
    let rope = |x: &mut [f32], r: usize| {
        let (cs, sn) = (
            &cos[r * half..(r + 1) * half],
            &sin[r * half..(r + 1) * half],
        );
        for j in 0..half {
            let (a, bb) = (x[j], x[j + half]);
            x[j] = a * cs[j] - bb * sn[j];
            x[j + half] = bb * cs[j] + a * sn[j];
        }
    };
    let row_len = nkv * cap * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = vec![0f32; b * nh * hd];
    out.par_chunks_mut(nh * hd)
        .zip(cache_k.par_chunks_mut(row_len))
        .zip(cache_v.par_chunks_mut(row_len))
        .enumerate()
        .for_each(|(r, ((out, ck), cv))| {
            for g in 0..nkv {
                let at = (g * cap + start) * hd;
                let src = (r * nkv + g) * hd;
                ck[at..at + hd].copy_from_slice(&k[src..src + hd]);
                rope(&mut ck[at..at + hd], r);
                cv[at..at + hd].copy_from_slice(&v[src..src + hd]);
            }
            let (p, pad) = (rows.shared, rows.pads[r]);
            let visible = |j: usize| j < p || j >= p + pad;
            let mut scores = vec![0f32; total];
            for head in 0..nh {
                let g = head / rep;
                let mut qh = q[(r * nh + head) * hd..(r * nh + head + 1) * hd].to_vec();
                rope(&mut qh, r);
                let keys = &ck[g * cap * hd..(g * cap + total) * hd];
                let mut max = f32::NEG_INFINITY;
                for (j, sc) in scores.iter_mut().enumerate() {
                    *sc = if visible(j) {
                        let kj = &keys[j * hd..(j + 1) * hd];
                        qh.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * scale
                    } else {
                        f32::NEG_INFINITY
                    };
                    max = max.max(*sc);
                }
                let mut sum = 0f32;
                for sc in scores.iter_mut() {
                    *sc = (*sc - max).exp();
                    sum += *sc;
                }
                let o = &mut out[head * hd..(head + 1) * hd];
                let values = &cv[g * cap * hd..(g * cap + total) * hd];
                for (j, &w) in scores.iter().enumerate() {
                    if w != 0.0 {
                        let w = w / sum;
                        for (o, v) in o.iter_mut().zip(&values[j * hd..(j + 1) * hd]) {
                            *o += w * v;
                        }
                    }
                }
            }
        });
    let attn = Tensor::from_vec(out, (b, 1, nh * hd), &m.device)?;
    let x = (x + project(&attn, &l.o, None, kn)?)?;
    mlp_block(l, &x, c.rms_norm_eps, kn)
}
