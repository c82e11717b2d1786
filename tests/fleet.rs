//! The fleet kit in deploy/: the Prometheus rules pass `promtool check rules` and their unit tests
//! (`promtool test rules`), every alert has a test, a summary, a description and a runbook entry
//! in the man page; a real Prometheus scrapes a running appliance; and the Grafana dashboard and
//! the rules use only metric names a live `/metrics` exports.

#[path = "admin_support/mod.rs"]
mod admin_support;
mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use admin_support::*;
use support::*;

/// The alerts the fleet needs (issue 14).
const ALERTS: [&str; 6] = [
    "BranchtftpDown",
    "BranchtftpUpstreamDown",
    "BranchtftpCacheNearlyFull",
    "BranchtftpSyncFailing",
    "BranchtftpTransferFailures",
    "BranchtftpPhonesStuck",
];

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn yaml(rel: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(repo(rel)).unwrap();
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Whether a Prometheus tool is installed (tests/run.sh installs Debian's `prometheus`).
fn have(tool: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        skip_or_fail(&format!(
            "{tool} not installed (apt-get install prometheus)"
        ));
    }
    found
}

fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(repo("deploy/prometheus"))
        .output()
        .unwrap();
    assert!(out.status.success(), "promtool {args:?}:\n{}", text(&out));
}

#[test]
fn alert_rules_pass_promtool_and_every_alert_has_a_unit_test_and_a_runbook() {
    if !have("promtool") {
        return;
    }
    promtool(&["check", "rules", "rules/branchtftp.rules.yml"]);
    promtool(&["check", "config", "prometheus.yml"]);
    promtool(&["test", "rules", "tests/branchtftp.test.yml"]);

    let rules = yaml("deploy/prometheus/rules/branchtftp.rules.yml");
    let alerts: Vec<&serde_json::Value> = rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .filter(|r| r.get("alert").is_some())
        .collect();
    let names: BTreeSet<&str> = alerts
        .iter()
        .map(|a| a["alert"].as_str().unwrap())
        .collect();
    assert_eq!(names, ALERTS.into_iter().collect());

    let man = Command::new(branchtftp_bin()).arg("man").output().unwrap();
    let man = String::from_utf8_lossy(&man.stdout).into_owned();
    let runbooks = &man[man.find("FLEET ALERTS").expect("man page has FLEET ALERTS")..];
    for a in &alerts {
        let name = a["alert"].as_str().unwrap();
        let ann = &a["annotations"];
        for key in ["summary", "description"] {
            assert!(
                ann[key].as_str().is_some_and(|s| s.len() > 20),
                "{name}: {key}"
            );
        }
        assert_eq!(
            ann["runbook"],
            format!("man branchtftp, FLEET ALERTS, {name}"),
            "{name}"
        );
        assert!(
            runbooks.contains(name),
            "{name} has no FLEET ALERTS entry in the man page"
        );
    }

    // Each alert is tested firing and quiet.
    let tests = yaml("deploy/prometheus/tests/branchtftp.test.yml");
    for name in ALERTS {
        let cases: Vec<&serde_json::Value> = tests["tests"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|t| t["alert_rule_test"].as_array().into_iter().flatten())
            .filter(|c| c["alertname"] == name)
            .collect();
        let fires = cases
            .iter()
            .any(|c| !c["exp_alerts"].as_array().unwrap().is_empty());
        let quiet = cases
            .iter()
            .any(|c| c["exp_alerts"].as_array().unwrap().is_empty());
        assert!(
            fires && quiet,
            "{name}: needs a firing and a quiet unit test"
        );
    }
}

