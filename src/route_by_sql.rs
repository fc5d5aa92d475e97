//! The route of a statement, read from its SQL (feature `route-by-sql`): what
//! [`ProtectedPool::query`](crate::ProtectedPool::query) decides with, public so that a
//! service can ask how a statement would be routed.
//!
//! # The rule
//!
//! A statement goes to [`Route::Read`] only when it is provably read-only; everything else,
//! including whatever does not parse, goes to [`Route::Write`] (never an error: the statement
//! still runs, on the primary). Read-only means all of:
//!
//! - the SQL parses, in the database's dialect (PostgreSQL or SQLite), into exactly one
//!   statement;
//! - that statement is a query: `SELECT`, `VALUES`, a set operation (`UNION`, `INTERSECT`,
//!   `EXCEPT`) or a `WITH` over any of them; or a plain `EXPLAIN` of such a query
//!   (SQLite's `EXPLAIN QUERY PLAN` included), which plans it without running it. `EXPLAIN
//!   ANALYZE` runs the statement and is a write, as is an `EXPLAIN (...)` with any option but
//!   `VERBOSE`, `COSTS`, `SETTINGS`, `GENERIC_PLAN`, `BUFFERS`, `SUMMARY`, `MEMORY` and
//!   `FORMAT`. `SHOW`, `PRAGMA` and every other statement are writes;
//! - nowhere in it, subqueries and common table expressions included, is there
//!   - a statement inside the query: a data-modifying `WITH` (`WITH d AS (DELETE ...
//!     RETURNING *) SELECT ...`, `INSERT`, `UPDATE`, `MERGE` alike);
//!   - a locking clause (`FOR UPDATE`, `FOR SHARE`; `FOR NO KEY UPDATE` and `FOR KEY SHARE`
//!     do not parse, which makes them writes too): row locks only a primary can take;
//!   - `SELECT ... INTO`, which creates a table;
//!   - a call of a function that is not on the dialect's list of read-only built-ins
//!     ([`SqlDialect::read_only_functions`]), in an expression or in `FROM`: `nextval`,
//!     `setval`, `pg_advisory_lock`, `set_config`, `lo_*`, `dblink`, `pg_sleep` and every
//!     function of the application's own are writes. A name matches when written bare, in
//!     any case (a quoted name matches only as written, in lower case), or, on PostgreSQL,
//!     qualified by `pg_catalog`; any other schema makes it a write;
//!   - an operator of the application's own (`OPERATOR(schema.op)`, or one the parser only
//!     knows as custom), which may run any function.
//!
//! The classifier reads the statement, not the schema: a view, a rule or a trigger behind a
//! table it reads is not looked into, and a name on the list is taken to be the built-in
//! (an application that replaces `lower`, or a SQLite application function registered under
//! a built-in's name, is outside the rule).
//!
//! ```
//! use protected_pool::Route;
//! use protected_pool::route_by_sql::{SqlDialect, route_of_sql};
//!
//! let pg = SqlDialect::Postgres;
//! assert_eq!(route_of_sql("SELECT count(*) FROM users", pg), Route::Read);
//! assert_eq!(route_of_sql("SELECT * FROM jobs FOR UPDATE SKIP LOCKED", pg), Route::Write);
//! assert_eq!(route_of_sql("SELECT nextval('ids')", pg), Route::Write);
//! assert_eq!(route_of_sql("not sql at all", pg), Route::Write);
//! ```

use std::ops::ControlFlow;

use sqlparser::ast::{
    BinaryOperator, DescribeAlias, Expr, ObjectName, ObjectNamePart, Query, Select, Statement,
    TableFactor, UtilityOption, Visit, Visitor,
};
use sqlparser::dialect::{Dialect, PostgreSqlDialect, SQLiteDialect};
use sqlparser::parser::Parser;

use crate::route::Route;

/// The SQL dialect a statement is read in: its database's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SqlDialect {
    /// PostgreSQL.
    Postgres,
    /// SQLite.
    Sqlite,
}

impl SqlDialect {
    /// The functions a read-only statement may call in this dialect: built-ins that change
    /// nothing, neither data, nor sequences, nor session state, and that a replica can run.
    /// Lower case; a call of any other function makes the statement a write.
    pub const fn read_only_functions(self) -> &'static [&'static str] {
        match self {
            Self::Postgres => POSTGRES_READ_ONLY_FUNCTIONS,
            Self::Sqlite => SQLITE_READ_ONLY_FUNCTIONS,
        }
    }

    fn parser_dialect(self) -> &'static dyn Dialect {
        match self {
            Self::Postgres => &PostgreSqlDialect {},
            Self::Sqlite => &SQLiteDialect {},
        }
    }
}

