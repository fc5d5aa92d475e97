//! A configuration that is wrong never shows the passwords written in it: not in the error's
//! `Display` or `Debug`, not in a listed problem, not in a log line at any level. Parsers like
//! to quote the value they choke on, and a value in a configuration is often a URL with a
//! password in it, so every case below is a mistake someone makes with a URL in hand.

use std::io::Write;
use std::sync::{Arc, Mutex};

use protected_pool::{Error, PoolBuilder, PoolConfig, Postgres, ProtectedPool, Sqlite};
use tracing_subscriber::fmt::MakeWriter;

/// One bad configuration and the password that must not show.
struct Case {
    name: &'static str,
    format: Format,
    text: &'static str,
    secret: &'static str,
    /// An environment variable the text names, and the value it holds.
    env: Option<(&'static str, &'static str)>,
}

#[derive(Clone, Copy)]
enum Format {
    Toml,
    Json,
}

const fn toml(name: &'static str, secret: &'static str, text: &'static str) -> Case {
    Case {
        name,
        format: Format::Toml,
        text,
        secret,
        env: None,
    }
}

const fn json(name: &'static str, secret: &'static str, text: &'static str) -> Case {
    Case {
        name,
        format: Format::Json,
        text,
        secret,
        env: None,
    }
}

const fn env(
    name: &'static str,
    secret: &'static str,
    text: &'static str,
    variable: &'static str,
    value: &'static str,
) -> Case {
    Case {
        name,
        format: Format::Toml,
        text,
        secret,
        env: Some((variable, value)),
    }
}

