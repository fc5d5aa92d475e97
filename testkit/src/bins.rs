//! Finding the PostgreSQL binaries and the OS user to run them as.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::error::{HarnessError, Result};

/// Environment variable that, when set, names the directory holding the
/// PostgreSQL binaries; nothing else is searched then.
pub const BIN_DIR_ENV: &str = "PGTESTKIT_BIN_DIR";

/// Where Debian and Ubuntu install versioned PostgreSQL binaries
/// (`/usr/lib/postgresql/<version>/bin`).
const VERSIONED_ROOTS: &[&str] = &["/usr/lib/postgresql"];

/// The binaries a directory must hold to run a server.
const SERVER_BINARIES: &[&str] = &["initdb", "pg_ctl", "postgres"];

pub(crate) fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// What is missing from `dir`, or `None` if it holds every server binary.
fn missing_in(dir: &Path) -> Option<String> {
    if !dir.is_dir() {
        return Some("no such directory".to_owned());
    }
    let missing: Vec<&str> = SERVER_BINARIES
        .iter()
        .copied()
        .filter(|bin| !is_executable(&dir.join(bin)))
        .collect();
    if missing.is_empty() {
        None
    } else {
        Some(format!("no {}", missing.join(", ")))
    }
}

/// Parses a version directory name such as `15` or `9.6` for sorting.
fn version_key(name: &str) -> Option<Vec<u32>> {
    name.split('.').map(|part| part.parse().ok()).collect()
}

/// Looks for the server binaries: in `override_dir` only if given, else in
/// each `PATH` entry, else in `<root>/<version>/bin` for each versioned root,
/// highest version first.
pub(crate) fn locate_in(
    override_dir: Option<OsString>,
    path_var: Option<OsString>,
    versioned_roots: &[&Path],
) -> Result<PathBuf> {
    let mut searched = Vec::new();
    if let Some(dir) = override_dir.filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        match missing_in(&dir) {
            None => return Ok(dir),
            Some(why) => {
                searched.push(format!("${BIN_DIR_ENV} = {} ({why})", dir.display()));
                return Err(HarnessError::BinariesNotFound { searched });
            }
        }
    }

    let path_dirs: Vec<PathBuf> = path_var
        .as_deref()
        .map(|p| std::env::split_paths(p).collect())
        .unwrap_or_default();
    for dir in &path_dirs {
        if missing_in(dir).is_none() {
            // PATH may hold symlinks to the real install (e.g. /usr/local/bin/initdb ->
            // /usr/lib/postgresql/15/bin/initdb); use the real directory so psql,
            // pg_basebackup, ... come from the same install.
            let real = dir
                .join("initdb")
                .canonicalize()
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf))
                .filter(|real| missing_in(real).is_none());
            return Ok(real.unwrap_or_else(|| dir.clone()));
        }
    }
    if path_dirs.is_empty() {
        searched.push("PATH (unset or empty)".to_owned());
    } else {
        let shown: Vec<String> = path_dirs.iter().map(|d| d.display().to_string()).collect();
        searched.push(format!("PATH entries: {}", shown.join(":")));
    }

    for root in versioned_roots {
        let mut versions: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir(root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name();
                let key = version_key(name.to_str()?)?;
                Some((key, entry.path().join("bin")))
            })
            .collect();
        versions.sort_by(|a, b| b.0.cmp(&a.0));
        if versions.is_empty() {
            searched.push(format!("{}/*/bin (no versions there)", root.display()));
        }
        for (_, bin) in versions {
            match missing_in(&bin) {
                None => return Ok(bin),
                Some(why) => searched.push(format!("{} ({why})", bin.display())),
            }
        }
    }
    Err(HarnessError::BinariesNotFound { searched })
}

/// The directory holding the PostgreSQL binaries, found once per process.
pub(crate) fn bin_dir() -> Result<PathBuf> {
    static FOUND: OnceLock<PathBuf> = OnceLock::new();
    if let Some(dir) = FOUND.get() {
        return Ok(dir.clone());
    }
    let roots: Vec<&Path> = VERSIONED_ROOTS.iter().map(Path::new).collect();
    let dir = locate_in(
        std::env::var_os(BIN_DIR_ENV),
        std::env::var_os("PATH"),
        &roots,
    )?;
    Ok(FOUND.get_or_init(|| dir).clone())
}

