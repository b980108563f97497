//! Tokenizers: the toy world's fixed char-level vocabulary, and Hugging Face `tokenizer.json`.
//!
//! [`load_tokenizer`] picks one for a model directory by what the directory ships:
//!
//! 1. a `tokenizer.json` → [`HfTokenizer`] (see below for its special tokens and chat template);
//! 2. otherwise config.json's `"evomerge_tokenizer": "char"` marker → [`CharTokenizer`] (the toy
//!    models under `assets/toy/` ship this; a merge copies the base model's config.json, so the
//!    marker travels with in-memory candidates too — see [`tokenizer_for_config`]);
//! 3. otherwise an error naming the directory.
//!
//! # Special tokens of a Hugging Face tokenizer
//!
//! [`TextTokenizer::encode`] adds nothing; special tokens written in the text (`<|im_start|>`)
//! become their ids, as in `transformers`. What the evaluator puts around a text follows the
//! model's own tokenizer, never a convention of ours:
//!
//! - **BOS** ([`TextTokenizer::bos_id`]): the token the tokenizer prepends when it adds special
//!   tokens (`add_special_tokens=True`). `tokenizer_config.json`'s `add_bos_token` decides when
//!   present (`true` → its `bos_token`, `false` → none); otherwise the `tokenizer.json`
//!   post-processor is asked (Llama's `TemplateProcessing` adds `<s>`; SmolLM2's and Qwen2's
//!   `ByteLevel` add nothing). config.json's `bos_token_id` alone never adds a BOS.
//! - **EOS** ([`TextTokenizer::eos_ids`]): every id that ends generation, in this order and
//!   without repeats: `tokenizer_config.json`'s `eos_token`, `generation_config.json`'s
//!   `eos_token_id` and config.json's `eos_token_id` (each a number or a list). The first is
//!   [`TextTokenizer::eos_id`].
//! - The tokenizer.json's `truncation` and `padding` settings are dropped: an evaluator must see
//!   every token of a prompt.
//!
//! # Chat templates
//!
//! A model's chat template ([`ChatTemplate`], [`TextTokenizer::chat_template`]) is read from
//! `chat_template.jinja`, else `chat_template.json`'s `chat_template`, else
//! `tokenizer_config.json`'s `chat_template` (a string, or a list of named templates of which
//! `default` is used). [`ChatTemplate::render`] runs it with [minijinja] the way `transformers`
//! runs Jinja2: `trim_blocks` and `lstrip_blocks`, the variables `messages`,
//! `add_generation_prompt`, `bos_token`, `eos_token` (and `unk_token` / `pad_token` when set),
//! the functions `raise_exception(msg)` and `strftime_now(fmt)`, and Python string / dict methods
//! (`.strip()`, `.startswith()`, `.split()`, `.items()`, … via `minijinja-contrib`'s `pycompat`).
//! `strftime_now` formats a fixed date, 26 July 2024 (the date Llama 3's template falls back
//! to), so a rendered prompt — and a score — does not change from day to day.
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
//! error that names it; decoding skips `<pad>`, `<bos>` and `<eos>`. Every sequence starts with
//! `<bos>` (the toy models are trained that way); there is no chat template.

use std::path::Path;

use crate::error::{Error, Result};

/// Text ↔ token ids.
pub trait TextTokenizer: Send + Sync {
    /// The ids of `text`, adding no special tokens (special tokens written in the text map to
    /// their ids).
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
    /// The text of `ids`, skipping special tokens.
    fn decode(&self, ids: &[u32]) -> Result<String>;
    /// The id the tokenizer puts before a text when it adds special tokens (a BOS), if any.
    fn bos_id(&self) -> Option<u32>;
    /// The main end-of-sequence id, if any (the first of [`TextTokenizer::eos_ids`]).
    fn eos_id(&self) -> Option<u32>;
    /// Every id that ends generation; the default is [`TextTokenizer::eos_id`] alone.
    fn eos_ids(&self) -> Vec<u32> {
        self.eos_id().into_iter().collect()
    }
    /// The model's chat template, if it ships one.
    fn chat_template(&self) -> Option<&ChatTemplate> {
        None
    }
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

/// A Hugging Face `tokenizer.json`, via the `tokenizers` crate, with the special tokens and chat
/// template of its model directory (see the module docs).
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Vec<u32>,
    chat: Option<ChatTemplate>,
}

