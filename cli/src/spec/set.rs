//! `--set KEY=VALUE` overrides, applied to the parsed document before it is
//! deserialised, so they go through exactly the checks the file does.
//!
//! KEY is a dotted path (`resources.gpus`); missing tables are created. VALUE
//! is read as a TOML value (`2`, `["a"]`, `"quoted"`) and taken as a plain
//! string when it is not one, so `--set run="python x.py"` needs no extra
//! quoting. Under `env.`, and for keys that only take strings, the text is
//! always taken literally: `--set env.LR=0.01` is the string "0.01".

use std::borrow::Cow;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::SpecError;
use super::raw::STRING_KEYS;

/// One parsed `--set` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Override<'a> {
    /// The argument as given, for messages.
    pub text: &'a str,
    pub path: Vec<&'a str>,
    pub value: &'a str,
}

impl<'a> Override<'a> {
    pub fn parse(text: &'a str) -> Result<Override<'a>, SpecError> {
        let bad = |problem: &str| SpecError::BadOverride {
            set: text.to_string(),
            problem: problem.to_string(),
        };
        let (key, value) = text
            .split_once('=')
            .ok_or_else(|| bad("expected KEY=VALUE, e.g. --set resources.gpus=2"))?;
        let key = key.trim();
        if key.is_empty() {
            return Err(bad("the key before '=' is empty"));
        }
        let path: Vec<&str> = key.split('.').map(str::trim).collect();
        if path.iter().any(|p| p.is_empty()) {
            return Err(bad(&format!("`{key}` has an empty part between dots")));
        }
        if path[0] == "env" && path.len() > 2 {
            return Err(bad("environment variables are set with env.NAME=VALUE"));
        }
        Ok(Override { text, path, value })
    }

    /// True when this override set `key` (dotted), a table above it or a key
    /// inside it: problems with `key` are then this override's.
    pub fn touches(&self, key: &[&str]) -> bool {
        self.path.starts_with(key) || key.starts_with(&self.path)
    }

    /// The TOML value this override sets.
    fn to_value(&self) -> DeValue<'a> {
        let literal = DeValue::String(Cow::Borrowed(self.value));
        let dotted = self.path.join(".");
        if self.path[0] == "env" && self.path.len() == 2 {
            return literal;
        }
        match DeValue::parse(self.value.trim()) {
            Ok(v) if STRING_KEYS.contains(&dotted.as_str()) && !v.get_ref().is_str() => literal,
            Ok(v) => v.into_inner(),
            Err(_) => literal,
        }
    }

    /// Sets the value in `doc`, creating tables on the way.
    pub fn apply(&self, doc: &mut DeTable<'a>) -> Result<(), SpecError> {
        let (last, tables) = self.path.split_last().expect("parse refuses an empty key");
        let mut table = doc;
        for (i, part) in tables.iter().enumerate() {
            let slot = table
                .entry(Spanned::new(0..0, Cow::Borrowed(*part)))
                .or_insert_with(|| Spanned::new(0..0, DeValue::Table(DeTable::new())));
            table = match slot.get_mut() {
                DeValue::Table(t) => t,
                other => {
                    return Err(SpecError::BadOverride {
                        set: self.text.to_string(),
                        problem: format!(
                            "`{}` is {} {}, not a table",
                            self.path[..=i].join("."),
                            article(other.type_str()),
                            other.type_str()
                        ),
                    });
                }
            };
        }
        let value = Spanned::new(0..0, self.to_value());
        // Keep the file's key (and its span) when replacing a value.
        match table.get_mut(*last) {
            Some(slot) => *slot = value,
            None => {
                table.insert(Spanned::new(0..0, Cow::Borrowed(*last)), value);
            }
        }
        Ok(())
    }
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applied(doc: &str, sets: &[&str]) -> Result<toml::Table, SpecError> {
        let mut table = DeTable::parse(doc).unwrap();
        for s in sets {
            Override::parse(s)?.apply(table.get_mut())?;
        }
        let de = toml::de::Deserializer::from(table);
        Ok(serde::Deserialize::deserialize(de).unwrap())
    }

    #[test]
    fn values_are_toml_or_else_strings() {
        let t = applied(
            "run = \"a\"\n[resources]\ngpus = 1\n",
            &[
                "resources.gpus=2",
                "outputs.paths=[\"out/\"]",
                "run=python x.py --lr 0.1",
                "env.LR=0.01",
                "env.FLAG=true",
                "name=2024",
                "setup=\"quoted\"",
            ],
        )
        .unwrap();
        let want: toml::Table = toml::from_str(
            r#"
            run = "python x.py --lr 0.1"
            name = "2024"
            setup = "quoted"
            [resources]
            gpus = 2
            [outputs]
            paths = ["out/"]
            [env]
            LR = "0.01"
            FLAG = "true"
            "#,
        )
        .unwrap();
        assert_eq!(t, want);
    }

    #[test]
    fn malformed_overrides_name_themselves() {
        let cases = [
            (
                "gpus",
                "--set gpus: expected KEY=VALUE, e.g. --set resources.gpus=2",
            ),
            ("=2", "--set =2: the key before '=' is empty"),
            (
                "a..b=1",
                "--set a..b=1: `a..b` has an empty part between dots",
            ),
            (
                "env.A.B=1",
                "--set env.A.B=1: environment variables are set with env.NAME=VALUE",
            ),
            ("run.x=1", "--set run.x=1: `run` is a string, not a table"),
        ];
        for (set, want) in cases {
            let e = applied("run = \"a\"", &[set]).unwrap_err();
            assert_eq!(e.to_string(), want);
        }
    }

    #[test]
    fn touches_keys_above_and_below() {
        let o = Override::parse("python.conda=env.yml").unwrap();
        assert!(o.touches(&["python"]));
        assert!(o.touches(&["python", "conda"]));
        assert!(!o.touches(&["python", "requirements"]));
        assert!(!o.touches(&["run"]));
    }
}
