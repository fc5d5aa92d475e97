//! One `initdb` per process, kept in memory and written out for each server.
//!
//! `initdb` takes about a second; writing its ~40 MB result back out takes a
//! fraction of that. The template lives in memory rather than in a directory
//! so that nothing is left on disk when the test process exits (statics are
//! never dropped).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::sync::OnceCell;

use crate::bins::RunAs;
use crate::error::{HarnessError, Result};
use crate::programs::{pg_command, run_checked};
use crate::site::make_root_dir;

/// The line appended to the template's `postgresql.conf`; the harness writes
/// its per-server settings to that included file.
pub(crate) const INCLUDE_LINE: &str = "\n# protected-pool-testkit\ninclude = 'testkit.conf'\n";

enum Entry {
    Dir {
        rel: PathBuf,
        mode: u32,
    },
    File {
        rel: PathBuf,
        mode: u32,
        data: Vec<u8>,
    },
}

/// A data directory, in memory.
pub(crate) struct Template {
    entries: Vec<Entry>,
}

static TEMPLATE: OnceCell<Template> = OnceCell::const_new();

/// The process's template, running `initdb` the first time.
pub(crate) async fn get(bin_dir: &Path, run_as: RunAs) -> Result<&'static Template> {
    TEMPLATE.get_or_try_init(|| build(bin_dir, run_as)).await
}

async fn build(bin_dir: &Path, run_as: RunAs) -> Result<Template> {
    let dir = make_root_dir(run_as, "pgtestkit-template-")?;
    let data = dir.path().join("data");
    let mut cmd = pg_command(bin_dir, "initdb", run_as, dir.path());
    cmd.arg("-D").arg(&data).args([
        "-U",
        "postgres",
        "-A",
        "trust",
        "-E",
        "UTF8",
        "--locale=C",
        "--no-sync",
    ]);
    run_checked(cmd, "initdb", std::time::Duration::from_secs(120)).await?;

    let mut conf = std::fs::OpenOptions::new()
        .append(true)
        .open(data.join("postgresql.conf"))
        .map_err(|e| HarnessError::io("opening the template's postgresql.conf", e))?;
    conf.write_all(INCLUDE_LINE.as_bytes())
        .map_err(|e| HarnessError::io("writing the template's postgresql.conf", e))?;
    drop(conf);

    tokio::task::spawn_blocking(move || {
        let mut entries = Vec::new();
        read_tree(&data, Path::new(""), &mut entries)?;
        drop(dir);
        Ok(Template { entries })
    })
    .await
    .map_err(|e| HarnessError::io("reading the template", std::io::Error::other(e)))?
}

fn read_tree(root: &Path, rel: &Path, out: &mut Vec<Entry>) -> Result<()> {
    let dir = root.join(rel);
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .map_err(|e| HarnessError::io(format!("listing {}", dir.display()), e))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()
        .map_err(|e| HarnessError::io(format!("listing {}", dir.display()), e))?;
    names.sort();
    for name in names {
        let rel = rel.join(name);
        let path = root.join(&rel);
        let meta = std::fs::symlink_metadata(&path)
            .map_err(|e| HarnessError::io(format!("reading {}", path.display()), e))?;
        let mode = meta.permissions().mode() & 0o7777;
        if meta.is_dir() {
            out.push(Entry::Dir {
                rel: rel.clone(),
                mode,
            });
            read_tree(root, &rel, out)?;
        } else if meta.is_file() {
            let data = std::fs::read(&path)
                .map_err(|e| HarnessError::io(format!("reading {}", path.display()), e))?;
            out.push(Entry::File { rel, mode, data });
        } else {
            return Err(HarnessError::io(
                format!("copying {}", path.display()),
                std::io::Error::other("initdb made something that is neither file nor directory"),
            ));
        }
    }
    Ok(())
}

impl Template {
    /// Writes the template out as a new data directory `dest` (which must not
    /// exist), owned by the server user. Blocking.
    pub(crate) fn write_to(&self, dest: &Path, run_as: RunAs) -> Result<()> {
        let own = |path: &Path| -> Result<()> {
            if let RunAs::User { uid, gid } = run_as {
                std::os::unix::fs::chown(path, Some(uid), Some(gid))
                    .map_err(|e| HarnessError::io(format!("chown {}", path.display()), e))?;
            }
            Ok(())
        };
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dest)
            .map_err(|e| HarnessError::io(format!("creating {}", dest.display()), e))?;
        own(dest)?;
        for entry in &self.entries {
            match entry {
                Entry::Dir { rel, mode } => {
                    let path = dest.join(rel);
                    std::fs::DirBuilder::new()
                        .mode(*mode)
                        .create(&path)
                        .map_err(|e| HarnessError::io(format!("creating {}", path.display()), e))?;
                    own(&path)?;
                }
                Entry::File { rel, mode, data } => {
                    let path = dest.join(rel);
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(*mode)
                        .open(&path)
                        .map_err(|e| HarnessError::io(format!("creating {}", path.display()), e))?;
                    f.write_all(data)
                        .map_err(|e| HarnessError::io(format!("writing {}", path.display()), e))?;
                    if let RunAs::User { uid, gid } = run_as {
                        std::os::unix::fs::fchown(&f, Some(uid), Some(gid)).map_err(|e| {
                            HarnessError::io(format!("chown {}", path.display()), e)
                        })?;
                    }
                }
            }
        }
        Ok(())
    }
}