/// Functions known to be read-only in both PostgreSQL and SQLite, under the same name.
const COMMON_READ_ONLY_FUNCTIONS: &[&str] = &[
    // Aggregates.
    "avg",
    "count",
    "max",
    "min",
    "sum",
    // Conditionals.
    "coalesce",
    "nullif",
    // Strings.
    "concat",
    "concat_ws",
    "format",
    "length",
    "lower",
    "ltrim",
    "replace",
    "rtrim",
    "substr",
    "substring",
    "trim",
    "upper",
    // Numbers.
    "abs",
    "ceil",
    "ceiling",
    "cos",
    "exp",
    "floor",
    "ln",
    "log",
    "log10",
    "mod",
    "pi",
    "power",
    "random",
    "round",
    "sign",
    "sin",
    "sqrt",
    "tan",
    "trunc",
    // Dates and times, as SQL's keywords spell them.
    "current_date",
    "current_time",
    "current_timestamp",
    // JSON.
    "json_array_length",
    "json_object",
];

/// PostgreSQL's read-only functions ([`SqlDialect::read_only_functions`]).
const POSTGRES_READ_ONLY_FUNCTIONS: &[&str] = &const_concat::<
    { COMMON_READ_ONLY_FUNCTIONS.len() + POSTGRES_ONLY.len() },
>(COMMON_READ_ONLY_FUNCTIONS, POSTGRES_ONLY);

/// SQLite's read-only functions ([`SqlDialect::read_only_functions`]).
const SQLITE_READ_ONLY_FUNCTIONS: &[&str] = &const_concat::<
    { COMMON_READ_ONLY_FUNCTIONS.len() + SQLITE_ONLY.len() },
>(COMMON_READ_ONLY_FUNCTIONS, SQLITE_ONLY);

/// PostgreSQL's read-only built-ins besides the common ones.
const POSTGRES_ONLY: &[&str] = &[
    // Aggregates and window functions.
    "array_agg",
    "bit_and",
    "bit_or",
    "bool_and",
    "bool_or",
    "corr",
    "cume_dist",
    "dense_rank",
    "every",
    "first_value",
    "json_agg",
    "json_object_agg",
    "jsonb_agg",
    "jsonb_object_agg",
    "lag",
    "last_value",
    "lead",
    "mode",
    "nth_value",
    "ntile",
    "percent_rank",
    "percentile_cont",
    "percentile_disc",
    "rank",
    "row_number",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "string_agg",
    "var_pop",
    "var_samp",
    "variance",
    // Conditionals and constructors.
    "array",
    "greatest",
    "least",
    "row",
    // Strings.
    "ascii",
    "btrim",
    "char_length",
    "character_length",
    "chr",
    "decode",
    "encode",
    "initcap",
    "left",
    "lpad",
    "md5",
    "octet_length",
    "position",
    "quote_ident",
    "quote_literal",
    "quote_nullable",
    "regexp_count",
    "regexp_instr",
    "regexp_like",
    "regexp_match",
    "regexp_matches",
    "regexp_replace",
    "regexp_split_to_array",
    "regexp_split_to_table",
    "regexp_substr",
    "repeat",
    "reverse",
    "right",
    "rpad",
    "split_part",
    "starts_with",
    "string_to_array",
    "string_to_table",
    "strpos",
    "to_char",
    "to_hex",
    "translate",
    // Numbers.
    "acos",
    "asin",
    "atan",
    "atan2",
    "cbrt",
    "degrees",
    "div",
    "gcd",
    "lcm",
    "radians",
    "to_number",
    "width_bucket",
    // Dates and times.
    "age",
    "clock_timestamp",
    "date_bin",
    "date_part",
    "date_trunc",
    "extract",
    "isfinite",
    "justify_days",
    "justify_hours",
    "justify_interval",
    "localtime",
    "localtimestamp",
    "make_date",
    "make_interval",
    "make_time",
    "make_timestamp",
    "make_timestamptz",
    "now",
    "statement_timestamp",
    "timeofday",
    "to_date",
    "to_timestamp",
    "transaction_timestamp",
    // Arrays and set-returning functions.
    "array_append",
    "array_cat",
    "array_dims",
    "array_length",
    "array_lower",
    "array_ndims",
    "array_position",
    "array_positions",
    "array_prepend",
    "array_remove",
    "array_replace",
    "array_to_string",
    "array_upper",
    "cardinality",
    "generate_series",
    "generate_subscripts",
    "unnest",
    // JSON.
    "json_array_elements",
    "json_array_elements_text",
    "json_build_array",
    "json_build_object",
    "json_each",
    "json_each_text",
    "json_extract_path",
    "json_extract_path_text",
    "json_object_keys",
    "json_populate_record",
    "json_strip_nulls",
    "json_to_record",
    "json_to_recordset",
    "json_typeof",
    "jsonb_array_elements",
    "jsonb_array_elements_text",
    "jsonb_array_length",
    "jsonb_build_array",
    "jsonb_build_object",
    "jsonb_each",
    "jsonb_each_text",
    "jsonb_extract_path",
    "jsonb_extract_path_text",
    "jsonb_insert",
    "jsonb_object",
    "jsonb_object_keys",
    "jsonb_path_exists",
    "jsonb_path_match",
    "jsonb_path_query",
    "jsonb_path_query_array",
    "jsonb_path_query_first",
    "jsonb_populate_record",
    "jsonb_pretty",
    "jsonb_set",
    "jsonb_strip_nulls",
    "jsonb_to_record",
    "jsonb_to_recordset",
    "jsonb_typeof",
    "row_to_json",
    "to_json",
    "to_jsonb",
    // Full-text search.
    "phraseto_tsquery",
    "plainto_tsquery",
    "to_tsquery",
    "to_tsvector",
    "ts_headline",
    "ts_rank",
    "ts_rank_cd",
    "websearch_to_tsquery",
    // Identifiers, the session, the server (all of which a standby answers).
    "current_catalog",
    "current_database",
    "current_role",
    "current_schema",
    "current_setting",
    "current_user",
    "format_type",
    "gen_random_uuid",
    "inet_server_addr",
    "inet_server_port",
    "pg_backend_pid",
    "pg_is_in_recovery",
    "pg_last_wal_receive_lsn",
    "pg_last_wal_replay_lsn",
    "pg_last_xact_replay_timestamp",
    "pg_postmaster_start_time",
    "pg_typeof",
    "session_user",
    "user",
    "version",
];

