//! Tokenizers: the toy world's fixed char-level vocabulary, and Hugging Face `tokenizer.json`.

use crate::error::Result;

/// Text ↔ token ids.
pub trait TextTokenizer: Send + Sync {
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
    fn decode(&self, ids: &[u32]) -> Result<String>;
    /// The id prepended to every sequence, if the model uses one.
    fn bos_id(&self) -> Option<u32>;
    /// The id that ends generation, if any.
    fn eos_id(&self) -> Option<u32>;
}