/// Who the PostgreSQL programs run as.
#[derive(Clone, Copy, Debug)]
pub(crate) enum RunAs {
    /// The current user (not root).
    Current,
    /// Another user; used when the harness runs as root.
    User {
        /// Its uid.
        uid: u32,
        /// Its primary gid.
        gid: u32,
    },
}

const SERVER_USER: &str = "postgres";

fn lookup_user(passwd: &str, user: &str) -> Option<(u32, u32)> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next()? != user {
            return None;
        }
        let _password = fields.next()?;
        let uid = fields.next()?.parse().ok()?;
        let gid = fields.next()?.parse().ok()?;
        Some((uid, gid))
    })
}

/// As root, the `postgres` user; otherwise the current user.
pub(crate) fn run_as() -> Result<RunAs> {
    static FOUND: OnceLock<RunAs> = OnceLock::new();
    if let Some(r) = FOUND.get() {
        return Ok(*r);
    }
    let r = if rustix::process::geteuid().is_root() {
        let passwd = std::fs::read_to_string("/etc/passwd")
            .map_err(|e| HarnessError::io("reading /etc/passwd", e))?;
        let (uid, gid) =
            lookup_user(&passwd, SERVER_USER).ok_or_else(|| HarnessError::NoServerUser {
                user: SERVER_USER.to_owned(),
            })?;
        RunAs::User { uid, gid }
    } else {
        RunAs::Current
    };
    Ok(*FOUND.get_or_init(|| r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binaries_is_an_error_naming_every_place() {
        let empty = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("14/bin")).unwrap();
        let err = locate_in(
            None,
            Some(empty.path().as_os_str().to_owned()),
            &[root.path(), Path::new("/nonexistent/postgresql")],
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&empty.path().display().to_string()), "{msg}");
        assert!(
            msg.contains(&format!("{}/14/bin", root.path().display())),
            "{msg}"
        );
        assert!(msg.contains("/nonexistent/postgresql/*/bin"), "{msg}");
        assert!(msg.contains(BIN_DIR_ENV), "{msg}");
    }

    #[test]
    fn override_dir_is_the_only_place_searched() {
        let empty = tempfile::tempdir().unwrap();
        let err = locate_in(Some(empty.path().as_os_str().to_owned()), None, &[]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(BIN_DIR_ENV) && msg.contains("no initdb, pg_ctl, postgres"));
    }

    #[test]
    fn highest_version_wins() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        for v in ["9.6", "15", "13"] {
            let bin = root.path().join(v).join("bin");
            std::fs::create_dir_all(&bin).unwrap();
            for b in SERVER_BINARIES {
                let p = bin.join(b);
                std::fs::write(&p, "").unwrap();
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            }
        }
        std::fs::create_dir_all(root.path().join("notaversion/bin")).unwrap();
        let found = locate_in(None, None, &[root.path()]).unwrap();
        assert_eq!(found, root.path().join("15/bin"));
    }

    #[test]
    fn symlinks_on_path_resolve_to_the_real_install() {
        use std::os::unix::fs::PermissionsExt;
        let real = tempfile::tempdir().unwrap();
        let on_path = tempfile::tempdir().unwrap();
        for b in SERVER_BINARIES.iter().chain(&["psql"]) {
            let p = real.path().join(b);
            std::fs::write(&p, "").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        for b in SERVER_BINARIES {
            std::os::unix::fs::symlink(real.path().join(b), on_path.path().join(b)).unwrap();
        }
        let found = locate_in(None, Some(on_path.path().as_os_str().to_owned()), &[]).unwrap();
        assert_eq!(found, real.path().canonicalize().unwrap());
    }

    #[test]
    fn passwd_lookup() {
        let passwd =
            "root:x:0:0:root:/root:/bin/bash\npostgres:x:101:104::/var/lib/postgresql:/bin/bash\n";
        assert_eq!(lookup_user(passwd, "postgres"), Some((101, 104)));
        assert_eq!(lookup_user(passwd, "nobody"), None);
    }
}