/// SQLite's read-only built-ins besides the common ones. `changes()`, `last_insert_rowid()`
/// and `total_changes()` are left out: they answer for their own connection, which a read on
/// another one would not be.
const SQLITE_ONLY: &[&str] = &[
    // Aggregates and window functions.
    "cume_dist",
    "dense_rank",
    "first_value",
    "group_concat",
    "json_group_array",
    "json_group_object",
    "lag",
    "last_value",
    "lead",
    "nth_value",
    "ntile",
    "percent_rank",
    "rank",
    "row_number",
    "string_agg",
    "total",
    // Conditionals.
    "iif",
    "ifnull",
    "likelihood",
    "likely",
    "unlikely",
    // Strings and blobs.
    "char",
    "glob",
    "hex",
    "instr",
    "like",
    "printf",
    "quote",
    "randomblob",
    "unhex",
    "unicode",
    "zeroblob",
    // Numbers.
    "acos",
    "asin",
    "atan",
    "atan2",
    "degrees",
    "pow",
    "radians",
    // Dates and times.
    "date",
    "datetime",
    "julianday",
    "strftime",
    "time",
    "timediff",
    "unixepoch",
    // Types.
    "typeof",
    // JSON (each returns a new value; none changes a stored one).
    "json",
    "json_array",
    "json_each",
    "json_extract",
    "json_insert",
    "json_patch",
    "json_quote",
    "json_remove",
    "json_replace",
    "json_set",
    "json_tree",
    "json_type",
    "json_valid",
    "jsonb",
    "sqlite_version",
];

