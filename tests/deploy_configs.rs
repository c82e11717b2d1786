//! Every configuration we ship passes `branchtftp check-config`, run as a user would run it, and
//! a broken one fails with exit 2 and a positioned message.

use std::path::{Path, PathBuf};
use std::process::Command;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn check_config(file: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_branchtftp"))
        .args(["check-config", "-c"])
        .arg(file)
        .env_remove("BRANCHTFTP_CONFIG")
        .output()
        .expect("run branchtftp")
}

fn shipped_configs() -> Vec<PathBuf> {
    let mut files = vec![deploy_dir().join("branchtftp.yaml")];
    let mut examples: Vec<PathBuf> = std::fs::read_dir(deploy_dir().join("examples"))
        .expect("deploy/examples")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    examples.sort();
    files.extend(examples);
    files
}

#[test]
fn every_shipped_config_passes_check_config() {
    let files = shipped_configs();
    assert!(
        files.len() >= 5,
        "packaged config and four examples: {files:?}"
    );
    for file in files {
        let out = check_config(&file);
        assert!(
            out.status.success(),
            "{}: exit {:?}\n{}",
            file.display(),
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("upstreams:"), "{stdout}");
    }
}

#[test]
fn packaged_config_spells_out_every_default() {
    // The packaged file documents every option with its default: its effective config must be
    // the embedded defaults plus only the placeholder upstreams.
    let out = check_config(&deploy_dir().join("branchtftp.yaml"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let packaged = branchtftp::config::Config::from_yaml(&stdout, "effective").unwrap();
    let expected = branchtftp::config::Config {
        upstreams: packaged.upstreams.clone(),
        ..Default::default()
    };
    assert_eq!(packaged, expected);
    assert_eq!(
        packaged.upstreams[0].url,
        "http://cucm-tftp.example.com:6970"
    );
}

#[test]
fn regional_tier_lists_the_regional_box_before_central() {
    let path = deploy_dir().join("examples/regional-tier.yaml");
    let cfg = branchtftp::config::Config::load(&path).unwrap();
    let urls: Vec<&str> = cfg.upstreams.iter().map(|u| u.url.as_str()).collect();
    assert_eq!(urls[0], "http://regional:6970");
    assert!(urls[1].contains("cucm"));
}

#[test]
fn invalid_config_exits_2_with_file_line_col_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "tftp:\n  max_blksize: 70000\nupstreams:\n  - url: http://cucm\n",
    )
    .unwrap();
    let out = check_config(&bad);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with(&format!("{}:2:16: tftp.max_blksize: ", bad.display())),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn missing_config_file_exits_2() {
    let out = check_config(Path::new("/nonexistent/branchtftp.yaml"));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/branchtftp.yaml"));
}
