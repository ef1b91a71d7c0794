//! `Template`: a message text with `{placeholders}`, parsed once so rendering cannot fail.

use std::fmt;

/// One piece of a parsed template.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Text(String),
    Slot(String),
}

/// A text with placeholders such as `{code}`, `{bot.name}`, `{field.first_name}`, `{sequence}`.
/// `{{` and `}}` stand for literal braces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

/// What a template may refer to where it is used.
#[derive(Clone, Copy, Debug, Default)]
pub struct Allowed<'a> {
    pub code: bool,
    pub current: bool,
    pub fields: &'a [String],
    /// Spoken by the voice menu, which has no number's fields or sequence at hand.
    pub spoken: bool,
    /// The fields certain to hold an answer whenever this text is sent; a declared one
    /// that is not may show as nothing, and `check` warns of it. `None`: not looked at.
    pub filled: Option<&'a [String]>,
}

impl Template {
    /// Parses `source`; the error says what is wrong with the braces.
    pub fn parse(source: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut chars = source.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    text.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => return Err(format!("unclosed placeholder `{{{name}`")),
                        }
                    }
                    let name = name.trim().to_string();
                    if name.is_empty() {
                        return Err(
                            "empty placeholder `{}` (write `{{` for a literal brace)".into()
                        );
                    }
                    if !text.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text)));
                    }
                    parts.push(Part::Slot(name));
                }
                '}' => return Err("stray `}` (write `}}` for a literal brace)".into()),
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        Ok(Template {
            source: source.to_string(),
            parts,
        })
    }

    /// A text taken as it is, with no placeholders.
    pub fn literal(text: &str) -> Template {
        Template {
            source: text.to_string(),
            parts: vec![Part::Text(text.to_string())],
        }
    }

    /// Every placeholder this template names that `allowed` does not permit, as messages.
    pub fn unknown_placeholders(&self, allowed: Allowed<'_>) -> Vec<String> {
        self.unknown(allowed)
            .into_iter()
            .map(|(_, m, _)| m)
            .collect()
    }

    /// [`Template::unknown_placeholders`], each after the placeholder's name and with whether
    /// declaring a field would allow it (`{field.KEY}` in a text that may name fields).
    pub fn unknown(&self, allowed: Allowed<'_>) -> Vec<(&str, String, bool)> {
        self.slots()
            .filter(|name| !slot_allowed(name, allowed))
            .map(|name| {
                let undeclared = !allowed.spoken && name.starts_with("field.");
                let hint = match name {
                    // (`{sequence}` is refused only in a voice text.)
                    n if allowed.spoken && (n == "sequence" || n.starts_with("field.")) => {
                        " (a voice text knows {bot.name}, and {code} where one is read)"
                    }
                    "code" => {
                        " ({code} only exists in verify.send, verify.api_send, verify.voice and ivr.read_code)"
                    }
                    "current" => " ({current} only exists in form.current)",
                    n if n.starts_with("field.") => {
                        " (declare the field in [[form.field]] or form.extra_fields)"
                    }
                    _ => "",
                };
                let hint = if hint.is_empty() {
                    // What this text may hold, and nothing it may not.
                    let known: Vec<&str> = [
                        ("{bot.name}", true),
                        ("{sequence}", !allowed.spoken),
                        ("{field.KEY}", !allowed.spoken),
                        ("{code}", allowed.code),
                        ("{current}", allowed.current),
                    ]
                    .into_iter()
                    .filter_map(|(n, ok)| ok.then_some(n))
                    .collect();
                    format!(" (this text knows {})", known.join(", "))
                } else {
                    hint.to_string()
                };
                (name, format!("unknown placeholder {{{name}}}{hint}"), undeclared)
            })
            .collect()
    }

    /// The declared fields this template names that `allowed` does not count as filled
    /// (see [`Allowed::filled`]), each once, in the order named.
    pub fn maybe_unfilled<'a>(&'a self, allowed: Allowed<'a>) -> Vec<&'a str> {
        let Some(filled) = allowed.filled else {
            return Vec::new();
        };
        let mut out: Vec<&str> = Vec::new();
        for key in self.slots().filter_map(|n| n.strip_prefix("field.")) {
            let declared = allowed.fields.iter().any(|f| f == key);
            if declared && !filled.iter().any(|f| f == key) && !out.contains(&key) {
                out.push(key);
            }
        }
        out
    }

    pub fn slots(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Slot(s) => Some(s.as_str()),
            Part::Text(_) => None,
        })
    }

    /// Fills the placeholders; one that `lookup` does not know becomes empty. An answer's
    /// (`{field.KEY}`'s) closing full stop gives way to a full stop, `!` or `?` the text puts
    /// right after it ("Ann." in "Thanks, {field.first_name}!" is "Thanks, Ann!", not
    /// "Thanks, Ann.!"); an ellipsis stays, and so does it before a comma or a colon ("Jr.,").
    /// Other values (the bot's name, `{current}`, which shows the answer as saved) are as
    /// they are.
    pub fn render(&self, lookup: impl Fn(&str) -> Option<String>) -> String {
        let mut out = String::with_capacity(self.source.len());
        for (i, part) in self.parts.iter().enumerate() {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Slot(s) => {
                    let value = lookup(s).unwrap_or_default();
                    let punctuated = s.starts_with("field.")
                        && matches!(self.parts.get(i + 1),
                            Some(Part::Text(t)) if t.starts_with(['.', '!', '?']));
                    let stop = value.strip_suffix('.').filter(|v| !v.ends_with('.'));
                    match stop {
                        Some(v) if punctuated => out.push_str(v),
                        _ => out.push_str(&value),
                    }
                }
            }
        }
        out
    }
}

