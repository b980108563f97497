//! Merge recipes in mergekit's YAML: `models` or `slices`, `base_model`, `merge_method`,
//! `parameters` (scalars, gradients, `{filter, value}` lists) at global / slice / source level,
//! `dtype`, `out_dtype`, `tokenizer_source`, `chat_template`. Read with line-numbered errors for
//! unknown keys, written back in the same form so mergekit can run it too.
//!
//! ```
//! use evomerge::recipe::Recipe;
//! let r = Recipe::from_str(
//!     "models:\n  - model: a\n    parameters: {weight: 0.5}\n  - model: b\n    parameters: {weight: 0.5}\n\
//!      merge_method: linear\ndtype: bfloat16\n",
//!     None,
//! )?;
//! assert_eq!(Recipe::from_str(&r.to_yaml(), None)?, r);
//! # Ok::<(), evomerge::Error>(())
//! ```
//!
//! **Model paths.** A relative model path is resolved against the directory of the recipe file
//! (when the recipe has one: [`Recipe::from_path`], or `from_str` with `Some(path)`), otherwise
//! against the working directory. [`ModelRef`] keeps the string as written, which is what
//! [`Recipe::to_yaml`] writes back; [`ModelRef::path`] is the resolved path the planner opens.
//! mergekit's `BASE+ADAPTER` (a PEFT LoRA adapter folded into its base as it is read; see
//! [`crate::store::lora`]) resolves both sides against the recipe's directory. Hugging Face hub
//! ids (`owner/name`, when no such path exists) are never downloaded: they are read from the
//! local Hugging Face cache ([`crate::store::hub`]), and one that is not cached is an error
//! saying so; every other model is a local directory (or a model registered in a
//! [`crate::store::ModelSet`] under that path).
//!
//! **Validation** against a method's declared parameters is [`Recipe::validate`]; per-tensor
//! parameter resolution (precedence, gradients, filters) is in [`params`]; the merge planner
//! that uses both is [`crate::merge::plan`].
//!
//! **Not supported** (each is a clear error naming its line): `modules`, `tokenizer` (the
//! vocabulary-merging block), `tokenizer_source: union`, a slice's `residual_weight` (which
//! mergekit 0.1.5 reads but never uses), and model references written as maps.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use crate::error::{Error, Result};
use crate::tensor::DType;

pub mod params;
pub mod validate;
mod write;

pub use params::{Conditional, ParamMap, ParamSetting, Value};

/// A model as the recipe names it: the string as written, and the path it resolves to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelRef {
    /// As written in the recipe (written back unchanged).
    pub name: String,
    /// Resolved against the recipe file's directory when relative.
    pub path: PathBuf,
}

impl ModelRef {
    /// A reference resolved against `base_dir` (when given and `name` is relative; both sides of
    /// `BASE+ADAPTER` are resolved).
    pub fn new(name: impl Into<String>, base_dir: Option<&Path>) -> Self {
        let name = name.into();
        let path = crate::store::lora::resolve_ref(Path::new(&name), base_dir);
        ModelRef { name, path }
    }
}

impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// One entry of `models:`: a whole model with its parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct InputModel {
    pub model: ModelRef,
    pub parameters: ParamMap,
}

/// One source of an output slice: layers `layer_range.0 .. layer_range.1` of a model.
#[derive(Clone, Debug, PartialEq)]
pub struct SliceSource {
    pub model: ModelRef,
    /// Half-open `[start, end)` layer range, as mergekit's `layer_range: [a, b]`.
    pub layer_range: (usize, usize),
    pub parameters: ParamMap,
}

/// One output slice: its sources are merged layer by layer into consecutive output layers.
#[derive(Clone, Debug, PartialEq)]
pub struct OutputSlice {
    pub sources: Vec<SliceSource>,
    /// Overrides the recipe's `base_model` for this slice.
    pub base_model: Option<ModelRef>,
    pub parameters: ParamMap,
}

/// What the recipe merges: whole models, or slices of layers.
#[derive(Clone, Debug, PartialEq)]
pub enum Inputs {
    Models(Vec<InputModel>),
    Slices(Vec<OutputSlice>),
}

/// Where the output's tokenizer comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum TokenizerSource {
    /// The base model's tokenizer.
    Base,
    /// A named model's tokenizer.
    Model(ModelRef),
}

