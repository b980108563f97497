//! Tokenizers: the toy world's fixed char-level vocabulary, and Hugging Face `tokenizer.json`.
//!
//! [`load_tokenizer`] picks one for a model directory by what the directory ships:
//!
//! 1. a `tokenizer.json` → [`HfTokenizer`] (bos / eos ids from config.json's `bos_token_id` /
//!    `eos_token_id`, when present);
//! 2. otherwise config.json's `"evomerge_tokenizer": "char"` marker → [`CharTokenizer`] (the toy
//!    models under `assets/toy/` ship this; a merge copies the base model's config.json, so the
//!    marker travels with in-memory candidates too — see [`tokenizer_for_config`]);
//! 3. otherwise an error naming the directory.
//!
//! # The char vocabulary
//!
//! | id | token |
//! |---|---|
//! | 0 | `<pad>` |
//! | 1 | `<bos>` |
//! | 2 | `<eos>` |
//! | 3 | `\n` |
//! | 4 | space |
//! | 5–14 | `0`–`9` |
//! | 15–40 | `a`–`z` |
//! | 41–66 | `A`–`Z` |
//! | 67–86 | `+ - * / = ? : ; , . ! ' " ( ) < > _ # \|` |
//!
//! 87 ids in all ([`CharTokenizer::VOCAB_SIZE`]). Encoding a character outside this table is an
//! error that names it; decoding skips `<pad>`, `<bos>` and `<eos>`.

use std::path::Path;

use crate::error::{Error, Result};

/// Text ↔ token ids.
pub trait TextTokenizer: Send + Sync {
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
    fn decode(&self, ids: &[u32]) -> Result<String>;
    /// The id prepended to every sequence, if the model uses one.
    fn bos_id(&self) -> Option<u32>;
    /// The id that ends generation, if any.
    fn eos_id(&self) -> Option<u32>;
}

/// The config.json key that marks a model as using [`CharTokenizer`], and its value.
pub const CHAR_MARKER_KEY: &str = "evomerge_tokenizer";
/// Value of [`CHAR_MARKER_KEY`] for the char vocabulary.
pub const CHAR_MARKER_VALUE: &str = "char";

const PUNCT: &str = "+-*/=?:;,.!'\"()<>_#|";

/// The fixed character vocabulary documented in the module docs.
#[derive(Clone, Copy, Debug, Default)]
pub struct CharTokenizer;

impl CharTokenizer {
    pub const PAD: u32 = 0;
    pub const BOS: u32 = 1;
    pub const EOS: u32 = 2;
    pub const NEWLINE: u32 = 3;
    pub const SPACE: u32 = 4;
    /// Number of ids (the toy models' `vocab_size`).
    pub const VOCAB_SIZE: usize = 67 + PUNCT.len();

    pub fn new() -> Self {
        CharTokenizer
    }

    /// The id of one character, if it is in the vocabulary.
    pub fn char_id(c: char) -> Option<u32> {
        match c {
            '\n' => Some(3),
            ' ' => Some(4),
            '0'..='9' => Some(5 + (c as u32 - '0' as u32)),
            'a'..='z' => Some(15 + (c as u32 - 'a' as u32)),
            'A'..='Z' => Some(41 + (c as u32 - 'A' as u32)),
            _ => PUNCT.find(c).map(|i| 67 + i as u32),
        }
    }

    /// The character of one id; `None` for the special ids and ids out of range.
    pub fn id_char(id: u32) -> Option<char> {
        match id {
            3 => Some('\n'),
            4 => Some(' '),
            5..=14 => char::from_digit(id - 5, 10),
            15..=40 => char::from_u32('a' as u32 + id - 15),
            41..=66 => char::from_u32('A' as u32 + id - 41),
            _ => PUNCT.chars().nth((id as usize).checked_sub(67)?),
        }
    }
}

impl TextTokenizer for CharTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        text.chars()
            .map(|c| {
                Self::char_id(c).ok_or_else(|| {
                    Error::msg(format!(
                        "char tokenizer: character {c:?} (U+{:04X}) is not in the vocabulary",
                        c as u32
                    ))
                })
            })
            .collect()
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        let mut s = String::with_capacity(ids.len());
        for &id in ids {
            if id <= Self::EOS {
                continue;
            }
            s.push(Self::id_char(id).ok_or_else(|| {
                Error::msg(format!(
                    "char tokenizer: id {id} is out of range (vocab size {})",
                    Self::VOCAB_SIZE
                ))
            })?);
        }
        Ok(s)
    }

    fn bos_id(&self) -> Option<u32> {
        Some(Self::BOS)
    }

    fn eos_id(&self) -> Option<u32> {
        Some(Self::EOS)
    }
}

/// A Hugging Face `tokenizer.json`, via the `tokenizers` crate. Special tokens are not added by
/// `encode`; callers prepend [`TextTokenizer::bos_id`] themselves.
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
}

