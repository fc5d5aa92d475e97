#!/usr/bin/env python3
"""Instructions per query from two callgrind profiles of one contender, grouped by where they go.

The throughput binary's `--queries N` runs a fixed number of queries; two runs of the same
contender with N1 < N2 queries differ only by N2 - N1 queries, so (Ir(N2) - Ir(N1)) / (N2 - N1)
is the cost of one query with start-up, connecting and shutdown taken out. Instructions are
counted per source line's file (`callgrind_annotate`'s `file:function`), so code inlined from
another crate counts for that crate.

    perf/callgrind_per_query.py OURS_N1 OURS_N2 BASE_N1 BASE_N2 N1 N2
        the two contenders side by side, by group, and protected-pool's own code by file
    perf/callgrind_per_query.py --calls FILE_N1 FILE_N2 N1 N2 FUNCTION...
        calls per query of the named functions (exact callgrind names), with their callers
"""

import collections
import os
import re
import subprocess
import sys

CRATE_FILE = re.compile(r"index\.crates\.io-[0-9a-f]+/([A-Za-z0-9_\-]+?)-\d[^/]*/(.*)")


def self_cost(path):
    """Total Ir and self Ir per `file:function` line of callgrind_annotate."""
    out = subprocess.run(
        ["callgrind_annotate", "--threshold=100", "--inclusive=no", "--auto=no", path],
        capture_output=True, text=True, check=True,
    ).stdout
    total, cost = None, collections.Counter()
    for line in out.splitlines():
        m = re.match(r"^\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+(.*)$", line)
        if not m:
            continue
        ir, name = int(m.group(1).replace(",", "")), m.group(2).strip()
        if name.startswith("PROGRAM TOTALS"):
            total = ir
        else:
            cost[re.sub(r"\s+\[[^\]]*\]$", "", name)] += ir
    return total, cost


def per_query(small, big, n_small, n_big):
    (t1, c1), (t2, c2) = self_cost(small), self_cost(big)
    n = n_big - n_small
    return (t2 - t1) / n, {k: (c2[k] - c1[k]) / n for k in set(c1) | set(c2)}


def group(key, own_prefix):
    """Where a `file:function` line's instructions go."""
    file, _, fn = key.partition(":")
    if not file.startswith(("/", "./", "?")):
        # callgrind_annotate names files under the working directory relative to it.
        file = os.path.abspath(file)
    if "memmove" in file or "memcpy" in fn:
        return "memcpy (moving futures)"
    if "/malloc/" in file or "__rdl_alloc" in fn or "__rdl_dealloc" in fn:
        return "malloc/free"
    if file.startswith(own_prefix):
        return "protected-pool's own code"
    if "/perf/src/" in file:
        return "benchmark driver, futures-util"
    if "clock_gettime" in file or "unix/time.rs" in file or "Timespec" in fn \
            or "std::time::Instant" in fn:
        return "clock reads (Instant::now, elapsed)"
    crate = None
    m = CRATE_FILE.search(file)
    if m:
        crate = m.group(1)
    elif "/rustc/" in file:
        # std/core inlined: count it for the crate whose function it was inlined into.
        f = re.match(r"^(?:<|core::ptr::drop_in_place<)*([a-z_]+)::", fn)
        crate = f.group(1).replace("_", "-") if f and f.group(1) not in ("core", "alloc", "std") \
            else None
        if crate is None:
            return "std/core inlined into futures (no crate named)"
    if crate is None:
        return "other"
    if crate == "protected-pool":
        return "protected-pool's own code"
    if crate == "tokio":
        timer = m and m.group(2).startswith(("src/time/", "src/runtime/time/"))
        if timer or "tokio::time::" in fn or "runtime::time::" in fn:
            return "tokio timers"
        return "tokio scheduler and sync"
    if crate in ("tracing", "tracing-core"):
        return "tracing spans"
    if crate in ("deadpool", "deadpool-runtime"):
        return "deadpool"
    if crate.startswith(("sqlx", "bytes", "memchr", "atoi", "hashlink", "hashbrown", "foldhash",
                         "itoa", "byteorder")):
        return "sqlx driver"
    if crate.startswith(("moka", "crossbeam", "serde", "ryu", "tagptr", "event-listener",
                         "parking", "portable", "uuid")):
        return "cache (moka, serde_json, crossbeam)"
    if crate in ("throughput", "futures-util", "fastrand"):
        return "benchmark driver, futures-util"
    return "other"