/// A parsed merge recipe (mergekit `MergeConfiguration`).
#[derive(Clone, Debug, PartialEq)]
pub struct Recipe {
    /// Registry key of the merge method (`linear`, `ties`, ...).
    pub merge_method: String,
    pub base_model: Option<ModelRef>,
    pub inputs: Inputs,
    /// Global parameters (the lowest precedence level).
    pub parameters: ParamMap,
    /// Math dtype (mergekit's `dtype`); also the output dtype when `out_dtype` is unset.
    pub dtype: Option<DType>,
    /// Saved dtype.
    pub out_dtype: Option<DType>,
    pub tokenizer_source: Option<TokenizerSource>,
    /// A chat template (a name, `auto`, or a Jinja template), carried through unchanged.
    pub chat_template: Option<String>,
    /// The file the recipe was read from, for messages and relative model paths.
    pub path: Option<PathBuf>,
}

impl Recipe {
    /// A recipe merging whole `models` with `method`, no parameters set.
    pub fn new(method: impl Into<String>, inputs: Inputs) -> Self {
        Recipe {
            merge_method: method.into(),
            base_model: None,
            inputs,
            parameters: ParamMap::new(),
            dtype: None,
            out_dtype: None,
            tokenizer_source: None,
            chat_template: None,
            path: None,
        }
    }

    /// Read a recipe file. Relative model paths resolve against the file's directory.
    pub fn from_path(path: impl AsRef<Path>) -> Result<Recipe> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Recipe::from_str(&text, Some(path))
    }

    /// Parse recipe YAML. `path` (the file it came from, if any) is used in error messages and
    /// to resolve relative model paths. Unknown keys and YAML syntax errors give the line.
    #[allow(clippy::should_implement_trait)]
    pub fn from_str(text: &str, path: Option<&Path>) -> Result<Recipe> {
        if let Some(line) = nesting_too_deep(text) {
            return Err(Error::Recipe {
                path: path.map(Path::to_path_buf),
                line: Some(line),
                msg: format!(
                    "YAML nested more than {MAX_YAML_DEPTH} levels deep (block indentation and \
                     flow brackets together); a recipe needs a handful"
                ),
            });
        }
        let raw: RawRecipe = yaml_serde::from_str(text).map_err(|e| yaml_error(e, path))?;
        let base_dir = path.map(|p| match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        });
        raw.into_recipe(path, base_dir.as_deref())
    }

    /// The recipe as YAML that mergekit (PyYAML) and evomerge read alike: model paths as written,
    /// numbers in shortest round-tripping form with a decimal point and signed exponent
    /// (`1.0e-7`, which YAML 1.1 reads as a float), gradients as flow lists, strings quoted only
    /// when needed. `from_str(&r.to_yaml(), r.path)` gives `r` back.
    pub fn to_yaml(&self) -> String {
        write::to_yaml(self)
    }

    /// An [`Error::Recipe`] about this recipe (no line).
    pub fn error(&self, msg: impl Into<String>) -> Error {
        Error::Recipe {
            path: self.path.clone(),
            line: None,
            msg: msg.into(),
        }
    }

    /// Every model the recipe names (base first when set, then in order of appearance), once.
    pub fn referenced_models(&self) -> Vec<&ModelRef> {
        let mut tmp: Vec<&ModelRef> = Vec::new();
        if let Some(b) = &self.base_model {
            tmp.push(b);
        }
        match &self.inputs {
            Inputs::Models(ms) => tmp.extend(ms.iter().map(|m| &m.model)),
            Inputs::Slices(ss) => {
                for s in ss {
                    if let Some(b) = &s.base_model {
                        tmp.push(b);
                    }
                    tmp.extend(s.sources.iter().map(|x| &x.model));
                }
            }
        }
        if let Some(TokenizerSource::Model(m)) = &self.tokenizer_source {
            tmp.push(m);
        }
        let mut out: Vec<&ModelRef> = Vec::with_capacity(tmp.len());
        for m in tmp {
            if !out.iter().any(|o| o.path == m.path) {
                out.push(m);
            }
        }
        out
    }

    /// The recipe with every model named relative to `dir` (where it is about to be written),
    /// so that a directory moved together with its inputs still merges: each side of
    /// `BASE+ADAPTER` is made relative, a model in the Hugging Face cache is named by its hub id
    /// ([`crate::store::hub::hub_id_of`]), and a name that is not an absolute path stays as
    /// written. The resolved paths are kept, so the recipe still merges from here.
    pub fn relative_to(&self, dir: &Path) -> Recipe {
        let mut r = self.clone();
        let fix = |m: &mut ModelRef| m.name = relative_ref(&m.path, &m.name, dir);
        if let Some(b) = r.base_model.as_mut() {
            fix(b);
        }
        match &mut r.inputs {
            Inputs::Models(ms) => ms.iter_mut().for_each(|m| fix(&mut m.model)),
            Inputs::Slices(ss) => {
                for s in ss {
                    if let Some(b) = s.base_model.as_mut() {
                        fix(b);
                    }
                    s.sources.iter_mut().for_each(|x| fix(&mut x.model));
                }
            }
        }
        if let Some(TokenizerSource::Model(m)) = r.tokenizer_source.as_mut() {
            fix(m);
        }
        r
    }
}