impl HfTokenizer {
    /// Load `path` (a tokenizer.json) with the given bos / eos ids.
    pub fn from_file(path: &Path, bos: Option<u32>, eos: Option<u32>) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            msg: format!("cannot load tokenizer: {e}"),
        })?;
        Ok(HfTokenizer { inner, bos, eos })
    }
}

impl TextTokenizer for HfTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::msg(format!("tokenizer: cannot encode {text:?}: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::msg(format!("tokenizer: cannot decode {ids:?}: {e}")))
    }

    fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    fn eos_id(&self) -> Option<u32> {
        self.eos
    }
}

fn token_id(config: &serde_json::Value, key: &str) -> Option<u32> {
    match config.get(key)? {
        serde_json::Value::Number(n) => n.as_u64().map(|x| x as u32),
        // Some configs list several eos ids; generation stops at the first.
        serde_json::Value::Array(a) => a.first()?.as_u64().map(|x| x as u32),
        _ => None,
    }
}

/// The tokenizer for a model given its config.json and, if it lives on disk, its directory
/// (see the module docs for the order of the checks).
pub fn tokenizer_for_config(
    config: &serde_json::Value,
    dir: Option<&Path>,
) -> Result<Box<dyn TextTokenizer>> {
    if let Some(dir) = dir {
        let file = dir.join("tokenizer.json");
        if file.is_file() {
            let bos = token_id(config, "bos_token_id");
            let eos = token_id(config, "eos_token_id");
            return Ok(Box::new(HfTokenizer::from_file(&file, bos, eos)?));
        }
    }
    match config.get(CHAR_MARKER_KEY).and_then(|v| v.as_str()) {
        Some(CHAR_MARKER_VALUE) => Ok(Box::new(CharTokenizer)),
        Some(other) => Err(Error::Config {
            path: dir.map(|d| d.join("config.json")).unwrap_or_default(),
            msg: format!("unknown {CHAR_MARKER_KEY} `{other}` (expected `{CHAR_MARKER_VALUE}`)"),
        }),
        None => Err(Error::Config {
            path: dir.map(|d| d.to_path_buf()).unwrap_or_default(),
            msg: format!(
                "no tokenizer: neither a tokenizer.json nor config.json's \
                 `{CHAR_MARKER_KEY}: \"{CHAR_MARKER_VALUE}\"`"
            ),
        }),
    }
}

/// The tokenizer for the model directory `dir` (reads its config.json).
pub fn load_tokenizer(dir: &Path) -> Result<Box<dyn TextTokenizer>> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let config: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.clone(),
        msg: format!("invalid JSON: {e}"),
    })?;
    tokenizer_for_config(&config, Some(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn char_vocab_round_trips_every_id() {
        let tok = CharTokenizer;
        for id in 3..CharTokenizer::VOCAB_SIZE as u32 {
            let c = CharTokenizer::id_char(id).unwrap();
            assert_eq!(CharTokenizer::char_id(c), Some(id), "char {c:?}");
        }
        assert_eq!(
            CharTokenizer::id_char(CharTokenizer::VOCAB_SIZE as u32),
            None
        );
        assert_eq!(CharTokenizer::VOCAB_SIZE, 87);
        assert_eq!(tok.encode("37+45=").unwrap(), vec![8, 12, 67, 9, 10, 71]);
        assert_eq!(tok.encode("az\n").unwrap(), vec![15, 40, 3]);
        assert_eq!(tok.decode(&[1, 8, 12, 2, 0]).unwrap(), "37");
    }

    #[test]
    fn char_unknown_is_an_error_naming_it() {
        let err = CharTokenizer.encode("ab€").unwrap_err().to_string();
        assert!(err.contains("'€'"), "{err}");
        assert!(CharTokenizer.decode(&[999]).is_err());
    }

    #[test]
    fn hf_tokenizer_json_loads_and_choice_follows_the_dir() {
        let dir = tempfile::tempdir().unwrap();
        let json = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
            "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,
            "decoder":null,"model":{"type":"WordLevel","vocab":{"hello":0,"world":1,"[UNK]":2},
            "unk_token":"[UNK]"}}"#;
        std::fs::write(dir.path().join("config.json"), r#"{"eos_token_id": 2}"#).unwrap();
        // No tokenizer.json and no marker: an error naming the directory.
        let err = load_tokenizer(dir.path()).err().unwrap().to_string();
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
        std::fs::write(dir.path().join("tokenizer.json"), json).unwrap();
        let tok = load_tokenizer(dir.path()).unwrap();
        assert_eq!(tok.encode("hello world hi").unwrap(), vec![0, 1, 2]);
        assert_eq!(tok.decode(&[1, 0]).unwrap(), "world hello");
        assert_eq!((tok.bos_id(), tok.eos_id()), (None, Some(2)));

        let cfg = serde_json::json!({ "evomerge_tokenizer": "char" });
        let tok = tokenizer_for_config(&cfg, None).unwrap();
        assert_eq!(tok.eos_id(), Some(CharTokenizer::EOS));
    }
}
