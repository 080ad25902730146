//! `docs/openapi.yaml` is checked against the real service: every documented route is called on a
//! running `serve` (sim backend), for every documented status that a client can provoke, and each
//! answer's media type and JSON body are validated against the schema documented for that path,
//! method and status.
//!
//! The validator is a strict subset of OpenAPI 3.0 schemas, written here rather than taken from a
//! JSON Schema crate: `jsonschema` (even without default features) brings ~40 crates into a build
//! on 2 cores, and OpenAPI 3.0 is not JSON Schema anyway (`nullable`, `$ref` into
//! `#/components/...`). It knows `$ref`, `type`, `nullable`, `enum`, `properties`, `required`,
//! `additionalProperties`, `items`, `minItems`, `maxItems`, `minimum`, `minLength`, `maxLength`,
//! `pattern` (regex-lite), `format` (`int32`, `int64`, `date-time`, `byte`) and `oneOf`, and it
//! refuses any other keyword, so a schema it cannot check fails instead of passing. Two rules are
//! stricter than JSON Schema, so that drift in either direction fails: a property that a response
//! schema does not declare is an error (as if `additionalProperties: false`), and every property a
//! response schema declares must be `required` (the service always sends every field; one that
//! can be empty is `nullable`).

use std::collections::BTreeSet;

use base64::Engine as _;
use serde_json::{Map, Value, json};

use crate::serve::{Home, OBSERVER_TOKEN, Reply, bearer};
use crate::support::repo_path;

/// Schema keywords that only annotate.
const ANNOTATIONS: [&str; 6] = [
    "description",
    "example",
    "default",
    "title",
    "deprecated",
    "readOnly",
];
/// Schema keywords the validator checks.
const KEYWORDS: [&str; 16] = [
    "type",
    "nullable",
    "enum",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "minItems",
    "maxItems",
    "minimum",
    "minLength",
    "maxLength",
    "pattern",
    "format",
    "oneOf",
    "$ref",
];

/// The document, and the (path, method, status) triples the test has checked.
pub struct Contract {
    doc: Value,
    checked: BTreeSet<(String, String, u16)>,
}

/// Follows `$ref` (local references only) to the node it names.
fn resolve<'a>(doc: &'a Value, mut node: &'a Value) -> Result<&'a Value, String> {
    for _ in 0..16 {
        let Some(reference) = node.get("$ref") else {
            return Ok(node);
        };
        let reference = reference
            .as_str()
            .ok_or_else(|| format!("$ref is not a string: {reference}"))?;
        if node.as_object().is_some_and(|o| o.len() != 1) {
            return Err(format!(
                "$ref {reference} has sibling keywords, which OpenAPI 3.0 ignores: move them"
            ));
        }
        let pointer = reference
            .strip_prefix('#')
            .ok_or_else(|| format!("$ref {reference} is not local to the document"))?;
        node = doc
            .pointer(pointer)
            .ok_or_else(|| format!("$ref {reference} names nothing in the document"))?;
    }
    Err("$ref chain longer than 16".to_owned())
}

struct Validator<'a> {
    doc: &'a Value,
    errors: Vec<String>,
}