/// A resolved model reference (`path`, written `name`) as a file in `dir` should name it: see
/// [`Recipe::relative_to`].
pub fn relative_ref(path: &Path, name: &str, dir: &Path) -> String {
    let one = |p: &Path| -> Option<String> {
        if let Some(id) = crate::store::hub::hub_id_of(p) {
            return Some(id);
        }
        if p.is_relative() {
            return None;
        }
        Some(relative_path(p, dir).to_string_lossy().into_owned())
    };
    match crate::store::lora::parse_ref(path) {
        Ok(crate::store::lora::ModelRefKind::Plain(p)) => one(&p),
        Ok(crate::store::lora::ModelRefKind::Lora { base, adapter }) => one(&base)
            .zip(one(&adapter))
            .map(|(b, a)| format!("{b}+{a}")),
        Err(_) => None,
    }
    .unwrap_or_else(|| name.to_string())
}

/// `path` relative to the directory `dir` (both made absolute and canonical where they exist):
/// `../../assets/toy/add`. `path` itself when they share no root.
pub fn relative_path(path: &Path, dir: &Path) -> PathBuf {
    use std::path::Component;
    let abs = |p: &Path| {
        std::fs::canonicalize(p)
            .unwrap_or_else(|_| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()))
    };
    let (path, dir) = (abs(path), abs(dir));
    let (pc, dc): (Vec<Component>, Vec<Component>) =
        (path.components().collect(), dir.components().collect());
    if pc.first() != dc.first() {
        return path;
    }
    let common = pc.iter().zip(&dc).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..dc.len() {
        out.push("..");
    }
    for c in &pc[common..] {
        out.push(c.as_os_str());
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

/// The deepest nesting a recipe may have: block levels (indentation, and each compact `- ` on
/// a line) plus open flow brackets (`[`, `{`). Recipes need about a dozen; the limit refuses
/// hostile input (100k nested `[`) at once, before the YAML parser spends seconds on it.
pub const MAX_YAML_DEPTH: usize = 64;

/// The 1-based line where `text` first nests deeper than [`MAX_YAML_DEPTH`], if it does. A
/// linear scan that knows just enough YAML not to count brackets inside quoted scalars, block
/// scalars (`|`, `>`: e.g. a Jinja `chat_template`), comments, or plain scalars (`a[0]`).
fn nesting_too_deep(text: &str) -> Option<usize> {
    let mut flow = 0usize;
    // Columns of the open block levels.
    let mut block: Vec<usize> = Vec::new();
    // An open quoted scalar (it may span lines).
    let mut quote: Option<u8> = None;
    // Inside a block scalar: lines indented more than this column are its content.
    let mut block_scalar: Option<usize> = None;
    for (n, line) in text.lines().enumerate() {
        let bytes = line.as_bytes();
        let indent = bytes.iter().take_while(|&&b| b == b' ').count();
        let blank = bytes[indent..].iter().all(u8::is_ascii_whitespace);
        if let Some(parent) = block_scalar {
            if blank || indent > parent {
                continue;
            }
            block_scalar = None;
        }
        if blank {
            continue;
        }
        let mut i = indent;
        let in_block = quote.is_none() && flow == 0;
        let mut levels_here = 0;
        if in_block {
            if bytes[i] == b'#' {
                continue;
            }
            while block.last().is_some_and(|&c| c >= indent) {
                block.pop();
            }
            loop {
                block.push(i);
                levels_here += 1;
                let indicator = matches!(bytes[i], b'-' | b'?')
                    && bytes.get(i + 1).is_none_or(|b| b.is_ascii_whitespace());
                if !indicator {
                    break;
                }
                i += 1;
                while i < bytes.len() && bytes[i].is_ascii_whitespace() {
                    i += 1;
                }
                if i >= bytes.len() {
                    break;
                }
            }
            if block.len() > MAX_YAML_DEPTH {
                return Some(n + 1);
            }
        }
        let mut prev: Option<u8> = None;
        let mut last_token = i;
        while i < bytes.len() {
            let b = bytes[i];
            let token_start = match prev {
                None => true,
                Some(p) => p.is_ascii_whitespace() || (flow > 0 && matches!(p, b'[' | b'{' | b',')),
            };
            match quote {
                Some(b'\'') => {
                    if b == b'\'' {
                        if bytes.get(i + 1) == Some(&b'\'') {
                            i += 1;
                        } else {
                            quote = None;
                        }
                    }
                }
                Some(_) => {
                    if b == b'\\' {
                        i += 1;
                    } else if b == b'"' {
                        quote = None;
                    }
                }
                None => {
                    if token_start && !b.is_ascii_whitespace() {
                        last_token = i;
                    }
                    match b {
                        b'#' if prev.is_none_or(|p| p.is_ascii_whitespace()) => break,
                        b'\'' | b'"' if token_start => quote = Some(b),
                        b'[' | b'{' if token_start => {
                            flow += 1;
                            if block.len() + flow > MAX_YAML_DEPTH {
                                return Some(n + 1);
                            }
                        }
                        b']' | b'}' if flow > 0 => flow -= 1,
                        _ => {}
                    }
                }
            }
            prev = bytes.get(i).copied();
            i += 1;
        }
        // A block scalar header (`|`, `>-`, `|2+` ...) ends the line: its content follows,
        // indented more than the node that holds it.
        if in_block && quote.is_none() && flow == 0 {
            let token = line[last_token..]
                .split('#')
                .next()
                .unwrap_or("")
                .trim_end();
            let header = token.starts_with(['|', '>'])
                && token[1..]
                    .bytes()
                    .all(|c| c.is_ascii_digit() || c == b'+' || c == b'-');
            if header {
                let top = block.len() - 1;
                let parent = if block[top] == last_token && levels_here > 1 {
                    block[top - 1]
                } else {
                    block[top]
                };
                block_scalar = Some(parent);
            }
        }
    }
    None
}

/// Turn a yaml_serde error into [`Error::Recipe`] with the line, without repeating it in the text.
fn yaml_error(e: yaml_serde::Error, path: Option<&Path>) -> Error {
    let loc = e.location();
    let mut msg = e.to_string();
    if let Some(l) = &loc {
        let suffix = format!(" at line {} column {}", l.line(), l.column());
        if let Some(stripped) = msg.strip_suffix(&suffix) {
            msg = format!("{stripped} (column {})", l.column());
        }
    }
    Error::Recipe {
        path: path.map(Path::to_path_buf),
        line: loc.map(|l| l.line()),
        msg,
    }
}

// ---------------------------------------------------------------------------------------------
// The YAML as written. Serde structs with `deny_unknown_fields`, so unknown keys are errors that
// yaml_serde locates (key path + line).

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecipe {
    #[serde(default)]
    models: Option<Vec<RawModel>>,
    #[serde(default)]
    slices: Option<Vec<RawSlice>>,
    merge_method: String,
    #[serde(default)]
    base_model: Option<ModelName>,
    #[serde(default)]
    parameters: Option<RawParams>,
    #[serde(default)]
    dtype: Option<RawDType>,
    #[serde(default)]
    out_dtype: Option<RawDType>,
    #[serde(default)]
    tokenizer_source: Option<RawTokenizerSource>,
    #[serde(default)]
    chat_template: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    modules: Option<Unsupported>,
    #[serde(default)]
    #[allow(dead_code)]
    tokenizer: Option<Unsupported>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    model: ModelName,
    #[serde(default)]
    parameters: Option<RawParams>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    model: ModelName,
    layer_range: (usize, usize),
    #[serde(default)]
    parameters: Option<RawParams>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSlice {
    sources: Vec<RawSource>,
    #[serde(default)]
    base_model: Option<ModelName>,
    #[serde(default)]
    parameters: Option<RawParams>,
    #[serde(default)]
    #[allow(dead_code)]
    residual_weight: Option<Unsupported>,
}

/// A `parameters:` map; a name given twice is an error (YAML would keep the last silently).
#[derive(Default)]
struct RawParams(ParamMap);

impl<'de> Deserialize<'de> for RawParams {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// Reads one key, failing on a duplicate while the key is read (so the error gets its line).
        struct Key<'a>(&'a ParamMap);
        impl<'de> de::DeserializeSeed<'de> for Key<'_> {
            type Value = String;
            fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
                d.deserialize_str(self)
            }
        }
        impl Visitor<'_> for Key<'_> {
            type Value = String;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a parameter name")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
                if self.0.contains_key(v) {
                    return Err(E::custom(format!("parameter `{v}` is given twice")));
                }
                Ok(v.to_string())
            }
        }
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawParams;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of parameter names to values")
            }
            fn visit_unit<E: de::Error>(self) -> Result<RawParams, E> {
                Ok(RawParams::default())
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<RawParams, A::Error> {
                let mut out = ParamMap::new();
                while let Some(k) = map.next_key_seed(Key(&out))? {
                    let v = map.next_value::<ParamSetting>()?;
                    out.insert(k, v);
                }
                Ok(RawParams(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// A model reference: a path string. Maps (`{model: ..., lora: ...}`) are refused.
struct ModelName(String);

impl<'de> Deserialize<'de> for ModelName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ModelName;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a model directory path")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ModelName, E> {
                if v.is_empty() {
                    return Err(E::custom("a model path must not be empty"));
                }
                Ok(ModelName(v.to_string()))
            }
        }
        d.deserialize_str(V)
    }
}

