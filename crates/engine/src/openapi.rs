//! The admin API's OpenAPI 3.1 document, generated from the handlers' `#[utoipa::path]`
//! attributes and the types they answer with: served at `GET /api/v1/openapi.json` and committed
//! as `docs/openapi.json` (a test fails when the two differ; `ENGINE_WRITE_OPENAPI=1 cargo test
//! -p engine openapi` rewrites the file).

use std::sync::LazyLock;

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{RefOr, Schema};
use utoipa::{Modify, OpenApi};

use crate::http;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "engine admin API",
        description = "The retention engine's admin server (`engine serve`, `http.addr`).

The operations under `/api/v1` (except this document) need `Authorization: Bearer <http.admin_token>`: \
without it, or with another token, they answer 401; with no `http.admin_token` configured, 403. \
`/`, `/healthz`, `/readyz`, `/metrics` and `/api/v1/openapi.json` need no token: they hold no tenant data.

Every refusal and failure answers `{\"error\": \"...\"}` (the status page's, HTML), saying what was wrong and what is allowed. \
A refused request (any 4xx) or a failed one (503) changes nothing.",
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
        http::list_holds,
        http::add_hold,
        http::get_hold,
        http::remove_hold,
        http::list_receipts,
    ),
    modifiers(&Bearer, &AtLeastOneKey),
    tags(
        (name = "probes", description = "Open: liveness, readiness, metrics, the status page, this document."),
        (name = "tenants", description = "A tenant's retention windows."),
        (name = "holds", description = "Legal holds: a tenant, or one task, that no retention rule deletes while held."),
        (name = "receipts", description = "What retention runs deleted, for auditors."),
    )
)]
struct ApiDoc;

/// The `bearer` security scheme the protected operations name.
struct Bearer;

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
    }
}

/// `minProperties: 1` on the request bodies that must name at least one key. (utoipa-gen 5.5's
/// `#[schema(min_properties = ..)]` writes `maxProperties` instead.)
struct AtLeastOneKey;

impl Modify for AtLeastOneKey {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        for name in ["RetentionChange", "StatusChanges"] {
            match components.schemas.get_mut(name) {
                Some(RefOr::T(Schema::Object(object))) => object.min_properties = Some(1),
                _ => panic!("no object schema {name} in the document"),
            }
        }
    }
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
