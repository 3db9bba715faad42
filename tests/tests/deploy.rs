//! The files under deploy/, checked by the tools that read them: the alert rules and their tests
//! by promtool, the Kubernetes manifests by kubernetes-validate (offline schemas), compose.yaml
//! against the compose specification by check-jsonschema, and the Grafana dashboard's queries by
//! promtool; every metric the rules and the dashboard name is one the engine exports
//! (`retention_controller::telemetry::exported_names`). The systemd unit is checked by
//! `systemd-analyze` in crates/engine/tests/systemd_unit.rs (it needs the engine's binary).
//!
//! The tools are found by `testkit::tools::find`; `.ci/run` installs them: promtool from Debian's
//! `prometheus`, kubernetes-validate and check-jsonschema from PyPI.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

/// The Kubernetes version whose schemas the manifests are checked against (besides the newest
/// kubernetes-validate knows): the oldest still served by the big providers' extended support.
const OLDEST_KUBERNETES: &str = "1.30.0";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

fn promtool() -> PathBuf {
    testkit::tools::find(
        "promtool",
        "it comes with Debian's `prometheus` package: `apt-get install --no-install-recommends prometheus`",
    )
}

/// Runs `tool` with `args` in the repository; returns its output, or fails the test with the
/// command and everything it printed.
fn run(tool: &Path, args: &[&str]) -> String {
    let started = Instant::now();
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(tool)
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", tool.display()));
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&stdout),
        String::from_utf8_lossy(&stderr)
    );
    let command = format!("{} {}", tool.display(), args.join(" "));
    assert!(
        status.success(),
        "`{command}` failed ({status}):\n{printed}"
    );
    eprintln!("`{command}`: {:.1?}", started.elapsed());
    printed
}

/// Every series name `GET /metrics` can show.
fn exported() -> BTreeSet<String> {
    retention_controller::telemetry::exported_names()
        .into_iter()
        .collect()
}

/// The metric names a PromQL expression selects: the identifiers outside strings, label
/// matchers (`{...}`) and label lists (`by (...)`, `on (...)`, ...), that are no keyword, call
/// no function (not followed by `(`) and are no number or duration.
fn metric_names(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
        "nan",
        // Aggregation operators, which may come before their parenthesis: `max without (x) (...)`.
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let mut braces = 0;
    // Whether the next parenthesis opens a label list (after `by`, `on`, ...).
    let mut label_list_next = false;
    let mut in_label_list = false;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            continue;
        }
        if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
            continue;
        }
        if c == '{' {
            braces += 1;
        } else if c == '}' {
            braces -= 1;
        } else if c == '(' {
            in_label_list = label_list_next;
            label_list_next = false;
        } else if c == ')' {
            in_label_list = false;
        }
        if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) {
            // A number or a duration (5m, 1h30m, 1e3): digits and the letters that follow them.
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let calls = chars.get(next) == Some(&'(');
            let lower = word.to_ascii_lowercase();
            if [
                "by",
                "without",
                "on",
                "ignoring",
                "group_left",
                "group_right",
            ]
            .contains(&lower.as_str())
            {
                label_list_next = true;
                continue;
            }
            label_list_next = false;
            if braces == 0 && !in_label_list && !calls && !KEYWORDS.contains(&lower.as_str()) {
                names.insert(word);
            }
            continue;
        }
        i += 1;
    }
    names
}

#[test]
fn metric_names_are_found_in_expressions() {
    let names = metric_names(
        r#"histogram_quantile(0.95, sum by (task, le) (rate(retention_run_duration_seconds_bucket{task=~"a|b"}[5m])))
           > on (task) group_left max without (instance) (x_total offset 1h) * 2 unless y == bool 1e3
           or on () group_left sum(z:rate5m)"#,
    );
    assert_eq!(
        names,
        [
            "retention_run_duration_seconds_bucket",
            "x_total",
            "y",
            "z:rate5m"
        ]
        .map(String::from)
        .into()
    );
}

/// The `expr` of each rule of a Prometheus rules file as this repository writes them: `expr: |`
/// followed by a more indented block, or `expr: ...` on one line.
fn rule_expressions(rules: &str) -> Vec<String> {
    let lines: Vec<&str> = rules.lines().collect();
    let mut exprs = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let Some(rest) = trimmed.strip_prefix("expr:") else {
            continue;
        };
        let rest = rest.trim();
        if rest == "|" || rest == "|-" || rest == ">" {
            let indent = line.len() - trimmed.len();
            let block: Vec<&str> = lines[n + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
                .copied()
                .collect();
            exprs.push(block.join("\n"));
        } else {
            exprs.push(rest.trim_matches(['"', '\'']).to_string());
        }
    }
    exprs
}