impl Validator<'_> {
    fn fail(&mut self, at: &str, what: impl std::fmt::Display) {
        self.errors.push(format!("{at}: {what}"));
    }

    /// Validates `value` (at JSON path `at`) against `schema`.
    fn check(&mut self, schema: &Value, value: &Value, at: &str) {
        let schema = match resolve(self.doc, schema) {
            Ok(schema) => schema,
            Err(error) => return self.fail(at, error),
        };
        let Some(keywords) = schema.as_object() else {
            return self.fail(at, format!("the schema is not an object: {schema}"));
        };
        for key in keywords.keys() {
            if !KEYWORDS.contains(&key.as_str())
                && !ANNOTATIONS.contains(&key.as_str())
                && !key.starts_with("x-")
            {
                self.fail(
                    at,
                    format!("schema keyword `{key}` is not known to this validator: teach it"),
                );
            }
        }
        if value.is_null() && keywords.get("nullable") == Some(&Value::Bool(true)) {
            return;
        }
        if let Some(enumeration) = keywords.get("enum") {
            let allowed = enumeration.as_array().cloned().unwrap_or_default();
            if !allowed.contains(value) {
                self.fail(at, format!("{value} is not one of {enumeration}"));
            }
        }
        if let Some(choices) = keywords.get("oneOf") {
            let matching = choices
                .as_array()
                .into_iter()
                .flatten()
                .filter(|choice| {
                    let mut inner = Validator {
                        doc: self.doc,
                        errors: Vec::new(),
                    };
                    inner.check(choice, value, at);
                    inner.errors.is_empty()
                })
                .count();
            if matching != 1 {
                self.fail(at, format!("{value} matches {matching} of oneOf, not 1"));
            }
            if !keywords.contains_key("type") {
                return;
            }
        }
        let Some(kind) = keywords.get("type").and_then(Value::as_str) else {
            return self.fail(at, "the schema has no `type` (nor `$ref`, `oneOf`)");
        };
        match kind {
            "object" => self.check_object(keywords, value, at),
            "array" => self.check_array(keywords, value, at),
            "string" => self.check_string(keywords, value, at),
            "integer" => self.check_integer(keywords, value, at),
            "number" => {
                if !value.is_number() {
                    self.fail(at, format!("{value} is not a number"));
                }
                self.check_minimum(keywords, value, at);
            }
            "boolean" => {
                if !value.is_boolean() {
                    self.fail(at, format!("{value} is not a boolean"));
                }
            }
            other => self.fail(at, format!("unknown type `{other}`")),
        }
    }

    fn check_object(&mut self, keywords: &Map<String, Value>, value: &Value, at: &str) {
        let Some(object) = value.as_object() else {
            return self.fail(at, format!("{value} is not an object"));
        };
        let empty = Map::new();
        let properties = keywords
            .get("properties")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let required: Vec<&str> = keywords
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        for name in &required {
            if !properties.contains_key(*name) {
                self.fail(at, format!("`{name}` is required but not declared"));
            }
            if !object.contains_key(*name) {
                self.fail(at, format!("the required property `{name}` is missing"));
            }
        }
        for name in properties.keys() {
            if !required.contains(&name.as_str()) {
                self.fail(
                    at,
                    format!(
                        "the schema declares `{name}` without requiring it; responses always \
                         carry every field: add it to `required` (with `nullable: true` if it can \
                         be null)"
                    ),
                );
            }
        }
        for (name, item) in object {
            let path = format!("{at}.{name}");
            match (properties.get(name), keywords.get("additionalProperties")) {
                (Some(schema), _) => self.check(schema, item, &path),
                (None, Some(Value::Bool(true))) => {}
                (None, Some(schema @ Value::Object(_))) => self.check(schema, item, &path),
                (None, _) => self.fail(
                    &path,
                    "the service sends this property, the schema does not declare it",
                ),
            }
        }
    }

    fn check_array(&mut self, keywords: &Map<String, Value>, value: &Value, at: &str) {
        let Some(items) = value.as_array() else {
            return self.fail(at, format!("{value} is not an array"));
        };
        let len = items.len() as u64;
        if let Some(min) = keywords.get("minItems").and_then(Value::as_u64)
            && len < min
        {
            self.fail(at, format!("{len} items, fewer than minItems {min}"));
        }
        if let Some(max) = keywords.get("maxItems").and_then(Value::as_u64)
            && len > max
        {
            self.fail(at, format!("{len} items, more than maxItems {max}"));
        }
        let Some(schema) = keywords.get("items") else {
            return self.fail(at, "an array schema without `items`");
        };
        for (i, item) in items.iter().enumerate() {
            self.check(schema, item, &format!("{at}[{i}]"));
        }
    }

    fn check_string(&mut self, keywords: &Map<String, Value>, value: &Value, at: &str) {
        let Some(text) = value.as_str() else {
            return self.fail(at, format!("{value} is not a string"));
        };
        let chars = text.chars().count() as u64;
        if let Some(min) = keywords.get("minLength").and_then(Value::as_u64)
            && chars < min
        {
            self.fail(at, format!("{value} is shorter than minLength {min}"));
        }
        if let Some(max) = keywords.get("maxLength").and_then(Value::as_u64)
            && chars > max
        {
            self.fail(at, format!("{value} is longer than maxLength {max}"));
        }
        if let Some(pattern) = keywords.get("pattern").and_then(Value::as_str) {
            match regex_lite::Regex::new(pattern) {
                Ok(regex) if regex.is_match(text) => {}
                Ok(_) => self.fail(at, format!("{value} does not match {pattern}")),
                Err(error) => self.fail(at, format!("pattern {pattern} does not parse: {error}")),
            }
        }
        let conforms = match keywords.get("format").and_then(Value::as_str) {
            None => Ok(()),
            Some("date-time") => humantime::parse_rfc3339(text)
                .map(drop)
                .map_err(|_| "an RFC 3339 date-time"),
            Some("byte") => base64::engine::general_purpose::STANDARD
                .decode(text)
                .map(drop)
                .map_err(|_| "base64"),
            Some(other) => {
                return self.fail(at, format!("unknown string format `{other}`"));
            }
        };
        if let Err(what) = conforms {
            self.fail(at, format!("{value} is not {what}"));
        }
    }

    fn check_integer(&mut self, keywords: &Map<String, Value>, value: &Value, at: &str) {
        if !(value.is_i64() || value.is_u64()) {
            return self.fail(at, format!("{value} is not an integer"));
        }
        let fits = match keywords.get("format").and_then(Value::as_str) {
            None => true,
            Some("int64") => value.as_i64().is_some(),
            Some("int32") => value.as_i64().and_then(|v| i32::try_from(v).ok()).is_some(),
            Some(other) => {
                return self.fail(at, format!("unknown integer format `{other}`"));
            }
        };
        if !fits {
            self.fail(at, format!("{value} does not fit its format"));
        }
        self.check_minimum(keywords, value, at);
    }

    fn check_minimum(&mut self, keywords: &Map<String, Value>, value: &Value, at: &str) {
        if let (Some(min), Some(v)) = (
            keywords.get("minimum").and_then(Value::as_f64),
            value.as_f64(),
        ) && v < min
        {
            self.fail(at, format!("{value} is below minimum {min}"));
        }
    }
}

