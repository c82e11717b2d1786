//! `branchtftp cache ls|verify|evict` while the appliance serves: the directory is locked by
//! `serve`, so the commands go through its admin endpoint; with the appliance stopped they open
//! the directory as before.

#[path = "admin_support/mod.rs"]
mod admin_support;
mod support;

use std::time::Duration;

use admin_support::*;
use support::*;

const FILES: [(&str, usize); 3] = [
    ("SEP001122334455.cnf.xml", 900),
    ("kern88xx.14-2-1-0101-15.sgn", 120_000),
    ("English_United_States/mk-sip.jar", 40_000),
];

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

async fn get_over_http(b: &AdminBranch, name: &str) -> Vec<u8> {
    let out = b.dir.path().join(format!("dl-{}", name.replace('/', "_")));
    let run = curl_http_get(&b.http_url(name), &out, &[]).await;
    assert_eq!(run.http_status(), 200, "{name}: {}", run.text());
    std::fs::read(&out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_ls_and_evict_work_against_the_running_appliance() {
    let origin = HttpOrigin::with_files(
        FILES
            .iter()
            .enumerate()
            .map(|(i, (n, size))| (*n, pseudo_random_bytes(i as u64, *size))),
    );
    let mut b = AdminBranch::start(&Options {
        upstream: origin.url(),
        ..Options::default()
    });
    for (name, _) in FILES {
        get_over_http(&b, name).await;
    }
    assert!(
        eventually(Duration::from_secs(10), || b.status()["cache"]["files"]
            == 3),
        "{}",
        b.status()
    );

    // ls: the listing comes from the running appliance and matches /status.
    let ls = b.command(&["cache", "ls"]);
    assert!(ls.status.success(), "{}", text(&ls));
    assert!(
        String::from_utf8_lossy(&ls.stderr).contains("asking it at"),
        "{}",
        text(&ls)
    );
    let listing = stdout(&ls);
    let status = b.status();
    assert_eq!(listing.lines().count(), 1 + 3 + 1, "{listing}");
    for (name, _) in FILES {
        assert!(listing.contains(name), "{name} missing:\n{listing}");
    }
    assert!(
        listing
            .lines()
            .last()
            .unwrap()
            .starts_with(&format!("{} files, ", status["cache"]["files"])),
        "{listing}"
    );
    let (_, json) = b.admin_get("/cache");
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["files"], status["cache"]["files"]);
    assert_eq!(json["bytes"], status["cache"]["bytes"]);
    assert_eq!(json["entries"].as_array().unwrap().len(), 3);

    // evict: gone from the running cache, fetched from the origin again on the next request.
    let firmware = FILES[1].0;
    assert_eq!(origin.gets(firmware), 1);
    let ev = b.command(&["cache", "evict", &firmware.to_uppercase()]);
    assert!(ev.status.success(), "{}", text(&ev));
    assert_eq!(
        stdout(&ev),
        format!("evicted {}\n", firmware.to_uppercase())
    );
    assert_eq!(b.status()["cache"]["files"], 2);
    assert_eq!(
        get_over_http(&b, firmware).await,
        origin.file(firmware).unwrap().to_vec()
    );
    assert_eq!(
        origin.gets(firmware),
        2,
        "the evicted file was fetched again"
    );

    let missing = b.command(&["cache", "evict", "nothing-here.bin"]);
    assert_eq!(missing.status.code(), Some(1), "{}", text(&missing));
    assert!(stdout(&missing).contains("not in the cache"));

    // verify through the appliance: every file intact.
    assert!(eventually(Duration::from_secs(10), || b.status()["cache"]
        ["files"]
        == 3));
    let verify = b.command(&["cache", "verify"]);
    assert!(verify.status.success(), "{}", text(&verify));
    assert!(
        stdout(&verify).contains("verified 3 files"),
        "{}",
        text(&verify)
    );

    // With the appliance stopped, the same command opens the directory.
    assert!(b.stop().is_some_and(|s| s.success()));
    let offline = b.command(&["cache", "ls"]);
    assert!(offline.status.success(), "{}", text(&offline));
    assert!(!String::from_utf8_lossy(&offline.stderr).contains("asking it at"));
    assert!(stdout(&offline).contains("3 files, "), "{}", text(&offline));
}