/// Asserts every metric `exprs` select, and every `retention_*` word anywhere in `text`
/// (comments, annotations), is exported by the engine.
fn assert_only_exported_metrics(what: &str, text: &str, exprs: &[String]) {
    let exported = exported();
    let mut selected = BTreeSet::new();
    for expr in exprs {
        selected.extend(metric_names(expr));
    }
    assert!(!selected.is_empty(), "{what}: no metric found in {exprs:?}");
    let mentioned: BTreeSet<String> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("retention_"))
        .map(String::from)
        .collect();
    let unknown: Vec<&String> = selected
        .iter()
        .chain(&mentioned)
        .filter(|name| !exported.contains(*name))
        .collect();
    assert!(
        unknown.is_empty(),
        "{what} names metrics the engine does not export: {unknown:?}\n(exported: {exported:?})"
    );
}

/// A heading's anchor as GitHub makes it: lower case, spaces as `-`, punctuation dropped.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn alert_rules_pass_promtool_and_their_tests_cover_both_sides() {
    let promtool = promtool();
    let checked = run(
        &promtool,
        &["check", "rules", "deploy/prometheus/alerts.yaml"],
    );
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = run(
        &promtool,
        &[
            "test",
            "rules",
            "deploy/prometheus/alerts.test.yaml",
            "deploy/prometheus/alerts.days.test.yaml",
        ],
    );
    assert_eq!(tested.matches("SUCCESS").count(), 2, "{tested}");

    let rules = read("deploy/prometheus/alerts.yaml");
    assert_only_exported_metrics("alerts.yaml", &rules, &rule_expressions(&rules));

    // Every alert: a severity, a summary, a description, and a runbook section that exists.
    let operations = read("docs/operations.md");
    let anchors: BTreeSet<String> = operations
        .lines()
        .filter_map(|l| l.strip_prefix("### ").or_else(|| l.strip_prefix("## ")))
        .map(anchor)
        .collect();
    let alerts: Vec<&str> = rules.split("- alert: ").skip(1).collect();
    assert!(alerts.len() >= 10, "{} alerts", alerts.len());
    let mut names = Vec::new();
    for alert in &alerts {
        let name = alert.lines().next().unwrap().trim().to_string();
        for needed in ["severity: ", "summary: ", "description: ", "runbook_url: "] {
            assert!(alert.contains(needed), "{name} has no {needed}");
        }
        let runbook = alert
            .split("runbook_url: \"docs/operations.md#")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or_else(|| panic!("{name}'s runbook_url is not docs/operations.md#..."));
        assert_eq!(runbook, name.to_lowercase(), "{name}'s runbook anchor");
        assert!(
            anchors.contains(runbook),
            "{name}'s runbook section #{runbook} is not in docs/operations.md"
        );
        names.push(name);
    }

    // Every alert is tested firing, and not firing (the other side of its threshold or `for`).
    let tests = read("deploy/prometheus/alerts.test.yaml")
        + &read("deploy/prometheus/alerts.days.test.yaml");
    let lines: Vec<&str> = tests
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let mut fires = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for pair in lines.windows(2) {
        if let Some(name) = pair[0].strip_prefix("alertname: ") {
            match pair[1] {
                "exp_alerts: []" => quiet.insert(name),
                "exp_alerts:" => fires.insert(name),
                other => panic!("{name}: unexpected {other:?}"),
            };
        }
    }
    for name in &names {
        assert!(fires.contains(name.as_str()), "no test of {name} firing");
        assert!(
            quiet.contains(name.as_str()),
            "no test of {name} not firing"
        );
    }
}

fn kubernetes_validate() -> PathBuf {
    testkit::tools::find(
        "kubernetes-validate",
        "PyPI's kubernetes-validate: `python3 -m pip install kubernetes-validate`",
    )
}