/// The errors of validating `value` against `schema` (a node of `doc`); empty when it conforms.
fn validate(doc: &Value, schema: &Value, value: &Value) -> Vec<String> {
    let mut validator = Validator {
        doc,
        errors: Vec::new(),
    };
    validator.check(schema, value, "$");
    validator.errors
}

impl Contract {
    pub fn load() -> Self {
        let text = std::fs::read_to_string(repo_path("docs/openapi.yaml")).unwrap();
        let doc: Value = serde_norway::from_str(&text)
            .unwrap_or_else(|e| panic!("docs/openapi.yaml does not parse as YAML: {e}"));
        assert!(
            doc["openapi"]
                .as_str()
                .is_some_and(|v| v.starts_with("3.0.")),
            "docs/openapi.yaml is not OpenAPI 3.0"
        );
        Self {
            doc,
            checked: BTreeSet::new(),
        }
    }

    /// Every (path, method, status) the document describes.
    pub fn documented(&self) -> BTreeSet<(String, String, u16)> {
        let mut all = BTreeSet::new();
        for (path, item) in self.doc["paths"].as_object().unwrap() {
            for (method, operation) in item.as_object().unwrap() {
                if method == "parameters" {
                    continue;
                }
                for status in operation["responses"].as_object().unwrap().keys() {
                    let status: u16 = status
                        .parse()
                        .unwrap_or_else(|_| panic!("{method} {path}: response key {status}"));
                    all.insert((path.clone(), method.clone(), status));
                }
            }
        }
        all
    }

    /// Checks `reply` to `method template` (a path of the document, `{id}` and all) against the
    /// response documented for its status: the media type, and the body against the schema.
    pub fn check(&mut self, method: &str, template: &str, reply: &Reply) {
        let method = method.to_lowercase();
        let call = format!("{} {template} -> {}", method.to_uppercase(), reply.status);
        let operation = &self.doc["paths"][template][&method];
        assert!(
            operation.is_object(),
            "{call}: the operation is not in docs/openapi.yaml"
        );
        let response = operation["responses"]
            .get(reply.status.to_string())
            .unwrap_or_else(|| {
                panic!(
                    "{call}: docs/openapi.yaml documents no such status; the service answered {}",
                    reply.text
                )
            });
        let response = resolve(&self.doc, response).unwrap_or_else(|e| panic!("{call}: {e}"));
        self.check_content(&call, response, reply);
        self.checked
            .insert((template.to_owned(), method, reply.status));
    }

    /// Checks an answer that belongs to no documented path (an unknown route, a refused method)
    /// against the one error shape, `components.schemas.Error`.
    pub fn check_error_shape(&self, reply: &Reply) {
        let call = format!("an error answer {}", reply.status);
        let response = json!({"content": {"application/json": {"schema": {
            "$ref": "#/components/schemas/Error"
        }}}});
        self.check_content(&call, &response, reply);
    }