/// A child process killed on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn query(prometheus: &str, q: &str) -> serde_json::Value {
    let (code, body) = curl(&[
        "-s",
        "-G",
        &format!("{prometheus}/api/v1/query"),
        "--data-urlencode",
        &format!("query={q}"),
    ]);
    if code != 200 {
        return serde_json::Value::Null;
    }
    serde_json::from_str(&body).unwrap_or(serde_json::Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_appliance_and_loads_the_rules() {
    if !have("prometheus") {
        return;
    }
    let origin = HttpOrigin::with_files([("SEP001122334455.cnf.xml", "<device/>\n")]);
    let b = AdminBranch::start(&Options {
        upstream: origin.url(),
        ..Options::default()
    });
    let out = b.dir.path().join("cnf");
    let run = curl_http_get(&b.http_url("SEP001122334455.cnf.xml"), &out, &[]).await;
    assert_eq!(run.http_status(), 200);
    assert!(eventually(Duration::from_secs(10), || b.status()["cache"]
        ["files"]
        == 1));

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files: [\"{}\"]\n\
             scrape_configs:\n  - job_name: branchtftp\n    static_configs:\n\
             \x20     - targets: [\"{}\"]\n        labels: {{branch: lab}}\n",
            repo("deploy/prometheus/rules/branchtftp.rules.yml").display(),
            b.admin
        ),
    )
    .unwrap();
    let port = free_tcp_port();
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let _prometheus = Running(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start prometheus"),
    );
    let url = format!("http://127.0.0.1:{port}");
    let mut answer = serde_json::Value::Null;
    let scraped = eventually(Duration::from_secs(30), || {
        answer = query(&url, "branchtftp_cache_files");
        answer["data"]["result"]
            .as_array()
            .is_some_and(|r| !r.is_empty())
    });
    assert!(
        scraped,
        "no branchtftp_cache_files from Prometheus: {answer}\n{}",
        std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
    );
    let sample = &answer["data"]["result"][0];
    assert_eq!(sample["metric"]["branch"], "lab");
    assert_eq!(sample["metric"]["job"], "branchtftp");
    assert_eq!(sample["value"][1], b.status()["cache"]["files"].to_string());

    // The rules loaded into the real server and evaluate without errors.
    let (_, rules) = curl(&["-s", &format!("{url}/api/v1/rules")]);
    let rules: serde_json::Value = serde_json::from_str(&rules).unwrap();
    let groups = rules["data"]["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 2, "{rules}");
    let loaded: Vec<&serde_json::Value> = groups
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    assert_eq!(loaded.len(), 9);
    assert!(
        eventually(Duration::from_secs(10), || {
            let (_, r) = curl(&["-s", &format!("{url}/api/v1/rules")]);
            let r: serde_json::Value = serde_json::from_str(&r).unwrap_or_default();
            r["data"]["groups"].as_array().is_some_and(|gs| {
                gs.iter()
                    .flat_map(|g| g["rules"].as_array().into_iter().flatten())
                    .all(|rule| rule["health"] == "ok")
            })
        }),
        "a rule failed to evaluate"
    );
}

/// Every metric name (`branchtftp_…`) and recorded name (`branchtftp:…`) in a PromQL text.
fn names_in(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("branchtftp") {
        let start = i + at;
        let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
        let preceded = start > 0 && ident(bytes[start - 1]);
        let mut end = start;
        while end < bytes.len() && ident(bytes[end]) {
            end += 1;
        }
        if !preceded && matches!(bytes.get(start + 10), Some(b'_' | b':')) {
            out.insert(expr[start..end].to_string());
        }
        i = end.max(start + 1);
    }
    out
}

/// Every `expr` string in a JSON document.
fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_rules_use_only_metrics_a_live_appliance_exports() {
    let origin = HttpOrigin::with_files([("SEP001122334455.cnf.xml", "<device/>\n")]);
    let b = AdminBranch::start(&Options {
        upstream: origin.url(),
        ..Options::default()
    });
    // One miss and one hit, so the labelled families have samples.
    for _ in 0..2 {
        let out = b.dir.path().join("cnf");
        let run = curl_http_get(&b.http_url("SEP001122334455.cnf.xml"), &out, &[]).await;
        assert_eq!(run.http_status(), 200);
    }
    assert_eq!(
        curl(&["-s", "-X", "POST", &format!("{}/sync", b.admin_url())]).0,
        202
    );
    let exported: BTreeSet<String> = {
        let (_, body) = b.admin_get("/metrics");
        body.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
            .collect()
    };
    assert!(exported.contains("branchtftp_cache_files"), "{exported:?}");

    let rules = yaml("deploy/prometheus/rules/branchtftp.rules.yml");
    let recorded: BTreeSet<String> = rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .filter_map(|r| r["record"].as_str().map(str::to_string))
        .collect();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo("deploy/grafana/branchtftp.json")).unwrap(),
    )
    .unwrap();

    let mut all = Vec::new();
    exprs(&rules, &mut all);
    let mut dash_exprs = Vec::new();
    exprs(&dashboard, &mut dash_exprs);
    assert!(dash_exprs.len() >= 10, "{dash_exprs:?}");
    all.extend(dash_exprs.iter().cloned());
    let mut used = BTreeSet::new();
    for e in &all {
        used.extend(names_in(e));
    }
    for name in &used {
        let known = exported.contains(name) || recorded.contains(name);
        assert!(
            known,
            "{name} is used by deploy/ but not exported by the appliance"
        );
    }
    for wanted in [
        "branchtftp_requests_total",
        "branchtftp_sent_bytes_total",
        "branchtftp_upstream_bytes_total",
        "branchtftp_sync_passes_total",
        "branchtftp_phones",
        "branchtftp_phone_boot_seconds_bucket",
        "branchtftp_upstream_up",
    ] {
        assert!(
            used.contains(wanted),
            "the dashboard or rules should use {wanted}"
        );
    }

    // A branch selector, applied to every query of the dashboard.
    let vars = dashboard["templating"]["list"].as_array().unwrap();
    assert!(vars
        .iter()
        .any(|v| v["name"] == "branch" && v["multi"] == true));
    for e in &dash_exprs {
        assert!(
            e.contains("branch=~\"$branch\""),
            "no branch selector in {e}"
        );
    }
    let panel_types: Vec<&str> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap())
        .collect();
    assert!(panel_types.contains(&"heatmap") && panel_types.contains(&"state-timeline"));
}

#[test]
fn names_in_finds_metric_and_recorded_names_only() {
    let found = names_in(
        "sum(rate(branchtftp_requests_total{result=\"hit\"}[5m])) / branchtftp:hit_ratio:rate5m \
         + x_branchtftp_y + branchtftpish",
    );
    let want: BTreeSet<String> = ["branchtftp_requests_total", "branchtftp:hit_ratio:rate5m"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(found, want);
}