def compare(ours, base, n1, n2, own_prefix):
    t_ours, ours_cost = per_query(ours[0], ours[1], n1, n2)
    t_base, base_cost = per_query(base[0], base[1], n1, n2)
    groups = {}
    for name, cost in (("ours", ours_cost), ("base", base_cost)):
        g = collections.Counter()
        for key, ir in cost.items():
            g[group(key, own_prefix)] += ir
        groups[name] = g
    extra = t_ours - t_base
    print("| where | protected-pool | bare engine | extra | share of the extra |")
    print("|---|---:|---:|---:|---:|")
    print(f"| all (Ir per query) | {t_ours:,.0f} | {t_base:,.0f} | {extra:+,.0f} | 100 % |")
    g_ours, g_base = groups["ours"], groups["base"]
    for key in sorted(set(g_ours) | set(g_base), key=lambda k: -(g_ours[k] - g_base[k])):
        d = g_ours[key] - g_base[key]
        if abs(d) < 20 and g_ours[key] < 20:
            continue
        print(f"| {key} | {g_ours[key]:,.0f} | {g_base[key]:,.0f} | {d:+,.0f} | "
              f"{d / extra * 100:.1f} % |")
    by_file = collections.Counter()
    for key, ir in ours_cost.items():
        if group(key, own_prefix) == "protected-pool's own code":
            file = key.partition(":")[0]
            file = file if file.startswith("/") else os.path.abspath(file)
            by_file[file[len(own_prefix):] if file.startswith(own_prefix)
                    else "std/core inlined into its functions"] += ir
    print("\n| protected-pool's own code, by file | Ir per query | share of its query |")
    print("|---|---:|---:|")
    for file, ir in by_file.most_common(12):
        print(f"| `{file}` | {ir:,.0f} | {ir / t_ours * 100:.1f} % |")


def calls(path, targets):
    """Calls of each function in `targets`, by caller, from a callgrind profile."""
    names, out, caller, callee = {}, collections.Counter(), None, None
    for line in open(path):
        m = re.match(r"(c?fn)=\((\d+)\)(?: (.*))?", line.rstrip("\n"))
        if m:
            if m.group(3):
                names[m.group(2)] = m.group(3)
            if m.group(1) == "fn":
                caller, callee = names.get(m.group(2)), None
            else:
                callee = names.get(m.group(2))
        elif line.startswith("calls=") and callee is not None:
            if callee in targets:
                out[(callee, caller)] += int(line.split("=")[1].split()[0])
            callee = None
    return out


def main(args):
    if args[:1] == ["--calls"]:
        small, big, n1, n2, *targets = args[1:]
        n = int(n2) - int(n1)
        c1, c2 = calls(small, set(targets)), calls(big, set(targets))
        for target in targets:
            rows = {k: (c2[k] - c1[k]) / n for k in set(c1) | set(c2) if k[0] == target}
            print(f"{sum(rows.values()):6.2f}  {target}")
            for (_, caller), v in sorted(rows.items(), key=lambda kv: -kv[1]):
                if v >= 0.05:
                    print(f"    {v:6.2f}  from {caller}")
        return
    o1, o2, b1, b2, n1, n2 = args
    compare((o1, o2), (b1, b2), int(n1), int(n2), own_prefix=own_source_prefix())


def own_source_prefix():
    """The library's `src/` as the profiles name it: this checkout's."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src") + "/"


if __name__ == "__main__":
    main(sys.argv[1:])