const CORPUS: &[Case] = &[
    toml(
        "a URL where a table is expected, in a list",
        "s3cr3t-1",
        r#"replicas = ["postgres://app:s3cr3t-1@r1/app"]"#,
    ),
    toml(
        "a URL where a table is expected",
        "s3cr3t-2",
        r#"primary = "postgres://app:s3cr3t-2@db/app""#,
    ),
    toml(
        "a URL in a number's place",
        "s3cr3t-3",
        "[primary]\nurl = \"postgres://db/app\"\n[pool]\nmax_connections = \"postgres://app:s3cr3t-3@db/app\"\n",
    ),
    toml(
        "a keyword DSN where a URL is expected",
        "s3cr3t-4",
        "[primary]\nurl = \"user=app password=s3cr3t-4 hostaddr=::1 dbname=app\"\n",
    ),
    toml(
        "a URL with a bad port",
        "s3cr3t-5",
        "[primary]\nurl = \"postgres://app:s3cr3t-5@db:99999/app\"\n",
    ),
    toml(
        "a percent-encoded password that is not UTF-8",
        "s3cr3t-6",
        "[primary]\nurl = \"postgres://app:s3cr3t-6%3A%22%ff@db/app\"\n",
    ),
    toml(
        "a percent-encoded password in a list where tables are expected",
        "s3cr3t-7",
        r#"replicas = ["postgres://app:s3cr3t-7%40%2F@r1/app"]"#,
    ),
    toml(
        "a password with a quote",
        "s3cr3t-8",
        r#"replicas = ['postgres://app:s3cr3t-8"q@r1/app']"#,
    ),
    toml(
        "a password with a newline",
        "s3cr3t-9",
        r#"primary = "postgres://app:s3cr3t-9\nx@db/app""#,
    ),
    env(
        "url_env holding a URL with a bad port",
        "s3cr3t-10",
        "[primary]\nurl_env = \"PROTECTED_POOL_SECRETS_10\"\n",
        "PROTECTED_POOL_SECRETS_10",
        "postgres://app:s3cr3t-10@db:port/app",
    ),
    env(
        "url_env holding a keyword DSN",
        "s3cr3t-11",
        "[primary]\nurl_env = \"PROTECTED_POOL_SECRETS_11\"\n",
        "PROTECTED_POOL_SECRETS_11",
        "password=s3cr3t-11 host=[::1] user=app",
    ),
    toml(
        "a URL where a variant is expected",
        "s3cr3t-12",
        r#"read_preference = "postgres://app:s3cr3t-12@db/app""#,
    ),
    toml(
        "a URL where a rate or \"off\" is expected",
        "s3cr3t-13",
        "[breakers.read]\nfailure_rate = \"postgres://app:s3cr3t-13@db/app\"\n",
    ),
    toml(
        "a URL where a duration is expected",
        "s3cr3t-14",
        "[timeouts]\nread = \"postgres://app:s3cr3t-14@db/app\"\n",
    ),
    toml(
        "a URL as a key",
        "s3cr3t-15",
        "[primary]\n\"postgres://app:s3cr3t-15@db/app\" = true\n",
    ),
    toml(
        "an unterminated string",
        "s3cr3t-16",
        "[primary]\nurl = \"postgres://app:s3cr3t-16@db/app\n",
    ),
    toml(
        "a bad escape in a string",
        "s3cr3t-17",
        "[primary]\nurl = \"postgres://app:s3cr3t-17\\q@db/app\"\n",
    ),
    toml(
        "a Redis URL with a bad port",
        "s3cr3t-18",
        "[primary]\nurl = \"postgres://db/app\"\n[cache]\nkind = \"redis\"\nurl = \"redis://:s3cr3t-18@cache:99999\"\n",
    ),
    toml(
        "a Redis URL given for a memory cache",
        "s3cr3t-19",
        "[primary]\nurl = \"postgres://db/app\"\n[cache]\nurl = \"redis://:s3cr3t-19@cache\"\nmax_entries = 0\n",
    ),
    toml(
        "a URL in the cache's size",
        "s3cr3t-20",
        "[cache]\nmax_entries = \"redis://:s3cr3t-20@cache\"\n",
    ),
    toml(
        "a URL of another database",
        "s3cr3t-21",
        "[primary]\nurl = \"mysql://app:s3cr3t-21@db/app\"\n",
    ),
    toml(
        "a URL without its scheme",
        "s3cr3t-22",
        "[primary]\nurl = \"s3cr3t-22@db:5432/app\"\n",
    ),
    toml(
        "a URL given twice",
        "s3cr3t-23",
        "[primary]\nurl = \"postgres://app:s3cr3t-23@db/app\"\nurl = \"postgres://db/app\"\n",
    ),
    toml(
        "a URL where a name is expected",
        "s3cr3t-24",
        "[primary]\nurl = \"postgres://db/app\"\nname = [\"postgres://app:s3cr3t-24@db/app\"]\n",
    ),
    json(
        "JSON: a URL where an object is expected, in a list",
        "s3cr3t-31",
        r#"{"replicas": ["postgres://app:s3cr3t-31@r1/app"]}"#,
    ),
    json(
        "JSON: a URL in a number's place",
        "s3cr3t-32",
        r#"{"pool": {"max_connections": "postgres://app:s3cr3t-32@db/app"}}"#,
    ),
    json(
        "JSON: a keyword DSN where a URL is expected",
        "s3cr3t-33",
        r#"{"primary": {"url": "user=app password=s3cr3t-33 hostaddr=::1"}}"#,
    ),
    json(
        "JSON: a password with a quote and a newline",
        "s3cr3t-34",
        r#"{"primary": "postgres://app:s3cr3t-34\"q\nx@db/app"}"#,
    ),
    json(
        "JSON: a document cut short",
        "s3cr3t-35",
        r#"{"primary": {"url": "postgres://app:s3cr3t-35@db/app"}"#,
    ),
    json(
        "JSON: a URL where a variant is expected",
        "s3cr3t-36",
        r#"{"replica_selection": "postgres://app:s3cr3t-36@db/app"}"#,
    ),
    json(
        "JSON: a URL as a key",
        "s3cr3t-37",
        r#"{"primary": {"postgres://app:s3cr3t-37@db/app": 1}}"#,
    ),
    json(
        "JSON: a URL where a count or \"off\" is expected",
        "s3cr3t-38",
        r#"{"breakers": {"write": {"consecutive_failures": "postgres://app:s3cr3t-38@db"}}}"#,
    ),
    json(
        "JSON: a URL with a bad port",
        "s3cr3t-39",
        r#"{"primary": {"url": "postgres://app:s3cr3t-39@db:70000/app"}}"#,
    ),
    json(
        "JSON: a URL where a duration is expected",
        "s3cr3t-40",
        r#"{"breakers": {"auth": {"open": {"base": "postgres://app:s3cr3t-40@db"}}}}"#,
    ),
];

/// Mistakes in a URL's query that only the database driver sees: the builder hands it the
/// URL, and the driver quotes a query value in its error, and logs an unknown parameter with
/// its value.
const QUERY_VALUES: &[Case] = &[
    toml(
        "a password in a misspelt query parameter",
        "s3cr3t-25",
        "[primary]\nurl = \"postgres://app@db/app?pasword=s3cr3t-25\"\n",
    ),
    toml(
        "a password in a query parameter with a bad value",
        "s3cr3t-26",
        "[primary]\nurl = \"postgres://app@db/app?sslmode=s3cr3t-26\"\n",
    ),
];

/// Everything written to the log while a case ran, at every level.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Self;

    fn make_writer(&'a self) -> Self {
        self.clone()
    }
}

/// Every text a user or an operator could see, each with where it came from.
#[derive(Default)]
struct Shown {
    texts: Vec<(String, String)>,
    refused: bool,
}

impl Shown {
    fn text(&mut self, place: &str, text: String) {
        self.texts.push((place.to_owned(), text));
    }

