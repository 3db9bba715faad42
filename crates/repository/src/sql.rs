//! Statements built from named pieces: trusted SQL text (identifiers the engine made, fragments
//! such as the retention rule) and values, bound as parameters. A statement never counts
//! placeholders, and a fragment carries its own values wherever it is used:
//!
//! ```ignore
//! let mut sql = Sql::new("DELETE FROM {table} t WHERE t.tenant_id = {tenant} AND {due}");
//! sql.raw("table", &range.tasks_name).bind("tenant", tenant_id).with("due", rule.task_due("t", "tn"));
//! sql.build().execute(&mut *tx).await?;
//! ```
//!
//! Holes are `{name}`; `{{` and `}}` are literal braces (as in `format!`). A hole left unfilled,
//! or a piece given for no hole, is a programming error and panics when the statement is built,
//! so every statement that any test runs is checked.

use std::collections::HashMap;
use std::fmt;

use sqlx::postgres::{PgArguments, Postgres};
use sqlx::query::{Query, QueryAs, QueryScalar};
use sqlx::{Encode, QueryBuilder, Type};

/// A value to bind as a parameter.
trait Value: Send {
    fn bind_into(self: Box<Self>, builder: &mut QueryBuilder<'static, Postgres>);
}

impl<T> Value for T
where
    T: 'static + Encode<'static, Postgres> + Type<Postgres> + Send,
{
    fn bind_into(self: Box<Self>, builder: &mut QueryBuilder<'static, Postgres>) {
        builder.push_bind(*self);
    }
}

enum Part {
    Text(String),
    Value(Box<dyn Value>),
}

/// A piece of SQL with its own bound values: text and parameters in order.
#[derive(Default)]
pub struct Fragment {
    parts: Vec<Part>,
}

impl Fragment {
    /// Trusted SQL text.
    pub fn text(text: impl Into<String>) -> Fragment {
        Fragment {
            parts: vec![Part::Text(text.into())],
        }
    }

    /// A value, bound as a parameter.
    pub fn value<T>(value: T) -> Fragment
    where
        T: 'static + Encode<'static, Postgres> + Type<Postgres> + Send,
    {
        Fragment {
            parts: vec![Part::Value(Box::new(value))],
        }
    }

    /// Appends trusted SQL text.
    pub fn push(mut self, text: impl Into<String>) -> Fragment {
        self.parts.push(Part::Text(text.into()));
        self
    }

    /// Appends a value, bound as a parameter.
    pub fn bind<T>(mut self, value: T) -> Fragment
    where
        T: 'static + Encode<'static, Postgres> + Type<Postgres> + Send,
    {
        self.parts.push(Part::Value(Box::new(value)));
        self
    }

    /// Appends another fragment.
    pub fn then(mut self, other: Fragment) -> Fragment {
        self.parts.extend(other.parts);
        self
    }

    /// A template's holes filled from `pieces` (see [`Sql`]).
    fn fill(template: &str, mut pieces: HashMap<&'static str, Fragment>) -> Fragment {
        let mut out = Fragment::default();
        let mut text = String::new();
        let mut rest = template;
        while let Some(i) = rest.find(['{', '}']) {
            text.push_str(&rest[..i]);
            let brace = rest.as_bytes()[i];
            rest = &rest[i + 1..];
            if rest.as_bytes().first() == Some(&brace) {
                text.push(brace as char);
                rest = &rest[1..];
                continue;
            }
            assert!(
                brace == b'{',
                "an unmatched '}}' in a statement's template: {template}"
            );
            let end = rest.find('}').unwrap_or_else(|| {
                panic!("an unclosed '{{' in a statement's template: {template}")
            });
            let name = &rest[..end];
            rest = &rest[end + 1..];
            let piece = pieces.remove(name).unwrap_or_else(|| {
                panic!("the hole {{{name}}} of a statement was not filled: {template}")
            });
            if !text.is_empty() {
                out.parts.push(Part::Text(std::mem::take(&mut text)));
            }
            out.parts.extend(piece.parts);
        }
        text.push_str(rest);
        if !text.is_empty() {
            out.parts.push(Part::Text(text));
        }
        assert!(
            pieces.is_empty(),
            "pieces given for no hole ({:?}) of a statement: {template}",
            pieces.keys().collect::<Vec<_>>()
        );
        out
    }
}

impl fmt::Debug for Fragment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for part in &self.parts {
            match part {
                Part::Text(text) => f.write_str(text)?,
                Part::Value(_) => f.write_str("$?")?,
            }
        }
        Ok(())
    }
}