fn slot_allowed(name: &str, allowed: Allowed<'_>) -> bool {
    match name {
        "bot.name" => true,
        "sequence" => !allowed.spoken,
        "code" => allowed.code,
        "current" => allowed.current,
        other => {
            !allowed.spoken
                && other
                    .strip_prefix("field.")
                    .is_some_and(|key| allowed.fields.iter().any(|f| f == key))
        }
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_filled_and_braces_can_be_escaped() {
        let t = Template::parse("{{hi}} {bot.name}: {code}").unwrap();
        let out = t.render(|n| match n {
            "bot.name" => Some("Acme".into()),
            "code" => Some("123456".into()),
            _ => None,
        });
        assert_eq!(out, "{hi} Acme: 123456");
    }

    #[test]
    fn a_values_full_stop_gives_way_to_the_punctuation_after_it() {
        let t = Template::parse("Thanks, {field.name}! You said {field.name} and {field.name}.")
            .unwrap();
        for (value, said) in [
            ("Ann.", "Thanks, Ann! You said Ann. and Ann."),
            ("Ann", "Thanks, Ann! You said Ann and Ann."),
            ("wait...", "Thanks, wait...! You said wait... and wait...."),
            ("Dr. J.", "Thanks, Dr. J! You said Dr. J. and Dr. J."),
        ] {
            assert_eq!(t.render(|_| Some(value.into())), said);
        }
        // Before a comma or a colon it stays (an abbreviation's), and other values keep
        // theirs: the bot's name, and {current}, the answer as saved.
        let t =
            Template::parse("{field.name}, {field.name}: {bot.name}! (now: {current}.)").unwrap();
        assert_eq!(
            t.render(|_| Some("St. John Jr.".into())),
            "St. John Jr., St. John Jr.: St. John Jr.! (now: St. John Jr..)"
        );
    }

    #[test]
    fn broken_braces_are_errors() {
        assert!(Template::parse("oops {code").is_err());
        assert!(Template::parse("oops }").is_err());
        assert!(Template::parse("oops {}").is_err());
    }

    #[test]
    fn placeholders_are_checked_against_what_the_context_allows() {
        let fields = vec!["first_name".to_string()];
        let t = Template::parse("{code} {field.first_name} {field.age} {nope}").unwrap();
        let sms = Allowed {
            code: false,
            current: false,
            fields: &fields,
            spoken: false,
            filled: None,
        };
        let unknown = t.unknown_placeholders(sms);
        assert_eq!(unknown.len(), 3, "{unknown:?}");
        // Spoken, neither fields nor the sequence are at hand.
        let t = Template::parse("{bot.name} {field.first_name} {sequence}").unwrap();
        assert!(t.unknown_placeholders(sms).is_empty());
        let unknown = t.unknown_placeholders(Allowed {
            spoken: true,
            ..sms
        });
        assert_eq!(unknown.len(), 2, "{unknown:?}");
    }
}
