//! A local server's data dir: made from the template, by a base backup of a primary, or
//! rewound to follow a new primary; and the harness's configuration in it.

use std::fmt::Write as _;
use std::time::Duration;

use crate::error::{HarnessError, Result};
use crate::programs::run_checked;
use crate::site::{HOST, Site, chown_to};
use crate::template;

/// How long copying or rewinding a data dir may take.
const COPY_TIMEOUT: Duration = Duration::from_secs(300);

/// Creates the data dir from the process's `initdb` template.
pub(super) async fn from_template(site: &Site) -> Result<()> {
    let template = template::get(&site.bin_dir, site.run_as).await?;
    let (data_dir, run_as) = (site.data_dir().to_owned(), site.run_as);
    tokio::task::spawn_blocking(move || template.write_to(&data_dir, run_as))
        .await
        .map_err(|e| HarnessError::io("writing the data directory", std::io::Error::other(e)))?
}

/// Creates the data dir as a standby of the primary on `primary_port`: `pg_basebackup -R -X
/// stream`.
pub(super) async fn base_backup(site: &Site, primary_port: u16) -> Result<()> {
    let mut cmd = site.command("pg_basebackup");
    cmd.arg("-D")
        .arg(site.data_dir())
        .args(["-R", "-X", "stream", "-c", "fast", "--no-sync", "-w"])
        .args([
            "-h",
            HOST,
            "-p",
            &primary_port.to_string(),
            "-U",
            "postgres",
        ]);
    run_checked(cmd, "pg_basebackup", COPY_TIMEOUT)
        .await
        .map(drop)
}

/// Turns the data dir of a stopped (or killed) server into a standby of the primary on
/// `primary_port`: `pg_rewind -R` undoes what it wrote that the primary never saw (running
/// crash recovery first if it was killed), copies what changed on the primary, and writes
/// `standby.signal` and a `primary_conninfo` for it. Among what it copies is the primary's
/// configuration, so the harness's is written again.
pub(super) async fn rewind(site: &Site, primary_port: u16) -> Result<()> {
    let source = format!("host={HOST} port={primary_port} user=postgres dbname=postgres");
    let mut cmd = site.command("pg_rewind");
    cmd.arg("-D")
        .arg(site.data_dir())
        .arg(format!("--source-server={source}"))
        .args(["--write-recovery-conf", "--no-sync"]);
    run_checked(cmd, "pg_rewind", COPY_TIMEOUT).await?;
    write_config(site)
}

/// Writes `testkit.conf` (included from `postgresql.conf`) and `pg_hba.conf` for the
/// site's port and socket dir.
pub(super) fn write_config(site: &Site) -> Result<()> {
    let port = site.port().to_string();
    let socket_dir = site.socket_dir().to_string_lossy();
    let place = [
        ("listen_addresses", HOST),
        ("port", port.as_str()),
        ("unix_socket_directories", &*socket_dir),
    ];
    let mut conf = String::from(
        "# Written by protected-pool-testkit before a server's first start, and after a \
         rewind; included from postgresql.conf.\n",
    );
    for (name, value) in site.options.settings(&place) {
        let value = value.replace('\\', "\\\\").replace('\'', "''");
        let _ = writeln!(conf, "{name} = '{value}'");
    }
    let data_dir = site.data_dir();
    let conf_path = data_dir.join("testkit.conf");
    std::fs::write(&conf_path, conf)
        .map_err(|e| HarnessError::io(format!("writing {}", conf_path.display()), e))?;
    chown_to(&conf_path, site.run_as)?;

    let hba_path = data_dir.join("pg_hba.conf");
    std::fs::write(&hba_path, site.options.hba_conf("127.0.0.1/32"))
        .map_err(|e| HarnessError::io(format!("writing {}", hba_path.display()), e))?;
    chown_to(&hba_path, site.run_as)
}