/// `common` followed by `only`, at compile time.
const fn const_concat<const N: usize>(
    common: &[&'static str],
    only: &[&'static str],
) -> [&'static str; N] {
    let mut all = [""; N];
    let mut i = 0;
    while i < common.len() {
        all[i] = common[i];
        i += 1;
    }
    let mut j = 0;
    while j < only.len() {
        all[i + j] = only[j];
        j += 1;
    }
    all
}

/// The `EXPLAIN (...)` options that do not make it run the statement.
const PLAN_ONLY_EXPLAIN_OPTIONS: &[&str] = &[
    "buffers",
    "costs",
    "format",
    "generic_plan",
    "memory",
    "settings",
    "summary",
    "verbose",
];

/// The route of `sql` in `dialect`: [`Route::Read`] when the statement is provably read-only,
/// else [`Route::Write`]; the [module's](self) docs state the rule. Never fails: SQL that
/// does not parse is a write.
pub fn route_of_sql(sql: &str, dialect: SqlDialect) -> Route {
    if is_read_only(sql, dialect) {
        Route::Read
    } else {
        Route::Write
    }
}

fn is_read_only(sql: &str, dialect: SqlDialect) -> bool {
    let Ok(statements) = Parser::parse_sql(dialect.parser_dialect(), sql) else {
        return false;
    };
    let [statement] = statements.as_slice() else {
        return false;
    };
    let query = match statement {
        Statement::Query(query) => query,
        Statement::Explain {
            describe_alias: DescribeAlias::Explain,
            analyze: false,
            statement,
            options,
            ..
        } if options.as_deref().is_none_or(plans_only) => match &**statement {
            Statement::Query(query) => query,
            _ => return false,
        },
        _ => return false,
    };
    let mut check = ReadOnly {
        functions: dialect.read_only_functions(),
        dialect,
    };
    query.visit(&mut check).is_continue()
}

/// Whether `EXPLAIN (options)` only plans its statement.
fn plans_only(options: &[UtilityOption]) -> bool {
    options.iter().all(|option| {
        PLAN_ONLY_EXPLAIN_OPTIONS
            .iter()
            .any(|name| option.name.value.eq_ignore_ascii_case(name))
    })
}

/// Walks a query, every node of it, and breaks at the first thing that may write.
struct ReadOnly {
    functions: &'static [&'static str],
    dialect: SqlDialect,
}

impl ReadOnly {
    fn check_function(&self, name: &ObjectName) -> ControlFlow<()> {
        if self.is_read_only_function(name) {
            ControlFlow::Continue(())
        } else {
            ControlFlow::Break(())
        }
    }

    fn is_read_only_function(&self, name: &ObjectName) -> bool {
        let function = match (self.dialect, name.0.as_slice()) {
            (_, [ObjectNamePart::Identifier(function)]) => function,
            (
                SqlDialect::Postgres,
                [
                    ObjectNamePart::Identifier(schema),
                    ObjectNamePart::Identifier(function),
                ],
            ) if (schema.quote_style.is_none()
                && schema.value.eq_ignore_ascii_case("pg_catalog"))
                || schema.value == "pg_catalog" =>
            {
                function
            }
            _ => return false,
        };
        let listed = |name: &str| self.functions.contains(&name);
        match function.quote_style {
            None => listed(&function.value.to_ascii_lowercase()),
            Some(_) => listed(&function.value),
        }
    }
}

impl Visitor for ReadOnly {
    type Break = ();

    /// A statement inside a query is a data-modifying `WITH` (or another write).
    fn pre_visit_statement(&mut self, _statement: &Statement) -> ControlFlow<()> {
        ControlFlow::Break(())
    }

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if query.locks.is_empty() && query.for_clause.is_none() {
            ControlFlow::Continue(())
        } else {
            ControlFlow::Break(())
        }
    }

    fn pre_visit_select(&mut self, select: &Select) -> ControlFlow<()> {
        if select.into.is_none() {
            ControlFlow::Continue(())
        } else {
            ControlFlow::Break(())
        }
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        match expr {
            Expr::Function(function) => self.check_function(&function.name),
            Expr::BinaryOp {
                op: BinaryOperator::PGCustomBinaryOperator(_) | BinaryOperator::Custom(_),
                ..
            } => ControlFlow::Break(()),
            _ => ControlFlow::Continue(()),
        }
    }

    fn pre_visit_table_factor(&mut self, table: &TableFactor) -> ControlFlow<()> {
        match table {
            TableFactor::Table { args: None, .. }
            | TableFactor::Derived { .. }
            | TableFactor::NestedJoin { .. }
            | TableFactor::UNNEST { .. }
            | TableFactor::TableFunction { .. }
            | TableFactor::JsonTable { .. } => ControlFlow::Continue(()),
            TableFactor::Table {
                name,
                args: Some(_),
                ..
            }
            | TableFactor::Function { name, .. } => self.check_function(name),
            // Other dialects' forms; a write for want of a proof.
            _ => ControlFlow::Break(()),
        }
    }
}
