//! Recipe → YAML that both evomerge and mergekit (PyYAML, YAML 1.1) read the same way.
//!
//! Numbers are written in their shortest round-tripping form, always with a decimal point and a
//! signed exponent (`1.0`, `1.5e-07`), because PyYAML reads `1e-7` as a string. Gradients are
//! flow lists (`[0.0, 0.5, 1.0]`), as mergekit's own dumper writes them. Strings are written
//! plain when that is unambiguous, otherwise double-quoted (JSON escapes, valid YAML).

use std::fmt::Write;

use super::{Inputs, ParamMap, ParamSetting, Recipe, TokenizerSource, Value};

pub(super) fn to_yaml(r: &Recipe) -> String {
    let mut out = String::with_capacity(512);
    match &r.inputs {
        Inputs::Models(ms) => {
            out.push_str("models:\n");
            for m in ms {
                let _ = writeln!(out, "  - model: {}", string(&m.model.name));
                params(&mut out, &m.parameters, 4);
            }
        }
        Inputs::Slices(ss) => {
            out.push_str("slices:\n");
            for s in ss {
                out.push_str("  - sources:\n");
                for src in &s.sources {
                    let _ = writeln!(out, "      - model: {}", string(&src.model.name));
                    let _ = writeln!(
                        out,
                        "        layer_range: [{}, {}]",
                        src.layer_range.0, src.layer_range.1
                    );
                    params(&mut out, &src.parameters, 8);
                }
                if let Some(b) = &s.base_model {
                    let _ = writeln!(out, "    base_model: {}", string(&b.name));
                }
                params(&mut out, &s.parameters, 4);
            }
        }
    }
    let _ = writeln!(out, "merge_method: {}", string(&r.merge_method));
    if let Some(b) = &r.base_model {
        let _ = writeln!(out, "base_model: {}", string(&b.name));
    }
    params(&mut out, &r.parameters, 0);
    if let Some(d) = r.dtype {
        let _ = writeln!(out, "dtype: {}", d.torch_name());
    }
    if let Some(d) = r.out_dtype {
        let _ = writeln!(out, "out_dtype: {}", d.torch_name());
    }
    match &r.tokenizer_source {
        None => {}
        Some(TokenizerSource::Base) => out.push_str("tokenizer_source: base\n"),
        Some(TokenizerSource::Model(m)) => {
            let _ = writeln!(out, "tokenizer_source: {}", string(&m.name));
        }
    }
    if let Some(c) = &r.chat_template {
        let _ = writeln!(out, "chat_template: {}", string(c));
    }
    out
}

/// A `parameters:` block at `indent` spaces (nothing when empty).
fn params(out: &mut String, map: &ParamMap, indent: usize) {
    if map.is_empty() {
        return;
    }
    let pad = " ".repeat(indent);
    let _ = writeln!(out, "{pad}parameters:");
    for (name, setting) in map {
        match setting {
            ParamSetting::Value(v) => {
                let _ = writeln!(out, "{pad}  {}: {}", string(name), value(v));
            }
            ParamSetting::Filtered(conds) => {
                let _ = writeln!(out, "{pad}  {}:", string(name));
                for c in conds {
                    match &c.filter {
                        Some(f) => {
                            let _ = writeln!(out, "{pad}    - filter: {}", string(f));
                            let _ = writeln!(out, "{pad}      value: {}", value(&c.value));
                        }
                        None => {
                            let _ = writeln!(out, "{pad}    - value: {}", value(&c.value));
                        }
                    }
                }
            }
        }
    }
}

fn value(v: &Value) -> String {
    match v {
        Value::Number(x) => number(*x),
        Value::Bool(b) => b.to_string(),
        Value::Gradient(xs) => {
            let parts: Vec<String> = xs.iter().map(|x| number(*x)).collect();
            format!("[{}]", parts.join(", "))
        }
    }
}

/// Shortest round-tripping decimal, in a form PyYAML (YAML 1.1) also reads as a float.
pub(crate) fn number(x: f64) -> String {
    if !x.is_finite() {
        // Never produced by the parser; written the YAML way for completeness.
        return if x.is_nan() {
            ".nan".into()
        } else if x > 0.0 {
            ".inf".into()
        } else {
            "-.inf".into()
        };
    }
    let s = format!("{x:?}"); // shortest round trip: "1.0", "0.1", "1e-7", "1.5e20"
    match s.split_once('e') {
        None => s,
        Some((mant, exp)) => {
            let mant = if mant.contains('.') {
                mant.to_string()
            } else {
                format!("{mant}.0")
            };
            let exp = if exp.starts_with('-') {
                exp.to_string()
            } else {
                format!("+{exp}")
            };
            format!("{mant}e{exp}")
        }
    }
}

/// A YAML scalar for `s`: plain when safe, else a double-quoted JSON string.
fn string(s: &str) -> String {
    let plain_chars = s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/' | '+' | '@'));
    let first_ok = s
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/'));
    let lower = s.to_ascii_lowercase();
    let reserved = matches!(
        lower.as_str(),
        "true" | "false" | "yes" | "no" | "on" | "off" | "y" | "n" | "null" | "~"
    ) || s.parse::<f64>().is_ok()
        || s.starts_with('.') && matches!(lower.as_str(), ".inf" | ".nan")
        || s.bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'_' | b'.' | b':' | b'-' | b'+'));
    if plain_chars && first_ok && !reserved {
        s.to_string()
    } else {
        serde_json::to_string(s).unwrap_or_else(|_| format!("{s:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_yaml11_floats_and_round_trip() {
        assert_eq!(number(1.0), "1.0");
        assert_eq!(number(0.1), "0.1");
        assert_eq!(number(-2.5), "-2.5");
        assert_eq!(number(1e-7), "1.0e-7");
        assert_eq!(number(1.5e20), "1.5e+20");
        for x in [0.1, 1.0 / 3.0, 1e-300, 123456789.123, -0.0, 7e22] {
            assert_eq!(number(x).parse::<f64>().unwrap(), x);
        }
    }

    #[test]
    fn strings_quote_when_needed() {
        assert_eq!(string("./models/a-b_c"), "./models/a-b_c");
        assert_eq!(string("self_attn"), "self_attn");
        assert_eq!(string("true"), "\"true\"");
        assert_eq!(string("1.5"), "\"1.5\"");
        assert_eq!(string("my model"), "\"my model\"");
        assert_eq!(string("{% for m in x %}\n"), "\"{% for m in x %}\\n\"");
        assert_eq!(string(""), "\"\"");
        assert_eq!(string("*"), "\"*\"");
    }
}