struct RawDType(DType);

impl<'de> Deserialize<'de> for RawDType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RawDType;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a dtype (bfloat16, float16 or float32)")
            }
            // The error is raised while the value is being read, so it carries the value's line.
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawDType, E> {
                v.parse::<DType>().map(RawDType).map_err(|_| {
                    E::custom(format!(
                        "unknown dtype `{v}` (expected bfloat16, float16 or float32)"
                    ))
                })
            }
        }
        d.deserialize_str(V)
    }
}

enum RawTokenizerSource {
    Base,
    Model(String),
}

impl<'de> Deserialize<'de> for RawTokenizerSource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RawTokenizerSource;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`base` or a model path")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawTokenizerSource, E> {
                match v {
                    "base" => Ok(RawTokenizerSource::Base),
                    "union" => Err(E::custom(
                        "`tokenizer_source: union` is not supported (use `base` or a model path)",
                    )),
                    "" => Err(E::custom("a model path must not be empty")),
                    _ => Ok(RawTokenizerSource::Model(v.to_string())),
                }
            }
        }
        d.deserialize_str(V)
    }
}

/// A key mergekit knows that evomerge refuses; its value is never kept.
struct Unsupported;

impl<'de> Deserialize<'de> for Unsupported {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        const MSG: &str = "this key is not supported by evomerge";
        impl<'de> Visitor<'de> for V {
            type Value = Unsupported;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(MSG)
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Unsupported, E> {
                Err(E::custom(MSG))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Unsupported, E> {
                Err(E::custom(MSG))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Unsupported, E> {
                Err(E::custom(MSG))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Unsupported, E> {
                Err(E::custom(MSG))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Unsupported, E> {
                Err(E::custom(MSG))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Unsupported, E> {
                Err(E::custom(MSG))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<Unsupported, A::Error> {
                Err(de::Error::custom(MSG))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<Unsupported, A::Error> {
                Err(de::Error::custom(MSG))
            }
        }
        d.deserialize_any(V)
    }
}

impl RawRecipe {
    fn into_recipe(self, path: Option<&Path>, base_dir: Option<&Path>) -> Result<Recipe> {
        let err = |msg: String| Error::Recipe {
            path: path.map(Path::to_path_buf),
            line: None,
            msg,
        };
        let mref = |m: ModelName| ModelRef::new(m.0, base_dir);
        let inputs = match (self.models, self.slices) {
            (Some(ms), None) if !ms.is_empty() => Inputs::Models(
                ms.into_iter()
                    .map(|m| InputModel {
                        model: mref(m.model),
                        parameters: m.parameters.unwrap_or_default().0,
                    })
                    .collect(),
            ),
            (None, Some(ss)) if !ss.is_empty() => {
                let mut out = Vec::with_capacity(ss.len());
                for (i, s) in ss.into_iter().enumerate() {
                    if s.sources.is_empty() {
                        return Err(err(format!("slices[{i}]: `sources` is empty")));
                    }
                    let mut sources = Vec::with_capacity(s.sources.len());
                    for (j, src) in s.sources.into_iter().enumerate() {
                        let (a, b) = src.layer_range;
                        if a >= b {
                            return Err(err(format!(
                                "slices[{i}].sources[{j}]: layer_range [{a}, {b}] is empty \
                                 (it is half-open: [start, end) with start < end)"
                            )));
                        }
                        sources.push(SliceSource {
                            model: mref(src.model),
                            layer_range: (a, b),
                            parameters: src.parameters.unwrap_or_default().0,
                        });
                    }
                    out.push(OutputSlice {
                        sources,
                        base_model: s.base_model.map(mref),
                        parameters: s.parameters.unwrap_or_default().0,
                    });
                }
                Inputs::Slices(out)
            }
            _ => {
                return Err(err(
                    "exactly one of `models` or `slices` must be given, and not empty".into(),
                ));
            }
        };
        if self.merge_method.is_empty() {
            return Err(err("`merge_method` is empty".into()));
        }
        Ok(Recipe {
            merge_method: self.merge_method,
            base_model: self.base_model.map(mref),
            inputs,
            parameters: self.parameters.unwrap_or_default().0,
            dtype: self.dtype.map(|d| d.0),
            out_dtype: self.out_dtype.map(|d| d.0),
            tokenizer_source: self.tokenizer_source.map(|t| match t {
                RawTokenizerSource::Base => TokenizerSource::Base,
                RawTokenizerSource::Model(m) => TokenizerSource::Model(ModelRef::new(m, base_dir)),
            }),
            chat_template: self.chat_template,
            path: path.map(Path::to_path_buf),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_err(text: &str) -> (Option<usize>, String) {
        match Recipe::from_str(text, Some(Path::new("r.yml"))) {
            Err(Error::Recipe { line, msg, .. }) => (line, msg),
            other => panic!("expected a recipe error, got {other:?}"),
        }
    }

    #[test]
    fn unknown_keys_name_key_and_line() {
        let (line, msg) = parse_err(
            "models:\n  - model: a\n    parameters:\n      weight: 0.5\n  - model: b\n    wieght: 1\nmerge_method: linear\n",
        );
        assert_eq!(line, Some(6));
        assert!(msg.contains("unknown field `wieght`"), "{msg}");
        assert!(msg.contains("models[1]"), "{msg}");

        let (line, msg) = parse_err("models:\n  - model: a\nmerge_method: linear\nbase: x\n");
        assert_eq!(line, Some(4));
        assert!(msg.contains("`base`"), "{msg}");

        let (line, msg) = parse_err(
            "slices:\n  - sources:\n      - model: a\n        layer_range: [0, 2]\n        parameters:\n          t:\n            - filter: mlp\n              valu: 1\nmerge_method: slerp\n",
        );
        assert_eq!(line, Some(8), "{msg}");
        assert!(msg.contains("`valu`"), "{msg}");
    }

    #[test]
    fn syntax_errors_give_the_line() {
        let (line, _) = parse_err("models:\n  - model: a\nmerge_method: [linear\nfoo: : :\n");
        assert!(line.is_some());
        let (line, msg) = parse_err(
            "models:\n  - model: a\n    parameters:\n      weight: abc\nmerge_method: linear\n",
        );
        assert_eq!(line, Some(4));
        assert!(msg.contains("abc"), "{msg}");
    }

    #[test]
    fn unsupported_keys_are_refused() {
        let (line, msg) =
            parse_err("models:\n  - model: a\nmerge_method: linear\ntokenizer_source: union\n");
        assert_eq!(line, Some(4));
        assert!(msg.contains("not supported"), "{msg}");
        let (line, msg) =
            parse_err("models:\n  - model: a\nmerge_method: linear\ntokenizer:\n  source: base\n");
        assert_eq!(line, Some(5), "{msg}");
        assert!(
            msg.contains("tokenizer") && msg.contains("not supported"),
            "{msg}"
        );
    }

    #[test]
    fn duplicate_parameters_are_refused() {
        let (line, msg) = parse_err(
            "models:\n  - model: a\n    parameters:\n      weight: 1\n      weight: 2\nmerge_method: linear\n",
        );
        assert_eq!(line, Some(5), "{msg}");
        assert!(msg.contains("`weight` is given twice"), "{msg}");
        // `parameters:` left empty is no parameters.
        let r = Recipe::from_str(
            "models:\n  - model: a\n    parameters:\nmerge_method: linear\n",
            None,
        )
        .unwrap();
        let Inputs::Models(ms) = &r.inputs else {
            panic!()
        };
        assert!(ms[0].parameters.is_empty());
    }

    #[test]
    fn relative_paths_resolve_against_the_recipe_dir() {
        let r = Recipe::from_str(
            "models:\n  - model: ../m/a\n  - model: /abs/b\nmerge_method: linear\n",
            Some(Path::new("/recipes/x.yml")),
        )
        .unwrap();
        let Inputs::Models(ms) = &r.inputs else {
            panic!()
        };
        assert_eq!(ms[0].model.name, "../m/a");
        assert_eq!(ms[0].model.path, Path::new("/recipes/../m/a"));
        assert_eq!(ms[1].model.path, Path::new("/abs/b"));
    }

    #[test]
    fn parameter_forms_parse() {
        let r = Recipe::from_str(
            "slices:\n  - sources:\n      - model: a\n        layer_range: [0, 4]\n      - model: b\n        layer_range: [2, 6]\n        parameters:\n          weight: {filter: mlp, value: [0, 1]}\n    parameters:\n      t:\n        - filter: self_attn\n          value: [0, 0.5, 1]\n        - value: 0.5\nmerge_method: slerp\nbase_model: a\nparameters:\n  normalize: true\n  lambda: \"1e-1\"\ndtype: bfloat16\nout_dtype: float16\nchat_template: chatml\n",
            None,
        )
        .unwrap();
        let Inputs::Slices(ss) = &r.inputs else {
            panic!()
        };
        assert_eq!(ss[0].sources[1].layer_range, (2, 6));
        assert_eq!(
            ss[0].sources[1].parameters["weight"],
            ParamSetting::filtered(vec![(Some("mlp".into()), Value::Gradient(vec![0.0, 1.0]))])
        );
        assert_eq!(
            ss[0].parameters["t"],
            ParamSetting::filtered(vec![
                (
                    Some("self_attn".into()),
                    Value::Gradient(vec![0.0, 0.5, 1.0])
                ),
                (None, Value::Number(0.5)),
            ])
        );
        assert_eq!(r.parameters["normalize"], ParamSetting::flag(true));
        assert_eq!(r.parameters["lambda"], ParamSetting::number(0.1));
        assert_eq!(r.dtype, Some(DType::BF16));
        assert_eq!(r.out_dtype, Some(DType::F16));
        assert_eq!(r.chat_template.as_deref(), Some("chatml"));
    }

    #[test]
    fn models_xor_slices() {
        let (_, msg) = parse_err("merge_method: linear\n");
        assert!(msg.contains("models") && msg.contains("slices"), "{msg}");
        let (_, msg) = parse_err(
            "models:\n  - model: a\nslices:\n  - sources:\n      - model: a\n        layer_range: [0, 1]\nmerge_method: linear\n",
        );
        assert!(msg.contains("exactly one"), "{msg}");
        let (line, msg) = parse_err(
            "slices:\n  - sources:\n      - model: a\n        layer_range: [0, 2]\n    residual_weight: 0.5\nmerge_method: passthrough\n",
        );
        assert_eq!(line, Some(5), "{msg}");
        assert!(
            msg.contains("residual_weight") && msg.contains("not supported"),
            "{msg}"
        );
        let (line, msg) = parse_err("models:\n  - model: a\nmerge_method: linear\ndtype: int8\n");
        assert_eq!(line, Some(4), "{msg}");
        assert!(msg.contains("int8"), "{msg}");
        let (_, msg) = parse_err(
            "slices:\n  - sources:\n      - model: a\n        layer_range: [2, 2]\nmerge_method: passthrough\n",
        );
        assert!(msg.contains("slices[0].sources[0]"), "{msg}");
    }

    #[test]
    fn yaml_round_trip() {
        let text = "slices:\n  - sources:\n      - model: ./a\n        layer_range: [0, 4]\n      - model: \"b c\"\n        layer_range: [2, 6]\n        parameters:\n          weight: {filter: mlp, value: [0, 1e-7]}\n    base_model: ./a\n    parameters:\n      t:\n        - filter: self_attn\n          value: [0, 0.3333333333333333, 1]\n        - value: 0.5\n  - sources:\n      - model: ./a\n        layer_range: [4, 5]\nmerge_method: slerp\nbase_model: ./a\nparameters:\n  normalize: true\n  lambda: 1.5e20\ndtype: bfloat16\nout_dtype: float32\ntokenizer_source: \"b c\"\nchat_template: \"{% for m in messages %}\\n{{ m }}{% endfor %}\"\n";
        let p = Path::new("/r/x.yml");
        let r = Recipe::from_str(text, Some(p)).unwrap();
        let y = r.to_yaml();
        let back = Recipe::from_str(&y, Some(p)).unwrap();
        assert_eq!(back, r, "{y}");
        assert!(y.contains("layer_range: [4, 5]"), "{y}");
        assert!(y.contains("value: [0.0, 1.0e-7]"), "{y}");
        let models = Recipe::from_str(
            "models:\n  - model: a\n    parameters:\n      weight: -0.5\n  - model: b\nmerge_method: linear\ntokenizer_source: base\nbase_model: a\n",
            None,
        )
        .unwrap();
        assert_eq!(Recipe::from_str(&models.to_yaml(), None).unwrap(), models);
    }

    /// Issue 13: YAML nested 100k levels deep took 26 s to refuse; deep nesting is refused by a
    /// linear scan before the text reaches the YAML parser, with the line.
    #[test]
    fn yaml_depth_limit_refuses_deep_nesting() {
        let msg = "YAML nested more than 64 levels deep (block indentation and flow brackets \
                   together); a recipe needs a handful";
        // 100k nested flow sequences on one line.
        let text = format!("merge_method: linear\nmodels: {}\n", "[".repeat(100_000));
        assert_eq!(parse_err(&text), (Some(2), msg.to_string()));
        let e = Recipe::from_str(&text, Some(Path::new("deep.yml"))).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("deep.yml:2: YAML nested more than 64"),
            "{e}"
        );
        // Flow mappings, spread over lines.
        let text = format!("models:\n{}", "{a:\n".repeat(100_000));
        assert_eq!(parse_err(&text).0, Some(65));
        // 2,000 levels of block mappings (100k would be 5 GB of indentation), and 100k compact
        // nested sequences.
        let mut text = String::new();
        for d in 0..2_000 {
            text.push_str(&format!("{}k{d}:\n", " ".repeat(d)));
        }
        assert_eq!(parse_err(&text), (Some(65), msg.to_string()));
        let text = format!("models:\n{}a\n", "- ".repeat(100_000));
        assert_eq!(parse_err(&text), (Some(2), msg.to_string()));

        // Not counted: brackets in quoted and block scalars, comments, plain scalars.
        let deep = "[".repeat(200);
        let text = format!(
            "models:\n  - model: a{deep}\n    parameters:\n      weight: 1 # {deep}\n  - model: \"{deep}\"\n  - model: '{deep}'\nmerge_method: linear\nchat_template: |\n  {deep}{{% for m in messages %}}\n    {{{{ {deep}\n\n  {{% endfor %}}\n"
        );
        assert_eq!(nesting_too_deep(&text), None);
        let r = Recipe::from_str(&text, None).unwrap();
        assert!(r.chat_template.as_deref().unwrap().contains("for m in"));
        // Exactly at the limit is fine: 63 brackets under the `models` key.
        let text = format!("models: {}{}\n", "[".repeat(63), "]".repeat(63));
        assert_eq!(nesting_too_deep(&text), None);
        assert_eq!(
            nesting_too_deep(&format!("models: {}", "[".repeat(64))),
            Some(1)
        );
        // Every YAML file in the repository is well within the limit.
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut stack = vec![
            root.join("assets"),
            root.join("tests"),
            root.join("examples"),
        ];
        let mut seen = 0;
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let p = entry.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|e| e == "yml" || e == "yaml") {
                    let text = std::fs::read_to_string(&p).unwrap();
                    assert_eq!(nesting_too_deep(&text), None, "{}", p.display());
                    seen += 1;
                }
            }
        }
        assert!(seen > 0);
    }
}
