//! Shared pieces of the measurement binaries: the machine's state, statistics, peak memory,
//! command-line flags and chart fonts.

use std::error::Error;
use std::time::{Duration, Instant};

/// Errors of the measurement binaries: the message is what the user sees.
pub type BoxError = Box<dyn Error + Send + Sync>;

/// The benchmark table: 10,000 rows with an integer key.
pub const TABLE_ROWS: i32 = 10_000;

/// SQL that creates and fills the benchmark table, then refreshes its statistics.
pub const TABLE_SQL: &str = "\
    CREATE TABLE bench_items (id int4 PRIMARY KEY, name text NOT NULL, value int8 NOT NULL);\n\
    INSERT INTO bench_items SELECT g, 'item ' || g, g * 7 FROM generate_series(1, 10000) AS g;\n\
    VACUUM ANALYZE bench_items;";

/// The 1-, 5- and 15-minute load averages.
pub fn load_average() -> Result<[f64; 3], BoxError> {
    let text = std::fs::read_to_string("/proc/loadavg")
        .map_err(|error| format!("reading /proc/loadavg: {error}"))?;
    let mut fields = text.split_whitespace().map(str::parse::<f64>);
    let mut next = || -> Result<f64, BoxError> {
        Ok(fields
            .next()
            .ok_or("/proc/loadavg has fewer than 3 fields")??)
    };
    Ok([next()?, next()?, next()?])
}

/// Waits until the 1-minute load average is below `threshold`, polling every `poll`, for at
/// most `limit`. Returns whether it got there, and the load it saw last.
pub fn wait_for_quiet_machine(
    threshold: f64,
    poll: Duration,
    limit: Duration,
) -> Result<(bool, f64), BoxError> {
    let started = Instant::now();
    loop {
        let [one, ..] = load_average()?;
        if one < threshold {
            return Ok((true, one));
        }
        if started.elapsed() + poll > limit {
            return Ok((false, one));
        }
        eprintln!(
            "waiting for a quiet machine: 1-minute load {one:.2} >= {threshold} ({:.0} s so far)",
            started.elapsed().as_secs_f64()
        );
        std::thread::sleep(poll);
    }
}

/// The `--wait-quiet` rule of both binaries: load below 0.5, polled every 20 s, for up to
/// 15 minutes. Prints what it found.
pub fn wait_quiet_as_documented() -> Result<(), BoxError> {
    let (quiet, load) =
        wait_for_quiet_machine(0.5, Duration::from_secs(20), Duration::from_secs(15 * 60))?;
    if quiet {
        println!("machine quiet: 1-minute load {load:.2} < 0.5");
    } else {
        println!("machine NOT quiet after 15 minutes: 1-minute load {load:.2}; measuring anyway");
    }
    Ok(())
}

/// One line about the machine: CPU model, CPUs, load.
pub fn machine_summary() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|model| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let load = load_average().map_or_else(
        |_| "unknown".to_owned(),
        |[a, b, c]| format!("{a:.2} {b:.2} {c:.2}"),
    );
    format!("{model}, {cpus} CPUs, load average {load}")
}

/// Peak resident set size of this process (`VmHWM`), in KiB.
pub fn peak_rss_kib() -> Result<u64, BoxError> {
    status_kib("VmHWM")
}

/// A `kB` field of this process's `/proc/self/status`, in KiB: `VmHWM` (peak RSS), `RssAnon`
/// (resident memory the process wrote: heap, stacks), `RssFile` (resident pages mapped from
/// files: the binary's code and read-only data, shared libraries).
pub fn status_kib(field: &str) -> Result<u64, BoxError> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|error| format!("reading /proc/self/status: {error}"))?;
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .ok_or_else(|| format!("/proc/self/status has no {field} line"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kib)
}

/// Whose resources [`cpu_time`] reads.
#[derive(Debug, Clone, Copy)]
pub enum Usage {
    /// This process, every thread.
    SelfProcess,
    /// Its children that were waited for.
    Children,
}

fn rusage(who: Usage) -> Result<libc::rusage, BoxError> {
    let who = match who {
        Usage::SelfProcess => libc::RUSAGE_SELF,
        Usage::Children => libc::RUSAGE_CHILDREN,
    };
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `usage` is a valid, writable rusage and `who` a valid selector.
    let code = unsafe { libc::getrusage(who, usage.as_mut_ptr()) };
    if code != 0 {
        return Err(format!("getrusage: {}", std::io::Error::last_os_error()).into());
    }
    // SAFETY: getrusage returned 0, so it filled the struct (it was zeroed before anyway).
    Ok(unsafe { usage.assume_init() })
}

/// CPU time (user + system) used so far by `who`.
pub fn cpu_time(who: Usage) -> Result<Duration, BoxError> {
    let usage = rusage(who)?;
    let time = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    Ok(time(usage.ru_utime) + time(usage.ru_stime))
}

/// The largest peak resident set size among this process's children that were waited for,
/// in KiB (`getrusage(RUSAGE_CHILDREN)`).
pub fn children_peak_rss_kib() -> Result<u64, BoxError> {
    Ok(u64::try_from(rusage(Usage::Children)?.ru_maxrss).unwrap_or(0))
}