impl HfTokenizer {
    /// Load `path` (a tokenizer.json) with the given bos / eos ids and no chat template.
    pub fn from_file(path: &Path, bos: Option<u32>, eos: Option<u32>) -> Result<Self> {
        Ok(HfTokenizer {
            inner: read_tokenizer_json(path)?,
            bos,
            eos: eos.into_iter().collect(),
            chat: None,
        })
    }

    /// Load the tokenizer of the model directory `dir` whose config.json is `config`:
    /// `tokenizer.json`, plus `tokenizer_config.json`, `generation_config.json` and the chat
    /// template files when present (see the module docs).
    pub fn from_dir(dir: &Path, config: &serde_json::Value) -> Result<Self> {
        let inner = read_tokenizer_json(&dir.join("tokenizer.json"))?;
        let tc_path = dir.join("tokenizer_config.json");
        let tc = read_json_if_present(&tc_path)?.unwrap_or(serde_json::Value::Null);
        let gen_config = read_json_if_present(&dir.join("generation_config.json"))?
            .unwrap_or(serde_json::Value::Null);
        let special = |key: &str| tc.get(key).and_then(token_content);
        // A special token named in tokenizer_config.json but missing from the vocabulary is
        // ignored (for BOS, config.json's `bos_token_id` is the fallback).
        let id_of = |key: &str| special(key).and_then(|content| inner.token_to_id(&content));

        let bos = match tc.get("add_bos_token").and_then(|v| v.as_bool()) {
            Some(false) => None,
            Some(true) => match id_of("bos_token")
                .or_else(|| token_ids(config, "bos_token_id").first().copied())
            {
                Some(id) => Some(id),
                None => {
                    return Err(Error::Config {
                        path: tc_path,
                        msg: "`add_bos_token` is true but there is no `bos_token`".into(),
                    });
                }
            },
            None => {
                let prefix = post_processor_prefix(&inner).map_err(|msg| Error::Config {
                    path: dir.join("tokenizer.json"),
                    msg,
                })?;
                match prefix.as_slice() {
                    [] => None,
                    [id] => Some(*id),
                    more => {
                        return Err(Error::Config {
                            path: dir.join("tokenizer.json"),
                            msg: format!(
                                "the post-processor adds {} tokens ({more:?}) before a text; \
                                 only a single BOS is supported",
                                more.len()
                            ),
                        });
                    }
                }
            }
        };

        let mut eos = Vec::new();
        for id in id_of("eos_token")
            .into_iter()
            .chain(token_ids(&gen_config, "eos_token_id"))
            .chain(token_ids(config, "eos_token_id"))
        {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }

        let chat = chat_template_source(dir, &tc)?.map(|source| {
            let mut t = ChatTemplate::new(source);
            for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
                if let Some(content) = special(key) {
                    t = t.with_variable(key, content);
                }
            }
            t
        });
        Ok(HfTokenizer {
            inner,
            bos,
            eos,
            chat,
        })
    }
}

/// A tokenizer.json without its truncation and padding settings (an evaluator must see every
/// token).
fn read_tokenizer_json(path: &Path) -> Result<tokenizers::Tokenizer> {
    let mut inner = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        msg: format!("cannot load tokenizer: {e}"),
    })?;
    inner
        .with_truncation(None)
        .map_err(|e| Error::Config {
            path: path.to_path_buf(),
            msg: format!("cannot disable truncation: {e}"),
        })?
        .with_padding(None);
    Ok(inner)
}

/// The ids the tokenizer's post-processor puts before a single text when it adds special
/// tokens (empty without a post-processor). Tokens it appends are not wanted after a context
/// and are ignored.
fn post_processor_prefix(inner: &tokenizers::Tokenizer) -> std::result::Result<Vec<u32>, String> {
    if inner.get_post_processor().is_none() {
        return Ok(Vec::new());
    }
    let probe =
        tokenizers::Encoding::from_tokens(vec![tokenizers::Token::new(0, "x".into(), (0, 1))], 0);
    let out = inner
        .post_process(probe, None, true)
        .map_err(|e| format!("cannot run the post-processor: {e}"))?;
    let seq = out.get_sequence_ids();
    Ok(out
        .get_ids()
        .iter()
        .zip(&seq)
        .take_while(|(_, s)| s.is_none())
        .map(|(&id, _)| id)
        .collect())
}

/// A JSON file's value, or `None` when the file does not exist.
fn read_json_if_present(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::Config {
            path: path.to_path_buf(),
            msg: format!("invalid JSON: {e}"),
        })
}