/// A statement: a template whose holes are filled by name.
pub struct Sql {
    template: &'static str,
    pieces: HashMap<&'static str, Fragment>,
    builder: Option<QueryBuilder<'static, Postgres>>,
}

impl Sql {
    pub fn new(template: &'static str) -> Sql {
        Sql {
            template,
            pieces: HashMap::new(),
            builder: None,
        }
    }

    /// Fills `{name}` with trusted SQL text (an identifier the engine made, a fixed word).
    pub fn raw(&mut self, name: &'static str, text: impl Into<String>) -> &mut Sql {
        self.with(name, Fragment::text(text))
    }

    /// Fills `{name}` with a value, bound as a parameter.
    pub fn bind<T>(&mut self, name: &'static str, value: T) -> &mut Sql
    where
        T: 'static + Encode<'static, Postgres> + Type<Postgres> + Send,
    {
        self.with(name, Fragment::value(value))
    }

    /// Fills `{name}` with a fragment and its values.
    pub fn with(&mut self, name: &'static str, fragment: Fragment) -> &mut Sql {
        assert!(
            self.pieces.insert(name, fragment).is_none(),
            "the hole {{{name}}} was filled twice: {}",
            self.template
        );
        self
    }

    fn builder(&mut self) -> &mut QueryBuilder<'static, Postgres> {
        if self.builder.is_none() {
            let filled = Fragment::fill(self.template, std::mem::take(&mut self.pieces));
            let mut builder = QueryBuilder::new("");
            for part in filled.parts {
                match part {
                    Part::Text(text) => {
                        builder.push(text);
                    }
                    Part::Value(value) => value.bind_into(&mut builder),
                }
            }
            self.builder = Some(builder);
        }
        self.builder.as_mut().expect("built")
    }

    /// The statement's text, with `$n` for its parameters.
    pub fn text(&mut self) -> &str {
        self.builder().sql()
    }

    pub fn build(&mut self) -> Query<'_, Postgres, PgArguments> {
        self.builder().build()
    }

    pub fn build_query_as<'q, T>(&'q mut self) -> QueryAs<'q, Postgres, T, PgArguments>
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
    {
        self.builder().build_query_as()
    }

    pub fn build_query_scalar<'q, T>(&'q mut self) -> QueryScalar<'q, Postgres, T, PgArguments>
    where
        (T,): for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
    {
        self.builder().build_query_scalar()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_take_text_fragments_and_values_in_order() {
        let mut sql = Sql::new("SELECT '{{}}'::int[], {a} FROM {table} WHERE x = {b} AND {c}");
        sql.bind("a", 1i64)
            .raw("table", "t")
            .bind("b", "x".to_string())
            .with("c", Fragment::text("y = ").bind(2i32).push(" OR z"));
        assert_eq!(
            sql.text(),
            "SELECT '{}'::int[], $1 FROM t WHERE x = $2 AND y = $3 OR z"
        );
    }

    #[test]
    #[should_panic(expected = "was not filled")]
    fn a_hole_left_empty_is_refused() {
        Sql::new("SELECT {a}").text();
    }

    #[test]
    #[should_panic(expected = "for no hole")]
    fn a_piece_for_no_hole_is_refused() {
        Sql::new("SELECT 1").bind("a", 1i64).text();
    }
}
