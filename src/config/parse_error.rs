//! A parser's complaint about a document as a [`ConfigProblem`]: where (the field's path,
//! line and column) and what, without the values it quoted.
//!
//! serde's messages quote the value they choke on (`invalid type: string "postgres://app:pw@db"`,
//! ``unknown variant `..` ``), and a value in a pool's configuration is often a URL with a
//! password in it: `replicas = ["postgres://.."]` instead of a table. The quoted value goes;
//! its kind, the field's path, the line and column and what was expected stay, which is what
//! it takes to find and fix the mistake.

use serde_path_to_error::{Path, Segment};

use crate::problem::ConfigProblem;

/// Stands where a value of the document was.
const REDACTED: &str = "<redacted>";

/// A TOML error (in the syntax, or a value that does not fit), placed by line and column.
pub(super) fn toml_error(text: &str, error: &toml::de::Error) -> ConfigProblem {
    let place = match error.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |at| at + 1) + 1;
            format!("line {line}, column {column}")
        }
        None => "document".to_owned(),
    };
    ConfigProblem::new(place, without_values(error.message().trim()))
}

/// A TOML document that does not fit the configuration, placed by path, line and column.
pub(super) fn toml_shape(
    text: &str,
    error: serde_path_to_error::Error<toml::de::Error>,
) -> ConfigProblem {
    let mut problem = toml_error(text, error.inner());
    if let Some(path) = field_path(error.path()) {
        problem.path = format!("{path} ({})", problem.path);
    }
    problem
}

/// A JSON document that does not parse or does not fit, placed by path, line and column.
pub(super) fn json(error: serde_path_to_error::Error<serde_json::Error>) -> ConfigProblem {
    let field = field_path(error.path());
    let inner = error.into_inner();
    let place = format!("line {}, column {}", inner.line(), inner.column());
    let path = match field {
        Some(field) => format!("{field} ({place})"),
        None => place,
    };
    ConfigProblem::new(path, without_values(&without_position(&inner.to_string())))
}

/// The field's path, like `replicas[0].url`; `None` at the top of the document. A key that
/// is no field name (a URL written where a key goes) shows as `<redacted>`.
fn field_path(path: &Path) -> Option<String> {
    let mut shown = String::new();
    for segment in path {
        match segment {
            Segment::Seq { index } => shown.push_str(&format!("[{index}]")),
            Segment::Map { key: name } | Segment::Enum { variant: name } => {
                if !shown.is_empty() {
                    shown.push('.');
                }
                shown.push_str(if is_name(name) { name } else { REDACTED });
            }
            Segment::Unknown => {
                if !shown.is_empty() {
                    shown.push('.');
                }
                shown.push('?');
            }
        }
    }
    (!shown.is_empty()).then_some(shown)
}

/// Whether `text` looks like a field name (letters, digits, `_`, `-`) rather than a value.
fn is_name(text: &str) -> bool {
    !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// `message` without the document's values that serde quotes in it:
/// - `string "..."` (an unexpected string, quoted as Rust would) becomes `string`;
/// - ``unknown variant `...` `` becomes `unknown variant`: a variant is a value;
/// - ``unknown field `...` `` keeps the field when it looks like a name (a misspelt key is
///   what the reader has to find) and drops it otherwise.
///
/// Whatever cannot be parsed to its end is dropped with the rest of the message, so a message
/// in a shape not foreseen here loses detail rather than leaking.
fn without_values(message: &str) -> String {
    const STRING: &str = "string \"";
    const VARIANT: &str = "unknown variant `";
    const FIELD: &str = "unknown field `";

    let mut kept = String::with_capacity(message.len());
    let mut rest = message;
    while let Some((at, marker)) = [STRING, VARIANT, FIELD]
        .into_iter()
        .filter_map(|marker| rest.find(marker).map(|at| (at, marker)))
        .min()
    {
        kept.push_str(&rest[..at]);
        // The marker without its opening quote: `string`, `unknown variant`, `unknown field`.
        kept.push_str(marker[..marker.len() - 1].trim_end());
        let quoted = &rest[at + marker.len()..];
        let Some(end) = (if marker == STRING {
            end_of_debug_string(quoted)
        } else {
            end_of_backquoted_name(quoted)
        }) else {
            return kept;
        };
        if marker == FIELD && is_name(&quoted[..end]) {
            kept.push_str(&format!(" `{}`", &quoted[..end]));
        }
        rest = &quoted[end + 1..];
    }
    kept.push_str(rest);
    kept
}

/// Where the string that `text` starts inside ends: its closing quote, as `{:?}` writes it
/// (every `"` and `\` inside is escaped).
fn end_of_debug_string(text: &str) -> Option<usize> {
    let mut chars = text.char_indices();
    while let Some((at, c)) = chars.next() {
        match c {
            '\\' => {
                chars.next();
            }
            '"' => return Some(at),
            _ => {}
        }
    }
    None
}

/// Where a name serde quotes in backquotes ends. Nothing inside is escaped, so the closing
/// backquote is found from what serde writes after it: the list of what was expected.
fn end_of_backquoted_name(text: &str) -> Option<usize> {
    ["`, expected ", "`, there are no "]
        .into_iter()
        .find_map(|after| text.rfind(after))
}

/// serde_json's message without the " at line L column C" it appends.
fn without_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(at) => message[..at].to_owned(),
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::without_values;
    use crate::PoolConfig;

    #[test]
    fn quoted_values_go_and_the_rest_of_the_message_stays() {
        for (message, kept) in [
            (
                r#"invalid type: string "postgres://a:pw@db", expected struct EndpointConfig"#,
                "invalid type: string, expected struct EndpointConfig",
            ),
            (
                r#"invalid value: string "pw\"q\\", expected a duration"#,
                "invalid value: string, expected a duration",
            ),
            (
                "unknown variant `pw`, expected `primary` or `prefer_replica`",
                "unknown variant, expected `primary` or `prefer_replica`",
            ),
            (
                "unknown field `failure_treshold`, expected one of `a`, `b`",
                "unknown field `failure_treshold`, expected one of `a`, `b`",
            ),
            (
                "unknown field `postgres://a:pw@db`, there are no fields",
                "unknown field, there are no fields",
            ),
            (
                "invalid type: integer `3`, expected a string",
                "invalid type: integer `3`, expected a string",
            ),
        ] {
            assert_eq!(without_values(message), kept);
        }
    }

    #[test]
    fn a_quote_that_never_closes_takes_the_rest_of_the_message_with_it() {
        assert_eq!(
            without_values(r#"invalid type: string "pw\", expected"#),
            "invalid type: string"
        );
        assert_eq!(without_values("unknown variant `pw"), "unknown variant");
    }

    #[test]
    fn a_type_error_names_the_field_path_and_the_line() {
        let error =
            PoolConfig::from_toml("[breakers.write]\nminimum_calls = \"many\"\n").unwrap_err();
        let problem = &error.problems[0];
        assert!(
            problem
                .path
                .starts_with("breakers.write.minimum_calls (line 2"),
            "{problem}"
        );
    }

    #[test]
    fn an_unknown_field_is_an_error_not_ignored() {
        let error = PoolConfig::from_toml("[breakers.read]\nfailure_treshold = 3\n").unwrap_err();
        let message = error.to_string();
        assert!(message.contains("failure_treshold"), "{message}");
        assert!(message.contains("breakers.read"), "{message}");
    }
}