/// The value at percentile `p` (0..=100) of `sorted`, by nearest rank; `None` when empty.
pub fn percentile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// The median of `values` (the mean of the middle two for an even count).
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// `--name value` flags after the program name; anything else is an error naming the usage.
#[derive(Debug, Default)]
pub struct Flags {
    pairs: Vec<(String, String)>,
    switches: Vec<String>,
}

impl Flags {
    /// Parses `args`: `--switch` names in `switches` take no value, every other `--name` takes
    /// one.
    pub fn parse(
        args: impl IntoIterator<Item = String>,
        switches: &[&str],
        usage: &str,
    ) -> Result<Self, BoxError> {
        let mut flags = Self::default();
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let Some(name) = arg.strip_prefix("--") else {
                return Err(format!("unexpected argument {arg:?}\n{usage}").into());
            };
            if name == "help" {
                return Err(usage.to_owned().into());
            }
            if switches.contains(&name) {
                flags.switches.push(name.to_owned());
            } else {
                let value = args
                    .next()
                    .ok_or_else(|| format!("--{name} needs a value\n{usage}"))?;
                flags.pairs.push((name.to_owned(), value));
            }
        }
        Ok(flags)
    }

    /// Whether `--name` was given.
    pub fn switch(&mut self, name: &str) -> bool {
        let before = self.switches.len();
        self.switches.retain(|switch| switch != name);
        self.switches.len() != before
    }

    /// The value of `--name`, parsed, or `default`.
    pub fn value<T>(&mut self, name: &str, default: T) -> Result<T, BoxError>
    where
        T: std::str::FromStr,
        T::Err: std::fmt::Display,
    {
        match self.pairs.iter().position(|(key, _)| key == name) {
            None => Ok(default),
            Some(index) => {
                let (_, value) = self.pairs.remove(index);
                value
                    .parse()
                    .map_err(|error| format!("--{name} {value:?}: {error}").into())
            }
        }
    }

    /// Fails on any flag not asked for.
    pub fn finish(self, usage: &str) -> Result<(), BoxError> {
        let unknown: Vec<String> = self
            .pairs
            .iter()
            .map(|(name, _)| name)
            .chain(&self.switches)
            .map(|name| format!("--{name}"))
            .collect();
        if unknown.is_empty() {
            Ok(())
        } else {
            Err(format!("unknown flags {}\n{usage}", unknown.join(", ")).into())
        }
    }
}

/// Registers DejaVu Sans as the charts' `sans-serif` font (plotters' `ab_glyph` backend draws
/// text with fonts registered at run time, so nothing is linked against fontconfig or
/// freetype). `$PERF_FONT` names another TTF file.
pub fn register_chart_font() -> Result<(), BoxError> {
    const CANDIDATES: [&str; 3] = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
    ];
    let chosen = std::env::var("PERF_FONT").ok();
    let paths: Vec<&str> = match &chosen {
        Some(path) => vec![path.as_str()],
        None => CANDIDATES.to_vec(),
    };
    let (path, bytes) = paths
        .iter()
        .find_map(|path| std::fs::read(path).ok().map(|bytes| (*path, bytes)))
        .ok_or_else(|| {
            format!(
                "no chart font: none of {} could be read (install fonts-dejavu-core or set \
                 PERF_FONT to a .ttf file)",
                paths.join(", ")
            )
        })?;
    // The font lives as long as the process: plotters keeps a reference to it.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, bytes)
        .map_err(|_| format!("{path} is not a font plotters can read"))?;
    Ok(())
}

/// The bare engine protected-pool stands on, as every benchmark runs it: deadpool's managed
/// pool over sqlx's `PgConnection`, connections opened and handed out again without any check,
/// the floor under protected-pool's checkout.
#[derive(Debug)]
pub struct BareManager {
    /// Where its connections go.
    pub options: sqlx::postgres::PgConnectOptions,
}

impl deadpool::managed::Manager for BareManager {
    type Type = sqlx::postgres::PgConnection;
    type Error = sqlx::Error;

    async fn create(&self) -> Result<sqlx::postgres::PgConnection, sqlx::Error> {
        use sqlx::ConnectOptions;
        // Boxed as protected-pool's manager boxes it: the driver's connect future is about
        // 1.9 kB, and inline it would make every checkout future (a hot path) that large.
        Box::pin(self.options.connect()).await
    }

    async fn recycle(
        &self,
        _: &mut sqlx::postgres::PgConnection,
        _: &deadpool::managed::Metrics,
    ) -> deadpool::managed::RecycleResult<sqlx::Error> {
        Ok(())
    }
}

/// `value` with thousands separators: `12,345`.
pub fn thousands(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let values: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&values, 50.0), Some(50));
        assert_eq!(percentile(&values, 99.0), Some(99));
        assert_eq!(percentile(&values, 100.0), Some(100));
        assert_eq!(percentile(&values, 0.0), Some(1));
        assert_eq!(percentile::<u32>(&[], 50.0), None);
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn flags() {
        let args = ["--rounds", "3", "--wait-quiet"].map(String::from);
        let mut flags = Flags::parse(args, &["wait-quiet"], "usage").unwrap();
        assert!(flags.switch("wait-quiet"));
        assert_eq!(flags.value("rounds", 5).unwrap(), 3);
        assert_eq!(flags.value("seconds", 4).unwrap(), 4);
        flags.finish("usage").unwrap();
        let bad = Flags::parse(["--nope".to_owned(), "1".to_owned()], &[], "usage").unwrap();
        assert!(bad.finish("usage").is_err());
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