    fn check_content(&self, call: &str, response: &Value, reply: &Reply) {
        let content = response["content"]
            .as_object()
            .unwrap_or_else(|| panic!("{call}: the documented response has no content"));
        let media = content.get(&reply.media_type).unwrap_or_else(|| {
            panic!(
                "{call}: answered `{}`, documented {:?}",
                reply.media_type,
                content.keys().collect::<Vec<_>>()
            )
        });
        let schema = &media["schema"];
        if reply.media_type == "application/json" {
            let body: Value = serde_json::from_str(&reply.text)
                .unwrap_or_else(|e| panic!("{call}: the body is not JSON ({e}): {}", reply.text));
            let errors = validate(&self.doc, schema, &body);
            assert!(
                errors.is_empty(),
                "{call}: the body does not match docs/openapi.yaml:\n  {}\nbody: {}",
                errors.join("\n  "),
                reply.text
            );
        } else {
            assert_eq!(
                schema["type"], "string",
                "{call}: a non-JSON body must be documented as a string"
            );
            assert!(!reply.text.is_empty(), "{call}: empty body");
        }
    }
}

#[test]
fn the_validator_refuses_wrong_types_missing_and_undeclared_properties_and_unknown_keywords() {
    let doc = json!({"components": {"schemas": {
        "Thing": {
            "type": "object",
            "required": ["id", "size", "tag", "when"],
            "properties": {
                "id": {"type": "string", "pattern": "^[a-z]{1,8}$"},
                "size": {"type": "integer", "format": "int64", "minimum": 0},
                "tag": {"type": "string", "nullable": true, "enum": ["a", "b"]},
                "when": {"type": "string", "format": "date-time"}
            }
        },
        "Loose": {"type": "object", "properties": {"x": {"type": "string"}}},
        "Odd": {"type": "string", "const": "x"}
    }}});
    let thing = json!({"$ref": "#/components/schemas/Thing"});
    let good = json!({"id": "abc", "size": 3, "tag": null, "when": "2026-01-02T03:04:05.678Z"});
    assert_eq!(validate(&doc, &thing, &good), Vec::<String>::new());
    let cases = [
        (
            json!({"id": "abc", "size": 3, "tag": "a"}),
            "`when` is missing",
        ),
        (
            json!({"id": "ABC", "size": 3, "tag": "a", "when": "2026-01-02T03:04:05Z"}),
            "does not match",
        ),
        (
            json!({"id": "abc", "size": -1, "tag": "a", "when": "2026-01-02T03:04:05Z"}),
            "below minimum",
        ),
        (
            json!({"id": "abc", "size": 1.5, "tag": "a", "when": "2026-01-02T03:04:05Z"}),
            "not an integer",
        ),
        (
            json!({"id": "abc", "size": 1, "tag": "c", "when": "2026-01-02T03:04:05Z"}),
            "is not one of",
        ),
        (
            json!({"id": "abc", "size": 1, "tag": "a", "when": "yesterday"}),
            "not an RFC 3339",
        ),
        (
            json!({"id": "abc", "size": 1, "tag": "a", "when": "2026-01-02T03:04:05Z", "ptr": 1}),
            "does not declare it",
        ),
    ];
    for (value, expected) in cases {
        let errors = validate(&doc, &thing, &value).join("\n");
        assert!(errors.contains(expected), "{value}: {errors}");
    }
    let loose = json!({"$ref": "#/components/schemas/Loose"});
    assert!(
        validate(&doc, &loose, &json!({"x": "y"}))
            .join("\n")
            .contains("without requiring it")
    );
    let odd = json!({"$ref": "#/components/schemas/Odd"});
    assert!(
        validate(&doc, &odd, &json!("x"))
            .join("\n")
            .contains("`const` is not known")
    );
    let dangling = json!({"$ref": "#/components/schemas/Nope"});
    assert!(
        validate(&doc, &dangling, &json!(1))
            .join("\n")
            .contains("names nothing")
    );
}

/// POSTs to `path` on a raw connection, sends one byte of a 100-byte JSON body and then nothing, and
/// returns the answer the server gives before it closes the connection.
fn trickled_post(address: &str, path: &str, authorization: &str) -> Reply {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: {authorization}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut raw = Vec::new();
    match stream.read_to_end(&mut raw) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("{path}: the server did not answer and close: {e}"),
    }
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw.as_str(), ""));
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("{path}: no status line in {raw:?}"));
    let media_type = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-type").then(|| {
                value
                    .split(';')
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_owned()
            })
        })
        .unwrap_or_default();
    Reply {
        status,
        json: serde_json::from_str(body).unwrap_or(Value::Null),
        text: body.to_owned(),
        headers: head.to_owned(),
        media_type,
    }
}

