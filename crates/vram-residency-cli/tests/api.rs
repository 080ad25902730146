//! Integration tests: one test binary (link time matters on 2 cores), one module per concern.
//! Test names say what they prove and end with the requirement IDs they prove (`..._ci_001`,
//! `..._iv_001_to_005`): `docs/requirements.md` has the rule and lists every ID with its tests, and
//! `docs::every_requirement_id_is_traced_between_test_names_and_docs_requirements_md` keeps the two
//! in step.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::must_use_candidate,
    clippy::missing_errors_doc
)]

#[path = "api/cli.rs"]
mod cli;
#[path = "api/deploy.rs"]
mod deploy;
#[path = "api/docs.rs"]
mod docs;
#[path = "api/formats.rs"]
mod formats;
#[path = "api/fsverity_oracle.rs"]
mod fsverity_oracle;
#[path = "api/gpu.rs"]
mod gpu;
#[path = "api/manager.rs"]
mod manager;
#[path = "api/model.rs"]
mod model;
#[path = "api/openapi.rs"]
mod openapi;
#[path = "api/properties.rs"]
mod properties;
#[path = "api/serve.rs"]
mod serve;
#[path = "api/support.rs"]
mod support;
#[path = "api/threat_model.rs"]
mod threat_model;
#[path = "api/vectors.rs"]
mod vectors;
