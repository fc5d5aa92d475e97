//! A parser's complaint about a document as a [`ConfigProblem`]: where (the field's path,
//! line and column) and what.

use crate::problem::ConfigProblem;

/// A TOML syntax error, placed by line and column.
pub(super) fn toml_syntax(text: &str, error: &toml::de::Error) -> ConfigProblem {
    let place = match error.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |at| at + 1) + 1;
            format!("line {line}, column {column}")
        }
        None => "document".to_owned(),
    };
    ConfigProblem::new(place, error.message().trim().to_owned())
}

/// A TOML document that does not fit the configuration, placed by path, line and column.
pub(super) fn toml_shape(
    text: &str,
    error: serde_path_to_error::Error<toml::de::Error>,
) -> ConfigProblem {
    let path = error.path().to_string();
    let mut problem = toml_syntax(text, error.inner());
    if path != "." {
        problem.path = format!("{path} ({})", problem.path);
    }
    problem
}

/// A JSON document that does not parse or does not fit, placed by path, line and column.
pub(super) fn json(error: serde_path_to_error::Error<serde_json::Error>) -> ConfigProblem {
    let path = error.path().to_string();
    let inner = error.into_inner();
    let place = format!("line {}, column {}", inner.line(), inner.column());
    let path = if path == "." {
        place
    } else {
        format!("{path} ({place})")
    };
    ConfigProblem::new(path, without_position(&inner.to_string()))
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
    use crate::PoolConfig;

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
