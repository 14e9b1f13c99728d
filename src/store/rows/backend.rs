//! The one place that speaks sqlx's traits: what a database must support for the shared
//! queries to run on it, stated once, so that the queries themselves are plain functions
//! generic over [`Backend`].

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;

use sqlx::postgres::PgQueryResult;
use sqlx::query::Query;
use sqlx::sqlite::SqliteQueryResult;
use sqlx::{ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Pool, Row, Transaction, Type};

/// What running a statement gives back, later.
pub(crate) type Pending<'a, T> = Pin<Box<dyn Future<Output = Result<T, sqlx::Error>> + Send + 'a>>;

/// A database the shared queries run on (SQLite and PostgreSQL): it binds and reads
/// every column type the schema uses, and its pool and connections run statements.
pub(crate) trait Backend: Database<Row: Columns> {
    /// The sqlx query for `stmt`, its values bound in order.
    fn bound<'q>(stmt: &'q Stmt<'_>) -> Query<'q, Self, Self::Arguments<'q>>;
    /// Runs `stmt`; how many rows it changed.
    fn execute<'c>(on: On<'c, Self>, stmt: Stmt<'c>) -> Pending<'c, u64>;
    fn fetch_all<'c>(on: On<'c, Self>, stmt: Stmt<'c>) -> Pending<'c, Vec<Self::Row>>;
    fn fetch_optional<'c>(on: On<'c, Self>, stmt: Stmt<'c>) -> Pending<'c, Option<Self::Row>>;
    /// Hands each row to `each` as it arrives, none kept (a million keys at start); stops
    /// at the first error, the database's (outer) or `each`'s (inner).
    fn for_each<'c, E: Send + 'c>(
        on: On<'c, Self>,
        stmt: Stmt<'c>,
        each: impl FnMut(Self::Row) -> Result<(), E> + Send + 'c,
    ) -> Pending<'c, Result<(), E>>;
}

impl<D> Backend for D
where
    D: Database<Row: Columns, QueryResult: RowsAffected>,
    for<'c> &'c mut D::Connection: Executor<'c, Database = D>,
    for<'q> D::Arguments<'q>: IntoArguments<'q, D>,
    for<'q> Option<&'q str>: Encode<'q, D> + Type<D>,
    for<'q> Option<i64>: Encode<'q, D> + Type<D>,
    for<'q> &'q [u8]: Encode<'q, D> + Type<D>,
    for<'q> bool: Encode<'q, D> + Type<D>,
{
    fn bound<'q>(stmt: &'q Stmt<'_>) -> Query<'q, D, D::Arguments<'q>> {
        stmt.args.iter().fold(sqlx::query(&stmt.sql), |q, arg| match arg {
            Arg::Text(v) => q.bind(v.as_deref()),
            Arg::Int(v) => q.bind(*v),
            Arg::Bytes(v) => q.bind(*v),
            Arg::Bool(v) => q.bind(*v),
        })
    }

    fn execute<'c>(on: On<'c, D>, stmt: Stmt<'c>) -> Pending<'c, u64> {
        Box::pin(async move {
            let done = match on {
                On::Pool(pool) => D::bound(&stmt).execute(pool).await?,
                On::Conn(conn) => D::bound(&stmt).execute(conn).await?,
            };
            Ok(done.rows_affected())
        })
    }

    fn fetch_all<'c>(on: On<'c, D>, stmt: Stmt<'c>) -> Pending<'c, Vec<D::Row>> {
        Box::pin(async move {
            match on {
                On::Pool(pool) => D::bound(&stmt).fetch_all(pool).await,
                On::Conn(conn) => D::bound(&stmt).fetch_all(conn).await,
            }
        })
    }

    fn fetch_optional<'c>(on: On<'c, D>, stmt: Stmt<'c>) -> Pending<'c, Option<D::Row>> {
        Box::pin(async move {
            match on {
                On::Pool(pool) => D::bound(&stmt).fetch_optional(pool).await,
                On::Conn(conn) => D::bound(&stmt).fetch_optional(conn).await,
            }
        })
    }

    fn for_each<'c, E: Send + 'c>(
        on: On<'c, D>,
        stmt: Stmt<'c>,
        mut each: impl FnMut(D::Row) -> Result<(), E> + Send + 'c,
    ) -> Pending<'c, Result<(), E>> {
        use tokio_stream::StreamExt;
        Box::pin(async move {
            let mut rows = match on {
                On::Pool(pool) => D::bound(&stmt).fetch(pool),
                On::Conn(conn) => D::bound(&stmt).fetch(conn),
            };
            while let Some(row) = rows.next().await {
                if let Err(e) = each(row?) {
                    return Ok(Err(e));
                }
            }
            Ok(Ok(()))
        })
    }
}

