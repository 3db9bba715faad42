//! The admin API's OpenAPI 3.1 document, generated from the handlers' `#[utoipa::path]`
//! attributes and the types they answer with: served at `GET /api/v1/openapi.json` and committed
//! as `docs/openapi.json` (a test fails when the two differ; `ENGINE_WRITE_OPENAPI=1 cargo test
//! -p engine --bin engine openapi` rewrites the file).

use std::sync::LazyLock;

use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Content, Object, Ref, RefOr, Response, Schema, Type};
use utoipa::{Modify, OpenApi};

use crate::{http, http_limits};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "engine admin API",
        description = "The retention engine's admin server (`engine serve`, `http.addr`).

The operations under `/api/v1` (except this document) need `Authorization: Bearer <http.admin_token>`: \
without it, or with another token, they answer 401; with no `http.admin_token` configured, 403. \
`/`, `/healthz`, `/readyz`, `/metrics` and `/api/v1/openapi.json` need no token: they hold no tenant data.

Every refusal and failure answers `{\"error\": \"...\"}` (the status page's, HTML), saying what was wrong and what is allowed. \
A refused request (any 4xx) changes nothing, nor does a 503 for an unreachable database or a busy server; \
a change answered 503 past its deadline (`http.request_timeout`) may still be made: read it back.

Every operation is guarded (docs/operations.md, \"Exposing the admin server\"): a request head (target and headers) \
over `http.max_header_bytes` is answered 431, a body over `http.max_body_bytes` 413, a body cut off before its \
declared end 400, a request not answered within `http.request_timeout` 503; an operation that reads the database \
answers 503 with `Retry-After: 1` when all `http.max_connections` of the server's connections stayed taken for 1 s \
(`/readyz`: when another readiness check holds its own). Each names the key.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        http::status_page,
        http::healthz,
        http::readyz,
        http::metrics,
        http::openapi_document,
        http::get_retention,
        http::put_retention,
        http::get_archive,
        http::put_archive,
        http::list_holds,
        http::add_hold,
        http::get_hold,
        http::remove_hold,
        http::list_receipts,
    ),
    modifiers(&Bearer, &AtLeastOneKey, &GuardAnswers),
    tags(
        (name = "probes", description = "Open: liveness, readiness, metrics, the status page, this document."),
        (name = "tenants", description = "A tenant's retention windows and archive policy."),
        (name = "holds", description = "Legal holds: a tenant, or one task, that no retention rule deletes while held."),
        (name = "receipts", description = "What retention runs deleted, for auditors."),
    )
)]
struct ApiDoc;

/// The `bearer` security scheme the protected operations name, and what `require_token`
/// answers on each of them: 401 (no or another token) and 403 (the API disabled).
struct Bearer;

const UNAUTHORIZED: &str =
    "No `Authorization: Bearer <http.admin_token>` header, or another token.";
const FORBIDDEN: &str = "The admin API is disabled: `http.admin_token` is not set.";

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("`http.admin_token`"))
                    .build(),
            ),
        );
        for item in openapi.paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for operation in operations.into_iter().flatten() {
                let secured = operation
                    .security
                    .as_ref()
                    .is_some_and(|all| !all.is_empty());
                if !secured {
                    continue;
                }
                let mut unauthorized = error_response(UNAUTHORIZED);
                unauthorized.headers.insert(
                    "WWW-Authenticate".into(),
                    HeaderBuilder::new()
                        .schema(Object::with_type(Type::String))
                        .description(Some("`Bearer`"))
                        .build(),
                );
                let responses = &mut operation.responses.responses;
                responses.insert("401".into(), RefOr::T(unauthorized));
                responses.insert("403".into(), RefOr::T(error_response(FORBIDDEN)));
            }
        }
    }
}

/// `minProperties: 1` on the request bodies that must name at least one key. (utoipa-gen 5.5's
/// `#[schema(min_properties = ..)]` writes `maxProperties` instead.)
struct AtLeastOneKey;

impl Modify for AtLeastOneKey {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        for name in ["RetentionChange", "StatusChanges", "ArchiveChange"] {
            match components.schemas.get_mut(name) {
                Some(RefOr::T(Schema::Object(object))) => object.min_properties = Some(1),
                _ => panic!("no object schema {name} in the document"),
            }
        }
    }
}

/// The answers of [`http_limits::guard`], which stands in front of every route: 431, 413, a 400
/// for a body cut off and a 503 past the deadline on every operation, and the 503 of a busy
/// server (with `Retry-After`) on those that use the database. Where an operation answers 400
/// or 503 itself, the guard's causes are added to the description.
struct GuardAnswers;

const HEAD_TOO_LARGE: &str = "The request's target and headers together are larger than \
    `http.max_header_bytes` (16 KiB by default); no handler ran, nothing was changed. (A head \
    larger than the server's read buffer, from 264 KiB on, may be refused by the HTTP layer \
    itself: 431 with no body.)";
const BODY_TOO_LARGE: &str = "The request body is larger than `http.max_body_bytes` (64 KiB by \
    default); no handler ran, nothing was changed.";
