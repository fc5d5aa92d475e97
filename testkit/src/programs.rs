//! Running PostgreSQL's programs (`initdb`, `pg_basebackup`, `pg_rewind`, `psql`, ...) the
//! way the harness runs them: as the server's OS user, with a clean environment, checked.

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::bins::RunAs;
use crate::error::{HarnessError, Result};

/// How long an admin `psql` call may take before it is abandoned.
const PSQL_TIMEOUT: Duration = Duration::from_secs(60);

/// A command for a PostgreSQL program; see [`PgServer::command`](crate::PgServer::command).
pub(crate) fn pg_command(bin_dir: &Path, program: &str, run_as: RunAs, cwd: &Path) -> Command {
    let mut cmd = Command::new(bin_dir.join(program));
    cmd.env_clear();
    for var in ["PATH", "LD_LIBRARY_PATH"] {
        if let Some(v) = std::env::var_os(var) {
            cmd.env(var, v);
        }
    }
    cmd.env("LC_ALL", "C")
        .env("HOME", cwd)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let RunAs::User { uid, gid } = run_as {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

fn describe(cmd: &Command) -> String {
    let std = cmd.as_std();
    let mut s = std.get_program().to_string_lossy().into_owned();
    for arg in std.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

fn check_output(output: Output, command: &str) -> Result<Output> {
    if output.status.success() {
        Ok(output)
    } else {
        Err(HarnessError::CommandFailed {
            command: command.to_owned(),
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }
}

/// Runs `cmd` to completion within `timeout`, its output captured; a non-zero exit is an
/// error.
pub(crate) async fn run_checked(mut cmd: Command, what: &str, timeout: Duration) -> Result<Output> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let command = describe(&cmd);
    let output = tokio::time::timeout(timeout, cmd.output())
        .await
        .map_err(|_| HarnessError::Timeout {
            what: format!("{what} (`{command}`)"),
            after: timeout,
            log_tail: String::new(),
        })?
        .map_err(|e| HarnessError::io(format!("running `{command}`"), e))?;
    check_output(output, &command)
}

/// Runs `sql` with `psql` (the command `cmd`) as the superuser in database `db`, over the
/// unix socket of `port` in `socket_dir`; see [`PgServer::psql`](crate::PgServer::psql) for
/// the output. `log_tail` is asked for the server log on a timeout.
pub(crate) async fn psql(
    mut cmd: Command,
    socket_dir: &Path,
    port: u16,
    db: &str,
    sql: &str,
    log_tail: impl FnOnce() -> String,
) -> Result<String> {
    let conninfo = format!(
        "host={} port={port} user=postgres dbname={}",
        conninfo_quote(&socket_dir.to_string_lossy()),
        conninfo_quote(db)
    );
    cmd.args([
        "-X",
        "-A",
        "-t",
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        "-f",
        "-",
        "-d",
    ])
    .arg(conninfo)
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| HarnessError::io("running psql", e))?;
    let stdin = child.stdin.take();
    let write = async move {
        if let Some(mut stdin) = stdin {
            // psql may exit early on an error; its status tells.
            let _ = stdin.write_all(sql.as_bytes()).await;
        }
    };
    let output = tokio::time::timeout(PSQL_TIMEOUT, async {
        tokio::join!(write, child.wait_with_output()).1
    })
    .await
    .map_err(|_| HarnessError::Timeout {
        what: format!("psql to run {sql:?}"),
        after: PSQL_TIMEOUT,
        log_tail: log_tail(),
    })?
    .map_err(|e| HarnessError::io("running psql", e))?;
    let output = check_output(output, &format!("psql -d {db} <<< {sql:?}"))?;
    let mut out = String::from_utf8_lossy(&output.stdout).into_owned();
    if out.ends_with('\n') {
        out.pop();
    }
    Ok(out)
}

/// A value quoted for a libpq connection string.
pub(crate) fn conninfo_quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(conninfo_quote(r"it's\x"), r"'it\'s\\x'");
    }
}