#[test]
fn every_documented_route_and_status_answers_as_docs_openapi_yaml_says() {
    let mut contract = Contract::load();
    let home = Home::new();
    let fixtures = repo_path("crates/vram-residency/tests/fixtures");
    home.model(
        "tiny.gguf",
        &std::fs::read(fixtures.join("tiny-v3.gguf")).unwrap(),
    );
    home.model(
        "tiny.safetensors",
        &std::fs::read(fixtures.join("tiny.safetensors")).unwrap(),
    );
    let mut broken = std::fs::read(fixtures.join("tiny-v3.gguf")).unwrap();
    broken.truncate(40);
    home.model("broken.gguf", &broken);
    home.model("five.bin", &crate::support::random_bytes(5 << 20, 5));
    home.model("seven.bin", &crate::support::random_bytes(7 << 20, 7));
    // 4 MiB of device memory and a 6 MiB model limit: five.bin is admissible but does not fit
    // (507), seven.bin is over the limit (422).
    let server = home.start(&[
        "--sim-vram",
        "4MiB",
        "--max-model-bytes",
        "6MiB",
        "--body-timeout",
        "1s",
    ]);
    let operator = bearer();
    let observer = format!("Bearer {OBSERVER_TOKEN}");
    let nonce = json!({"nonce": "ab".repeat(16)});
    let mut check = |method: &str, template: &str, reply: Reply| {
        contract.check(method, template, &reply);
        reply
    };

    // Open routes.
    check(
        "GET",
        "/healthz",
        server.call("GET", "/healthz", None, None),
    );
    check(
        "GET",
        "/v1/identity",
        server.call("GET", "/v1/identity", None, None),
    );

    // The life of a shard, in each format (GGUF has a format_version, the others null).
    check("GET", "/v1/shards", server.get("/v1/shards"));
    for (model, id) in [
        ("a.bin", "raw-0"),
        ("tiny.gguf", "gguf-0"),
        ("tiny.safetensors", "st-0"),
    ] {
        let committed = check("POST", "/v1/shards", server.commit(model, id));
        assert_eq!(committed.status, 201, "{}", committed.text);
        let got = check(
            "GET",
            "/v1/shards/{id}",
            server.get(&format!("/v1/shards/{id}")),
        );
        assert_eq!(got.status, 200, "{}", got.text);
    }
    let listed = check("GET", "/v1/shards", server.get("/v1/shards"));
    assert_eq!(listed.json["shards"].as_array().unwrap().len(), 3);
    let verified = check(
        "POST",
        "/v1/shards/{id}/verify",
        server.call("POST", "/v1/shards/gguf-0/verify", Some(&operator), None),
    );
    assert_eq!(verified.status, 200, "{}", verified.text);
    let attested = check(
        "POST",
        "/v1/shards/{id}/attest",
        server.call(
            "POST",
            "/v1/shards/st-0/attest",
            Some(&observer),
            Some(&nonce.to_string()),
        ),
    );
    assert_eq!(attested.status, 200, "{}", attested.text);
    let worker = check("GET", "/v1/worker", server.get("/v1/worker"));
    assert_eq!(worker.status, 200, "{}", worker.text);
    let metrics = check("GET", "/metrics", server.get("/metrics"));
    assert!(metrics.text.contains("vram_shards 3"), "{}", metrics.text);

    // A model of two shards (committed like any shard), sealed, verified and attested as a whole.
    for (model, id, index) in [("tiny.gguf", "m-0", 0), ("tiny.safetensors", "m-1", 1)] {
        let body = json!({"model": model, "gpu": 0, "shard_id": id, "model_ref": "org/m",
                          "shard_index": index, "total_shards": 2});
        let committed = check("POST", "/v1/shards", server.post("/v1/shards", &body));
        assert_eq!(committed.status, 201, "{}", committed.text);
    }
    let none = check("GET", "/v1/models", server.get("/v1/models"));
    assert_eq!(none.json["models"].as_array().unwrap().len(), 0);
    let sealed = check(
        "POST",
        "/v1/models",
        server.post(
            "/v1/models",
            &json!({"shards": ["m-1", "m-0"], "model_id": "model-a"}),
        ),
    );
    assert_eq!(sealed.status, 201, "{}", sealed.text);
    assert_eq!(sealed.json["total_shards"], 2);
    assert_eq!(sealed.json["shards"][1]["shard_id"], "m-1");
    let generated = check(
        "POST",
        "/v1/models",
        server.post("/v1/models", &json!({"shards": ["m-0", "m-1"]})),
    );
    assert_eq!(generated.status, 201, "{}", generated.text);
    let generated_id = generated.json["model_id"].as_str().unwrap().to_owned();
    assert!(generated_id.starts_with("model-"), "{generated_id}");
    let listed = check("GET", "/v1/models", server.get("/v1/models"));
    assert_eq!(listed.json["models"].as_array().unwrap().len(), 2);
    let got = check("GET", "/v1/models/{id}", server.get("/v1/models/model-a"));
    assert_eq!(got.status, 200, "{}", got.text);
    let verified = check(
        "POST",
        "/v1/models/{id}/verify",
        server.call("POST", "/v1/models/model-a/verify", Some(&operator), None),
    );
    assert_eq!(verified.status, 200, "{}", verified.text);
    assert_eq!(verified.json["shards"].as_array().unwrap().len(), 2);
    assert_eq!(verified.json["gpus"][0]["shard_indices"], json!([0, 1]));
    let attested = check(
        "POST",
        "/v1/models/{id}/attest",
        server.call(
            "POST",
            "/v1/models/model-a/attest",
            Some(&observer),
            Some(&nonce.to_string()),
        ),
    );
    assert_eq!(attested.status, 200, "{}", attested.text);
    for (method, template, path, body, status) in [
        (
            "POST",
            "/v1/models",
            "/v1/models",
            Some(r#"{"shards":[]}"#),
            400,
        ),
        (
            "POST",
            "/v1/models",
            "/v1/models",
            Some(r#"{"shards":["a/b"]}"#),
            400,
        ),
        ("GET", "/v1/models/{id}", "/v1/models/not.valid", None, 400),
        (
            "DELETE",
            "/v1/models/{id}",
            "/v1/models/not.valid",
            None,
            400,
        ),
        (
            "POST",
            "/v1/models/{id}/verify",
            "/v1/models/not.valid/verify",
            None,
            400,
        ),
        (
            "POST",
            "/v1/models/{id}/attest",
            "/v1/models/model-a/attest",
            Some(r#"{"nonce":"abc"}"#),
            400,
        ),
        ("GET", "/v1/models/{id}", "/v1/models/ghost", None, 404),
        ("DELETE", "/v1/models/{id}", "/v1/models/ghost", None, 404),
        (
            "POST",
            "/v1/models/{id}/verify",
            "/v1/models/ghost/verify",
            None,
            404,
        ),
        (
            "POST",
            "/v1/models/{id}/attest",
            "/v1/models/ghost/attest",
            Some(r#"{"nonce":"abababababababababababababababab"}"#),
            404,
        ),
        (
            "POST",
            "/v1/models",
            "/v1/models",
            Some(r#"{"shards":["ghost"]}"#),
            404,
        ),
        (
            "POST",
            "/v1/models",
            "/v1/models",
            Some(r#"{"shards":["m-0","m-1"],"model_id":"model-a"}"#),
            409,
        ),
        (
            "POST",
            "/v1/models",
            "/v1/models",
            Some(r#"{"shards":["m-0"]}"#),
            409,
        ),
        (
            "POST",
            "/v1/models",
            "/v1/models",
            Some(r#"{"shards":["m-0","raw-0"]}"#),
            409,
        ),
    ] {
        let reply = check(
            method,
            template,
            server.call(method, path, Some(&operator), body),
        );
        assert_eq!(
            reply.status, status,
            "{method} {path} {body:?}: {}",
            reply.text
        );
    }
    for (method, template, path, body) in [
        ("GET", "/v1/models", "/v1/models", None),
        (
            "POST",
            "/v1/models",
            "/v1/models",
            Some(r#"{"shards":["m-0","m-1"]}"#),
        ),
        ("GET", "/v1/models/{id}", "/v1/models/model-a", None),
        ("DELETE", "/v1/models/{id}", "/v1/models/model-a", None),
        (
            "POST",
            "/v1/models/{id}/verify",
            "/v1/models/model-a/verify",
            None,
        ),
        (
            "POST",
            "/v1/models/{id}/attest",
            "/v1/models/model-a/attest",
            Some(r#"{"nonce":"abababababababababababababababab"}"#),
        ),
    ] {
        let reply = check(method, template, server.call(method, path, None, body));
        assert_eq!(reply.status, 401, "{method} {path}: {}", reply.text);
        if method != "GET" && template != "/v1/models/{id}/attest" {
            let reply = check(
                method,
                template,
                server.call(method, path, Some(&observer), body),
            );
            assert_eq!(reply.status, 403, "{method} {path}: {}", reply.text);
        }
    }
    let huge = json!({"shards": ["a".repeat(100 * 1024)]});
    for (template, path) in [
        ("/v1/models", "/v1/models"),
        ("/v1/models/{id}/attest", "/v1/models/model-a/attest"),
    ] {
        let reply = check("POST", template, server.post(path, &huge));
        assert_eq!(reply.status, 413, "{path}: {}", reply.text);
        let reply = check(
            "POST",
            template,
            server.call("POST", path, Some(&operator), None),
        );
        assert_eq!(reply.status, 415, "{path}: {}", reply.text);
    }
    for id in ["model-a", generated_id.as_str()] {
        let forgotten = check(
            "DELETE",
            "/v1/models/{id}",
            server.delete(&format!("/v1/models/{id}")),
        );
        assert_eq!(forgotten.status, 200, "{}", forgotten.text);
    }
    for id in ["m-0", "m-1"] {
        let evicted = server.delete(&format!("/v1/shards/{id}"));
        assert_eq!(evicted.status, 200, "{}", evicted.text);
    }

    // 400: each kind of refused input.
    for body in [
        json!({"model": "a.bin"}),
        json!({"model": "a.bin", "gpu": 0, "shard_id": "a/b"}),
        json!({"model": "a.bin", "gpu": 0, "expected_digest": "sha256:xyz"}),
        json!({"model": "a.bin", "gpu": 7}),
        json!({"model": "a.bin", "gpu": 0, "total_shards": 0}),
        json!({"model": "../secret.bin", "gpu": 0}),
    ] {
        let reply = check("POST", "/v1/shards", server.post("/v1/shards", &body));
        assert_eq!(reply.status, 400, "{body}: {}", reply.text);
    }
    for (method, template, path, body) in [
        ("GET", "/v1/shards/{id}", "/v1/shards/not.valid", None),
        ("DELETE", "/v1/shards/{id}", "/v1/shards/not.valid", None),
        (
            "POST",
            "/v1/shards/{id}/verify",
            "/v1/shards/not.valid/verify",
            None,
        ),
        (
            "POST",
            "/v1/shards/{id}/attest",
            "/v1/shards/raw-0/attest",
            Some(r#"{"nonce":"abc"}"#),
        ),
    ] {
        let reply = check(
            method,
            template,
            server.call(method, path, Some(&operator), body),
        );
        assert_eq!(reply.status, 400, "{method} {path}: {}", reply.text);
    }

    // 401 on every route that needs a token, 403 on those an observer may not call.
    for (method, template, path, body) in [
        ("GET", "/v1/shards", "/v1/shards", None),
        (
            "POST",
            "/v1/shards",
            "/v1/shards",
            Some(r#"{"model":"a.bin","gpu":0}"#),
        ),
        ("GET", "/v1/shards/{id}", "/v1/shards/raw-0", None),
        ("DELETE", "/v1/shards/{id}", "/v1/shards/raw-0", None),
        (
            "POST",
            "/v1/shards/{id}/verify",
            "/v1/shards/raw-0/verify",
            None,
        ),
        (
            "POST",
            "/v1/shards/{id}/attest",
            "/v1/shards/raw-0/attest",
            Some(r#"{"nonce":"abababababababababababababababab"}"#),
        ),
        ("GET", "/v1/worker", "/v1/worker", None),
        ("GET", "/metrics", "/metrics", None),
    ] {
        let reply = check(method, template, server.call(method, path, None, body));
        assert_eq!(reply.status, 401, "{method} {path}: {}", reply.text);
        if matches!(
            template,
            "/v1/shards/{id}/verify" | "/v1/shards/{id}" | "/v1/shards"
        ) && method != "GET"
        {
            let reply = check(
                method,
                template,
                server.call(method, path, Some(&observer), body),
            );
            assert_eq!(reply.status, 403, "{method} {path}: {}", reply.text);
        }
    }

    // 404: no such shard, no such model file.
    for (method, template, path, body) in [
        ("GET", "/v1/shards/{id}", "/v1/shards/ghost", None),
        ("DELETE", "/v1/shards/{id}", "/v1/shards/ghost", None),
        (
            "POST",
            "/v1/shards/{id}/verify",
            "/v1/shards/ghost/verify",
            None,
        ),
        (
            "POST",
            "/v1/shards/{id}/attest",
            "/v1/shards/ghost/attest",
            Some(r#"{"nonce":"abababababababababababababababab"}"#),
        ),
        (
            "POST",
            "/v1/shards",
            "/v1/shards",
            Some(r#"{"model":"missing.bin","gpu":0}"#),
        ),
    ] {
        let reply = check(
            method,
            template,
            server.call(method, path, Some(&operator), body),
        );
        assert_eq!(reply.status, 404, "{method} {path}: {}", reply.text);
    }

    // 409, 413, 415, 422, 507 on commit; 413 and 415 on attest.
    let duplicate = check("POST", "/v1/shards", server.commit("sub/b.bin", "raw-0"));
    assert_eq!(duplicate.status, 409, "{}", duplicate.text);
    let huge = json!({"model": "a".repeat(100 * 1024), "gpu": 0});
    for (template, path) in [
        ("/v1/shards", "/v1/shards"),
        ("/v1/shards/{id}/attest", "/v1/shards/raw-0/attest"),
    ] {
        let reply = check("POST", template, server.post(path, &huge));
        assert_eq!(reply.status, 413, "{path}: {}", reply.text);
        let reply = check(
            "POST",
            template,
            server.call("POST", path, Some(&operator), None),
        );
        assert_eq!(reply.status, 415, "{path}: {}", reply.text);
    }
    for body in [
        json!({"model": "empty.bin", "gpu": 0}),
        json!({"model": "broken.gguf", "gpu": 0}),
        json!({"model": "seven.bin", "gpu": 0}),
        json!({"model": "sub/b.bin", "gpu": 0, "expected_digest": format!("sha256:{}", "0".repeat(64))}),
    ] {
        let reply = check("POST", "/v1/shards", server.post("/v1/shards", &body));
        assert_eq!(reply.status, 422, "{body}: {}", reply.text);
    }
    let full = check(
        "POST",
        "/v1/shards",
        server.post("/v1/shards", &json!({"model": "five.bin", "gpu": 0})),
    );
    assert_eq!(full.status, 507, "{}", full.text);

    // 408: a body that stops arriving (one byte of a 100-byte body) is cut off after --body-timeout.
    for (template, path) in [
        ("/v1/shards", "/v1/shards"),
        ("/v1/shards/{id}/attest", "/v1/shards/raw-0/attest"),
    ] {
        let reply = check(
            "POST",
            template,
            trickled_post(&server.address(), path, &operator),
        );
        assert_eq!(reply.status, 408, "{path}: {}", reply.text);
    }

    // Evictions last; the worker then lists nothing.
    for id in ["raw-0", "gguf-0", "st-0"] {
        let evicted = check(
            "DELETE",
            "/v1/shards/{id}",
            server.delete(&format!("/v1/shards/{id}")),
        );
        assert_eq!(evicted.status, 200, "{}", evicted.text);
    }
    check("GET", "/v1/worker", server.get("/v1/worker"));

    // Answers outside the documented paths keep the one error shape.
    let unknown = server.get("/v1/nope");
    assert_eq!(unknown.status, 404);
    contract.check_error_shape(&unknown);
    let refused = server.call("DELETE", "/v1/shards", Some(&operator), None);
    assert_eq!(refused.status, 405);
    contract.check_error_shape(&refused);

    // Every documented answer was provoked and checked, except those that need a security incident
    // inside the process (sim memory changed from within: the in-process sweep test
    // `serve::sweep::tests::a_sweep_that_finds_corruption_stops_the_worker_and_execute_like_routes_answer_503_worker_4122`
    // checks them) or a shutdown in progress.
    let incident_only: BTreeSet<(String, String, u16)> = [
        ("/healthz", "get", 503),
        ("/v1/shards", "post", 503),
        ("/v1/shards/{id}/verify", "post", 500),
        ("/v1/shards/{id}/verify", "post", 503),
        ("/v1/shards/{id}/attest", "post", 500),
        ("/v1/shards/{id}/attest", "post", 503),
        ("/v1/models", "post", 503),
        ("/v1/models/{id}/verify", "post", 500),
        ("/v1/models/{id}/verify", "post", 503),
        ("/v1/models/{id}/attest", "post", 500),
        ("/v1/models/{id}/attest", "post", 503),
    ]
    .into_iter()
    .map(|(p, m, s)| (p.to_owned(), m.to_owned(), s))
    .collect();
    let documented = contract.documented();
    let stale: Vec<_> = incident_only.difference(&documented).collect();
    assert!(stale.is_empty(), "no longer documented: {stale:?}");
    let unchecked: Vec<_> = documented
        .difference(&contract.checked)
        .filter(|t| !incident_only.contains(*t))
        .collect();
    assert!(
        unchecked.is_empty(),
        "documented in docs/openapi.yaml but not exercised here: {unchecked:?}"
    );
}