/// The rows a statement changed: each backend's result has it, no sqlx trait does.
pub(crate) trait RowsAffected {
    fn rows_affected(&self) -> u64;
}

impl RowsAffected for SqliteQueryResult {
    fn rows_affected(&self) -> u64 {
        SqliteQueryResult::rows_affected(self)
    }
}

impl RowsAffected for PgQueryResult {
    fn rows_affected(&self) -> u64 {
        PgQueryResult::rows_affected(self)
    }
}

/// Where a statement runs: on the pool, or in a transaction.
pub(crate) enum On<'c, D: Database> {
    Pool(&'c Pool<D>),
    Conn(&'c mut D::Connection),
}

impl<'c, D: Database> From<&'c Pool<D>> for On<'c, D> {
    fn from(pool: &'c Pool<D>) -> Self {
        On::Pool(pool)
    }
}

impl<'c, D: Database> From<&'c mut Transaction<'_, D>> for On<'c, D> {
    fn from(tx: &'c mut Transaction<'_, D>) -> Self {
        On::Conn(&mut **tx)
    }
}

/// One statement: its SQL, the same text on every backend, and the values it binds.
pub(crate) struct Stmt<'a> {
    sql: Cow<'a, str>,
    args: Vec<Arg<'a>>,
}

/// A statement with nothing bound yet.
pub(crate) fn query<'a>(sql: impl Into<Cow<'a, str>>) -> Stmt<'a> {
    Stmt { sql: sql.into(), args: Vec::new() }
}

impl<'a> Stmt<'a> {
    /// Binds the next parameter (`$1`, then `$2`, ...).
    pub(crate) fn bind(mut self, value: impl Into<Arg<'a>>) -> Self {
        self.args.push(value.into());
        self
    }

    /// Runs the statement; how many rows it changed.
    pub(crate) fn execute<'c, D: Backend>(self, on: impl Into<On<'c, D>>) -> Pending<'c, u64>
    where
        'a: 'c,
    {
        D::execute(on.into(), self)
    }

    pub(crate) fn fetch_all<'c, D: Backend>(self, on: impl Into<On<'c, D>>) -> Pending<'c, Vec<D::Row>>
    where
        'a: 'c,
    {
        D::fetch_all(on.into(), self)
    }

    pub(crate) fn fetch_optional<'c, D: Backend>(self, on: impl Into<On<'c, D>>) -> Pending<'c, Option<D::Row>>
    where
        'a: 'c,
    {
        D::fetch_optional(on.into(), self)
    }

    /// See [`Backend::for_each`].
    pub(crate) fn for_each<'c, D: Backend, E: Send + 'c>(
        self,
        on: impl Into<On<'c, D>>,
        each: impl FnMut(D::Row) -> Result<(), E> + Send + 'c,
    ) -> Pending<'c, Result<(), E>>
    where
        'a: 'c,
    {
        D::for_each(on.into(), self, each)
    }
}

/// A value bound to a statement, of a column type the schema uses. Text and integers
/// are bound as `Option`s: `Some(v)` encodes as `v` does, on both backends.
pub(crate) enum Arg<'a> {
    Text(Option<Cow<'a, str>>),
    Int(Option<i64>),
    Bytes(&'a [u8]),
    Bool(bool),
}

impl<'a> From<&'a str> for Arg<'a> {
    fn from(v: &'a str) -> Self {
        Arg::Text(Some(Cow::Borrowed(v)))
    }
}

impl<'a> From<&'a String> for Arg<'a> {
    fn from(v: &'a String) -> Self {
        Arg::Text(Some(Cow::Borrowed(v)))
    }
}

