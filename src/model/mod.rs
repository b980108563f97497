//! Forward passes on candle: a decoder-only transformer (Llama / Mistral / Qwen2 names) that runs
//! merged tensors or data-flow routes from memory.
