//! A server's options, as [`PgServerBuilder`](crate::PgServerBuilder) sets them, and the
//! settings and `pg_hba.conf` that both backends make of them.

use std::time::Duration;

/// What the builder collected; plain data, shared by both backends.
#[derive(Clone, Debug)]
pub(crate) struct Options {
    pub(crate) max_connections: Option<u32>,
    pub(crate) password_auth: bool,
    /// The builder's own settings, applied after (so over) the harness's.
    pub(crate) settings: Vec<(String, String)>,
    pub(crate) start_timeout: Duration,
}

impl Default for Options {
    /// No extra settings, trust for everyone, 60 s to start.
    fn default() -> Self {
        Options {
            max_connections: None,
            password_auth: false,
            settings: Vec::new(),
            start_timeout: Duration::from_secs(60),
        }
    }
}

/// The harness's settings, on every server: fast rather than durable, small, and ready for
/// streaming replication and `pg_rewind` (`wal_log_hints`, since the data dirs have no
/// checksums).
const HARNESS_SETTINGS: &[(&str, &str)] = &[
    ("fsync", "off"),
    ("synchronous_commit", "off"),
    ("shared_buffers", "16MB"),
    ("wal_level", "replica"),
    ("max_wal_senders", "10"),
    ("wal_keep_size", "64MB"),
    ("hot_standby", "on"),
    ("wal_log_hints", "on"),
    ("logging_collector", "off"),
    ("lc_messages", "C"),
    ("password_encryption", "scram-sha-256"),
];

impl Options {
    /// Every setting of a server, in order: `place` (where the backend makes it listen and
    /// log), the harness's, `max_connections`, then the builder's settings, which win by
    /// coming last.
    pub(crate) fn settings(&self, place: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut all: Vec<(String, String)> = place
            .iter()
            .chain(HARNESS_SETTINGS)
            .map(|&(name, value)| (name.to_owned(), value.to_owned()))
            .collect();
        if let Some(n) = self.max_connections {
            all.push(("max_connections".to_owned(), n.to_string()));
        }
        all.extend(self.settings.iter().cloned());
        all
    }

    /// `pg_hba.conf` for TCP clients from `address` (`127.0.0.1/32` locally, `samenet` in a
    /// container, where the host's connections come from the Docker bridge): the superuser
    /// `postgres` is trusted, replication included, so the harness can administrate;
    /// everyone else is trusted too, or must give a `scram-sha-256` password with
    /// [`password_auth`](crate::PgServerBuilder::password_auth).
    pub(crate) fn hba_conf(&self, address: &str) -> String {
        let method = if self.password_auth {
            "scram-sha-256"
        } else {
            "trust"
        };
        format!(
            "# Written by protected-pool-testkit.\n\
             # TYPE  DATABASE     USER      ADDRESS        METHOD\n\
             local   all          all                      trust\n\
             local   replication  all                      trust\n\
             host    all          postgres  {address:<14} trust\n\
             host    replication  postgres  {address:<14} trust\n\
             host    all          all       {address:<14} {method}\n"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builders_settings_come_last() {
        let options = Options {
            max_connections: Some(17),
            settings: vec![("fsync".into(), "on".into())],
            ..Options::default()
        };
        let all = options.settings(&[("port", "5432")]);
        assert_eq!(all[0], ("port".into(), "5432".into()));
        let tail: Vec<_> = all[all.len() - 2..].iter().collect();
        assert_eq!(
            tail,
            [
                &("max_connections".into(), "17".into()),
                &("fsync".into(), "on".into())
            ]
        );
    }

    #[test]
    fn hba_trusts_the_superuser_and_asks_others_for_a_password_when_told() {
        let hba = Options {
            password_auth: true,
            ..Options::default()
        }
        .hba_conf("samenet");
        assert!(
            hba.contains("host    all          postgres  samenet        trust\n"),
            "{hba}"
        );
        assert!(
            hba.contains("host    all          all       samenet        scram-sha-256\n"),
            "{hba}"
        );
        let hba = Options::default().hba_conf("127.0.0.1/32");
        assert!(
            hba.contains("host    all          all       127.0.0.1/32   trust\n"),
            "{hba}"
        );
    }
}