impl From<String> for Arg<'_> {
    fn from(v: String) -> Self {
        Arg::Text(Some(Cow::Owned(v)))
    }
}

impl<'a> From<Option<&'a str>> for Arg<'a> {
    fn from(v: Option<&'a str>) -> Self {
        Arg::Text(v.map(Cow::Borrowed))
    }
}

impl From<Option<String>> for Arg<'_> {
    fn from(v: Option<String>) -> Self {
        Arg::Text(v.map(Cow::Owned))
    }
}

impl From<i64> for Arg<'_> {
    fn from(v: i64) -> Self {
        Arg::Int(Some(v))
    }
}

impl From<Option<i64>> for Arg<'_> {
    fn from(v: Option<i64>) -> Self {
        Arg::Int(v)
    }
}

impl<'a> From<&'a [u8]> for Arg<'a> {
    fn from(v: &'a [u8]) -> Self {
        Arg::Bytes(v)
    }
}

impl From<bool> for Arg<'_> {
    fn from(v: bool) -> Self {
        Arg::Bool(v)
    }
}

/// Reads a column as a `T`.
pub(crate) trait Read<T> {
    fn read(&self, col: &str) -> Result<T, sqlx::Error>;
}

impl<R: Row, T> Read<T> for R
where
    T: for<'r> Decode<'r, R::Database> + Type<R::Database>,
    for<'c> &'c str: ColumnIndex<R>,
{
    fn read(&self, col: &str) -> Result<T, sqlx::Error> {
        self.try_get(col)
    }
}

/// A row of a [`Backend`]: every column type the schema uses reads from it.
pub(crate) trait Columns:
    Read<String> + Read<Option<String>> + Read<i64> + Read<Option<i64>> + Read<bool> + Read<Vec<u8>> + Read<Option<Vec<u8>>>
{
}

impl<R> Columns for R where
    R: Read<String>
        + Read<Option<String>>
        + Read<i64>
        + Read<Option<i64>>
        + Read<bool>
        + Read<Vec<u8>>
        + Read<Option<Vec<u8>>>
{
}

/// `VALUES` rows of `rows` tuples, one parameter per entry of `types` each (`column1`,
/// `column2`, ... in both backends), in order: numbered `$1`, `$2`, ... for PostgreSQL,
/// plain `?` for SQLite, which looks a numbered or named parameter up by a linear search
/// (thousands of them made a flush ten times slower). A parameter with a type is cast to
/// it (a `VALUES` list joined to a table needs its columns typed); `""` leaves it as is
/// (an `INSERT`'s columns type it).
pub(crate) fn values<D: Backend>(rows: usize, types: &[&str]) -> String {
    let numbered = D::NAME != "SQLite";
    let mut sql = String::with_capacity(rows * types.len() * 24);
    let mut n = 0;
    for r in 0..rows {
        sql.push_str(if r == 0 { "(" } else { ", (" });
        for (i, t) in types.iter().enumerate() {
            n += 1;
            if i > 0 {
                sql.push_str(", ");
            }
            let param = if numbered { format!("${n}") } else { "?".to_string() };
            match *t {
                "" => sql.push_str(&param),
                t => sql.push_str(&format!("CAST({param} AS {t})")),
            }
        }
        sql.push(')');
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_rows_are_numbered_in_order() {
        let pg = values::<sqlx::Postgres>(2, &["TEXT", "BIGINT"]);
        assert_eq!(pg, "(CAST($1 AS TEXT), CAST($2 AS BIGINT)), (CAST($3 AS TEXT), CAST($4 AS BIGINT))");
        let lite = values::<sqlx::Sqlite>(2, &["TEXT", "BIGINT"]);
        assert_eq!(lite, "(CAST(? AS TEXT), CAST(? AS BIGINT)), (CAST(? AS TEXT), CAST(? AS BIGINT))");
        assert_eq!(values::<sqlx::Postgres>(2, &["", ""]), "($1, $2), ($3, $4)", "untyped");
        assert_eq!(values::<sqlx::Sqlite>(1, &["", ""]), "(?, ?)");
    }
}