const CUT_OFF: &str = "the request body was cut off before its declared end (no handler ran, \
    nothing was changed)";
const PAST_DEADLINE: &str = "the request took longer than `http.request_timeout` (30 s by default)";
const PAST_DEADLINE_CHANGING: &str = "the request took longer than `http.request_timeout` (30 s \
    by default): a change it had begun may still be made, read it back";
const BUSY: &str = "the server is busy: all `http.max_connections` of its database connections \
    stayed taken for 1 s (`Retry-After: 1`; nothing was changed)";
const READINESS_BUSY: &str = "another readiness check has been waiting on the database for 1 s \
    (`Retry-After: 1`)";

impl Modify for GuardAnswers {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for (path, item) in openapi.paths.paths.iter_mut() {
            let operations = [
                ("GET", &mut item.get),
                ("PUT", &mut item.put),
                ("POST", &mut item.post),
                ("DELETE", &mut item.delete),
                ("PATCH", &mut item.patch),
                ("HEAD", &mut item.head),
                ("OPTIONS", &mut item.options),
                ("TRACE", &mut item.trace),
            ];
            for (method, operation) in operations {
                let Some(operation) = operation else { continue };
                let what = format!("{method} {path}");
                let changes = !matches!(method, "GET" | "HEAD" | "OPTIONS" | "TRACE");
                let responses = &mut operation.responses.responses;
                for (status, description) in [("413", BODY_TOO_LARGE), ("431", HEAD_TOO_LARGE)] {
                    let previous =
                        responses.insert(status.into(), RefOr::T(error_response(description)));
                    assert!(previous.is_none(), "{what} documents {status} itself");
                }
                add_cause(responses, "400", CUT_OFF, &what);
                let deadline = if changes {
                    PAST_DEADLINE_CHANGING
                } else {
                    PAST_DEADLINE
                };
                add_cause(responses, "503", deadline, &what);
                let busy = if path == http_limits::READINESS {
                    READINESS_BUSY
                } else {
                    BUSY
                };
                if !http_limits::without_database(path) {
                    let unavailable = add_cause(responses, "503", busy, &what);
                    let retry_after = HeaderBuilder::new()
                        .schema(Object::with_type(Type::Integer))
                        .description(Some(
                            "Seconds to wait before trying again: `1`, when the server is busy.",
                        ))
                        .build();
                    unavailable
                        .headers
                        .insert("Retry-After".into(), retry_after);
                }
            }
        }
    }
}

/// Adds `cause` to what the response with `status` says (making it if there is none), and the
/// guard's JSON body to its content (also where the operation's own is a page).
fn add_cause<'a>(
    responses: &'a mut std::collections::BTreeMap<String, RefOr<Response>>,
    status: &str,
    cause: &str,
    what: &str,
) -> &'a mut Response {
    let response = responses
        .entry(status.to_string())
        .or_insert_with(|| RefOr::T(error_response("")));
    let RefOr::T(response) = response else {
        panic!("{what}: a {status} by reference");
    };
    let mut causes: Vec<String> = Vec::new();
    if !response.description.is_empty() {
        causes.push(response.description.trim_end_matches('.').to_string());
    }
    causes.push(cause.to_string());
    response.description = sentence(&causes);
    response
        .content
        .entry("application/json".into())
        .or_insert_with(error_content);
    response
}

/// A response of [`http::ErrorBody`] as JSON.
fn error_response(description: &str) -> Response {
    let mut response = Response::new(description);
    response
        .content
        .insert("application/json".into(), error_content());
    response
}

fn error_content() -> Content {
    Content::new(Some(Ref::from_schema_name("ErrorBody")))
}

/// "A; or b; or c." from causes written as sentences' beginnings ("A", "b", "c").
fn sentence(causes: &[String]) -> String {
    let mut text = causes.join("; or ");
    if let Some(first) = text.get(..1) {
        text.replace_range(..1, &first.to_uppercase());
    }
    text.push('.');
    text
}

/// The document as served and committed: pretty-printed JSON, ending in a newline.
pub fn document() -> &'static str {
    static DOCUMENT: LazyLock<String> = LazyLock::new(|| {
        let mut api = ApiDoc::openapi();
        api.info.version = env!("CARGO_PKG_VERSION").to_string();
        let mut text = api
            .to_pretty_json()
            .expect("the OpenAPI document serializes");
        text.push('\n');
        text
    });
    &DOCUMENT
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    /// docs/openapi.json is what the code generates. `ENGINE_WRITE_OPENAPI=1` rewrites it.
    #[test]
    fn the_committed_document_is_the_generated_one() {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
        let generated = super::document();
        if std::env::var_os("ENGINE_WRITE_OPENAPI").is_some_and(|v| v == "1") {
            std::fs::write(&path, generated).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "{} is not what the code generates: regenerate it with \
             `ENGINE_WRITE_OPENAPI=1 cargo test -p engine --bin engine openapi` and commit it",
            path.display()
        );
    }
}