/// A special token of tokenizer_config.json: a string, or an `AddedToken` object's `content`.
fn token_content(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// The chat template of a model directory (see the module docs for the order).
fn chat_template_source(
    dir: &Path,
    tokenizer_config: &serde_json::Value,
) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return std::fs::read_to_string(&jinja)
            .map(Some)
            .map_err(|e| Error::io(&jinja, e));
    }
    let json_path = dir.join("chat_template.json");
    let (value, path) = match read_json_if_present(&json_path)? {
        Some(v) => (v.get("chat_template").cloned(), json_path),
        None => (
            tokenizer_config.get("chat_template").cloned(),
            dir.join("tokenizer_config.json"),
        ),
    };
    match value {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s)),
        Some(serde_json::Value::Array(list)) => {
            let named = |want: Option<&str>| {
                list.iter().find_map(|t| {
                    let name = t.get("name")?.as_str()?;
                    (want.is_none_or(|w| w == name))
                        .then(|| t.get("template")?.as_str().map(str::to_string))
                        .flatten()
                })
            };
            match named(Some("default")).or_else(|| named(None)) {
                Some(t) => Ok(Some(t)),
                None => Err(Error::Config {
                    path,
                    msg: "`chat_template` is a list without a usable `template`".into(),
                }),
            }
        }
        Some(other) => Err(Error::Config {
            path,
            msg: format!("`chat_template` must be a string or a list, got {other}"),
        }),
    }
}

impl TextTokenizer for HfTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| {
            let shown: String = text.chars().take(80).collect();
            Error::msg(format!("tokenizer: cannot encode {shown:?}: {e}"))
        })?;
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
        self.eos.first().copied()
    }

    fn eos_ids(&self) -> Vec<u32> {
        self.eos.clone()
    }

    fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat.as_ref()
    }
}

/// One turn of a conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChatMessage<'a> {
    /// `system`, `user` or `assistant`.
    pub role: &'a str,
    pub content: &'a str,
}

impl<'a> ChatMessage<'a> {
    pub fn user(content: &'a str) -> Self {
        ChatMessage {
            role: "user",
            content,
        }
    }

    pub fn assistant(content: &'a str) -> Self {
        ChatMessage {
            role: "assistant",
            content,
        }
    }
}

/// A model's Jinja chat template and the special-token variables it sees (see the module docs
/// for what a template can use).
#[derive(Clone, Debug, PartialEq)]
pub struct ChatTemplate {
    source: String,
    variables: Vec<(String, String)>,
}

/// The date `strftime_now` formats: Friday 26 July 2024, 00:00:00.
const FIXED_DATE: (i32, u32, u32) = (2024, 7, 26);

impl ChatTemplate {
    /// A template with no variables besides `messages` and `add_generation_prompt`.
    pub fn new(source: impl Into<String>) -> Self {
        ChatTemplate {
            source: source.into(),
            variables: Vec::new(),
        }
    }

    /// The same template with the string variable `name` (e.g. `bos_token`) set.
    pub fn with_variable(mut self, name: &str, value: impl Into<String>) -> Self {
        self.variables.retain(|(n, _)| n != name);
        self.variables.push((name.to_string(), value.into()));
        self
    }

    /// The template's source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Render `messages`; with `add_generation_prompt` the text ends where the assistant's
    /// answer begins. Errors carry the template's message (`raise_exception`) or the syntax
    /// error.
    pub fn render(
        &self,
        messages: &[ChatMessage<'_>],
        add_generation_prompt: bool,
    ) -> Result<String> {
        use minijinja::value::Value;
        let mut env = minijinja::Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| Error::msg(format!("chat template: {e}")))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_function("strftime_now", |fmt: String| strftime_fixed(&fmt));
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from(std::collections::BTreeMap::from([
                    ("role".to_string(), Value::from(m.role)),
                    ("content".to_string(), Value::from(m.content)),
                ]))
            })
            .collect();
        let mut ctx: std::collections::BTreeMap<String, Value> = self
            .variables
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        ctx.insert("messages".into(), Value::from(messages));
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        env.render_str(&self.source, Value::from(ctx))
            .map_err(|e| Error::msg(format!("chat template: {e:#}")))
    }
}