#[test]
fn kubernetes_manifests_pass_kubernetes_validate() {
    let tool = kubernetes_validate();
    let mut files: Vec<String> = std::fs::read_dir(repo().join("deploy/k8s"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .map(|p| p.strip_prefix(repo()).unwrap().display().to_string())
        .collect();
    files.sort();
    let documents: usize = files
        .iter()
        .map(|f| {
            read(f)
                .split("\n---")
                .filter(|d| d.contains("kind:"))
                .count()
        })
        .sum();
    // The oldest version claimed, and the newest the tool knows (its default).
    for version in [Some(OLDEST_KUBERNETES), None] {
        let mut args = vec!["--strict"];
        if let Some(version) = version {
            args.extend(["--kubernetes-version", version]);
        }
        args.extend(files.iter().map(String::as_str));
        let printed = run(&tool, &args);
        // Each resource is reported; none was skipped for want of a schema.
        assert_eq!(
            printed.matches(" passed for resource ").count(),
            documents,
            "{printed}"
        );
    }

    // What the checks above do not ask for, and a platform team does.
    let manifests: String = files.iter().map(|f| read(f)).collect();
    for needed in [
        "livenessProbe",
        "path: /healthz",
        "readinessProbe",
        "path: /readyz",
        "requests:",
        "memory:",
        "runAsNonRoot: true",
        "readOnlyRootFilesystem: true",
        "allowPrivilegeEscalation: false",
        "kind: PodDisruptionBudget",
        "kind: NetworkPolicy",
    ] {
        assert!(manifests.contains(needed), "no {needed} in deploy/k8s");
    }
}

#[test]
fn compose_file_matches_the_compose_specification() {
    let tool = testkit::tools::find(
        "check-jsonschema",
        "PyPI's check-jsonschema: `python3 -m pip install check-jsonschema`",
    );
    let printed = run(
        &tool,
        &[
            "--builtin-schema",
            "vendor.compose-spec",
            "deploy/compose.yaml",
        ],
    );
    assert!(printed.contains("ok -- validation done"), "{printed}");
}

/// Grafana's own variables, as a query would see them.
const GRAFANA_VARIABLES: &[(&str, &str)] = &[
    ("$__rate_interval", "5m"),
    ("${__rate_interval}", "5m"),
    ("$__interval", "1m"),
    ("${__interval}", "1m"),
    ("$__range", "1h"),
    ("${__range}", "1h"),
];

/// Every `expr` of the dashboard's panels (rows' panels included).
fn dashboard_expressions(value: &serde_json::Value, exprs: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            if let Some(serde_json::Value::Array(targets)) = map.get("targets") {
                for target in targets {
                    if let Some(expr) = target.get("expr").and_then(|e| e.as_str()) {
                        exprs.push(expr.to_string());
                    }
                }
            }
            for (key, child) in map {
                if key != "targets" {
                    dashboard_expressions(child, exprs);
                }
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                dashboard_expressions(item, exprs);
            }
        }
        _ => {}
    }
}

#[test]
fn grafana_dashboard_queries_parse_and_name_exported_metrics() {
    let text = read("deploy/grafana/retention-dashboard.json");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    dashboard_expressions(&dashboard, &mut exprs);
    assert!(exprs.len() >= 8, "{exprs:?}");

    // The dashboard's own variables (templating) take the value `.*`: a label matcher's regex.
    let own: Vec<String> = dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["name"].as_str().map(String::from))
        .collect();
    let substituted: Vec<String> = exprs
        .iter()
        .map(|expr| {
            let mut expr = expr.clone();
            for (variable, value) in GRAFANA_VARIABLES {
                expr = expr.replace(variable, value);
            }
            for name in &own {
                expr = expr
                    .replace(&format!("${{{name}}}"), ".*")
                    .replace(&format!("${name}"), ".*");
            }
            assert!(!expr.contains('$'), "a variable left in {expr}");
            expr
        })
        .collect();

    // Each query as a recording rule: promtool parses every one.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (n, expr) in substituted.iter().enumerate() {
        rules += &format!(
            "      - record: dashboard:query_{n}\n        expr: {}\n",
            serde_json::to_string(expr).unwrap()
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-queries.yaml");
    std::fs::write(&file, &rules).unwrap();
    let printed = run(&promtool(), &["check", "rules", file.to_str().unwrap()]);
    assert!(
        printed.contains(&format!("SUCCESS: {} rules found", substituted.len())),
        "{printed}\n{rules}"
    );

    assert_only_exported_metrics("the Grafana dashboard", &text, &substituted);
}