    fn error(&mut self, stage: &str, error: Error) {
        self.refused = true;
        self.text(&format!("{stage}: Display"), error.to_string());
        self.text(&format!("{stage}: Debug"), format!("{error:?}"));
        if let Error::Config(error) = &error {
            for problem in &error.problems {
                self.text(
                    &format!("{stage}: a problem"),
                    format!("{problem} {problem:?} {} {}", problem.path, problem.message),
                );
            }
        }
    }
}

/// What `case` shows while it is read (as text and as a file), validated and built.
fn everything_shown(case: &Case) -> Shown {
    let mut shown = Shown::default();
    let parsed = match case.format {
        Format::Toml => PoolConfig::from_toml(case.text),
        Format::Json => PoolConfig::from_json(case.text),
    };
    let config = match parsed {
        Ok(config) => {
            shown.text("the parsed config: Debug", format!("{config:?}"));
            Some(config)
        }
        Err(error) => {
            shown.error("reading", error.into());
            None
        }
    };

    let extension = match case.format {
        Format::Toml => ".toml",
        Format::Json => ".json",
    };
    let mut file = tempfile::Builder::new()
        .suffix(extension)
        .tempfile()
        .unwrap();
    file.write_all(case.text.as_bytes()).unwrap();
    if let Err(error) = PoolConfig::load(file.path()) {
        shown.error("loading", error.into());
    }

    let Some(config) = config else {
        return shown;
    };
    if let Err(error) = config.validate() {
        shown.error("validate", error.into());
    }
    if let Err(error) = config.validate_for::<Sqlite>() {
        shown.error("validate_for::<Sqlite>", error.into());
    }
    match ProtectedPool::<Postgres>::from_config(&config) {
        Ok(pool) => {
            shown.text("the pool: Debug", format!("{pool:?}"));
            shown.text("the health report", format!("{:?}", pool.health()));
        }
        Err(error) => shown.error("ProtectedPool::from_config", error),
    }
    let builder = PoolBuilder::<Postgres>::from_config(&config);
    shown.text("the builder: Debug", format!("{builder:?}"));
    if let Err(error) = builder.build() {
        shown.error("PoolBuilder::build", error);
    }
    shown
}

/// Held by every test of this binary while it runs: reading and building configurations
/// reads the environment (`url_env`, the driver's `PG*` defaults), and the cases set it.
static ENVIRONMENT: Mutex<()> = Mutex::new(());

/// Where each case of `cases` shows its password, if anywhere.
fn leaks(cases: &[Case]) -> Vec<String> {
    let _environment = ENVIRONMENT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut leaks = Vec::new();
    for case in cases {
        if let Some((variable, value)) = case.env {
            // SAFETY: no other thread of this binary touches the environment meanwhile:
            // every test holds ENVIRONMENT.
            unsafe { std::env::set_var(variable, value) };
        }
        let captured = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(captured.clone())
            .finish();
        let mut shown = tracing::subscriber::with_default(subscriber, || everything_shown(case));
        assert!(
            shown.refused,
            "{}: the configuration was accepted",
            case.name
        );
        shown.text("the log", captured.text());
        for (place, text) in shown.texts {
            if text.contains(case.secret) {
                leaks.push(format!("{} ({place}): {text}", case.name));
            }
        }
    }
    leaks
}

#[test]
fn no_bad_configuration_shows_its_passwords() {
    let leaks = leaks(CORPUS);
    assert!(
        leaks.is_empty(),
        "{} leaks:\n{}",
        leaks.len(),
        leaks.join("\n\n")
    );
}

#[test]
fn no_bad_query_parameter_shows_its_value() {
    let leaks = leaks(QUERY_VALUES);
    assert!(
        leaks.is_empty(),
        "{} leaks:\n{}",
        leaks.len(),
        leaks.join("\n\n")
    );
}

#[test]
fn a_problem_still_says_where_and_what_was_expected() {
    let _environment = ENVIRONMENT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let error = PoolConfig::from_toml(r#"replicas = ["postgres://app:s3cr3t@r1/app"]"#)
        .expect_err("a string is no table");
    assert_eq!(
        error.problems[0].to_string(),
        "replicas[0] (line 1, column 13): invalid type: string, expected struct EndpointConfig"
    );
    let error = PoolConfig::from_json(r#"{"read_preference": "postgres://app:s3cr3t@db"}"#)
        .expect_err("no such variant");
    assert_eq!(
        error.problems[0].to_string(),
        "read_preference (line 1, column 46): unknown variant, expected `primary` or `prefer_replica`"
    );
    let error = PoolConfig::from_toml("[primary]\nurl = \"host=db password=s3cr3t\"\n")
        .expect("well-formed")
        .validate()
        .expect_err("not a URL");
    assert_eq!(error.problems.len(), 1, "{error}");
    assert_eq!(error.problems[0].path, "primary.url");
    assert!(error.problems[0].message.contains("not a URL"), "{error}");
}