/// `strftime` of [`FIXED_DATE`] for the common directives; others are kept as written.
fn strftime_fixed(fmt: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let (year, month, day) = FIXED_DATE;
    let month_name = MONTHS[month as usize - 1];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut d = chars.next();
        let unpadded = d == Some('-');
        if unpadded {
            d = chars.next();
        }
        let num = |n: u32| {
            if unpadded {
                n.to_string()
            } else {
                format!("{n:02}")
            }
        };
        match d {
            Some('d') => out.push_str(&num(day)),
            Some('m') => out.push_str(&num(month)),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('B') => out.push_str(month_name),
            Some('b') | Some('h') => out.push_str(&month_name[..3]),
            Some('A') => out.push_str("Friday"),
            Some('a') => out.push_str("Fri"),
            Some('H') | Some('M') | Some('S') => out.push_str(&num(0)),
            Some('j') => out.push_str("208"),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if unpadded {
                    out.push('-');
                }
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// The ids under `key` of a config (a number or a list of numbers; none when absent).
fn token_ids(config: &serde_json::Value, key: &str) -> Vec<u32> {
    let one = |v: &serde_json::Value| v.as_u64().and_then(|x| u32::try_from(x).ok());
    match config.get(key) {
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(one).collect(),
        Some(v) => one(v).into_iter().collect(),
        None => Vec::new(),
    }
}

/// The tokenizer for a model given its config.json and, if it lives on disk, its directory
/// (see the module docs for the order of the checks).
pub fn tokenizer_for_config(
    config: &serde_json::Value,
    dir: Option<&Path>,
) -> Result<Box<dyn TextTokenizer>> {
    if let Some(dir) = dir
        && dir.join("tokenizer.json").is_file()
    {
        return Ok(Box::new(HfTokenizer::from_dir(dir, config)?));
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

/// The tokenizer for the model directory `dir` (reads its config.json, and its
/// tokenizer_config.json, generation_config.json and chat template when present).
pub fn load_tokenizer(dir: &Path) -> Result<Box<dyn TextTokenizer>> {
    // `BASE+ADAPTER`: the tokenizer is the base's.
    let dir = &crate::store::lora::base_dir_of(dir);
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

#[cfg(test)]
mod chat_tests {
    use super::*;

    /// SmolLM2-Instruct's template (tokenizer_config.json), verbatim.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_a_chatml_template() {
        let t = ChatTemplate::new(SMOLLM2);
        let out = t
            .render(
                &[
                    ChatMessage::user("1+1="),
                    ChatMessage::assistant("2"),
                    ChatMessage::user("2+2="),
                ],
                true,
            )
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
             Face<|im_end|>\n<|im_start|>user\n1+1=<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n\
             <|im_start|>user\n2+2=<|im_end|>\n<|im_start|>assistant\n"
        );
        let no_prompt = t.render(&[ChatMessage::user("x")], false).unwrap();
        assert!(no_prompt.ends_with("x<|im_end|>\n"), "{no_prompt:?}");
    }

    /// The Jinja features Hugging Face templates lean on: trim_blocks / lstrip_blocks,
    /// bos_token, namespace, loop controls, Python string methods, raise_exception,
    /// strftime_now, tojson.
    #[test]
    fn hf_template_features() {
        let src = "{{ bos_token }}
{%- set ns = namespace(n=0) %}
{% for m in messages %}
    {% if m.role not in ['user', 'assistant'] %}
        {{ raise_exception('Unknown role: ' + m.role) }}
    {% endif %}
    {% if m.content.startswith('skip') %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
[{{ m.role.upper() }}] {{ m.content.strip() | tojson }}
{% endfor %}
n={{ ns.n }} date={{ strftime_now('%d %b %Y') }} eos={{ eos_token }}";
        let t = ChatTemplate::new(src)
            .with_variable("bos_token", "<s>")
            .with_variable("eos_token", "</s>");
        let out = t
            .render(
                &[
                    ChatMessage::user("  hi  "),
                    ChatMessage::assistant("skip me"),
                    ChatMessage::assistant("ok"),
                ],
                true,
            )
            .unwrap();
        assert_eq!(
            out,
            "<s>[USER] \"hi\"\n[ASSISTANT] \"ok\"\nn=2 date=26 Jul 2024 eos=</s>"
        );
        let err = t
            .render(
                &[ChatMessage {
                    role: "tool",
                    content: "x",
                }],
                true,
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("Unknown role: tool"), "{err}");
        let err = ChatTemplate::new("{% for %}")
            .render(&[], true)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("chat template:"), "{err}");
    }

    #[test]
    fn strftime_of_the_fixed_date() {
        assert_eq!(
            strftime_fixed("%Y-%m-%d %-d %B %A %a %H:%M %% %q"),
            "2024-07-26 26 July Friday Fri 00:00 % %q"
        );
    }
}
