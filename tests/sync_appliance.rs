//! The sync worker inside the running appliance (`branchtftp serve`), seen from the phones'
//! side with real TFTP clients: fresh configs, firmware prefetched before any phone asks and a
//! boot from the cache with the WAN cut, live config reload, the overrides directory, and
//! `branchtftp sync --once`.

mod support;
#[path = "sync_common/mod.rs"]
mod sync_common;

use std::fs;
use std::time::{Duration, Instant};

use support::*;
use sync_common::*;

const SEP: &str = "SEP001122AABBCC.cnf.xml";

fn phone_config(version: u32) -> String {
    format!(
        "<device><loadInformation></loadInformation><configVersion>{version}</configVersion>\
         <userLocale><name>English_United_States</name></userLocale></device>\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edited_phone_config_is_served_within_interval_and_jitter() {
    let origin = HttpOrigin::with_files([(SEP, phone_config(1))]);
    let app = Appliance::start(
        &Setup::new(&origin.url())
            .sync("prefetch: []")
            .sync("intervals: {config: 1s}"),
    );
    // The phone's first request is a miss: the worker learns the name from it.
    assert_eq!(app.get(SEP).await.unwrap(), phone_config(1).as_bytes());

    origin.put_file(SEP, phone_config(2));
    let took = within(Duration::from_secs(5), || async {
        app.get(SEP).await.as_deref() == Some(phone_config(2).as_bytes())
    })
    .await
    .unwrap_or_else(|| panic!("edit never served; log:\n{}", app.log_text()));
    // 1 s interval + 10% jitter, plus the pass itself and the polling (curl runs), with room
    // for a loaded CI machine.
    assert!(took < Duration::from_millis(2_200), "took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firmware_is_cached_before_any_phone_asks_then_phones_boot_with_the_wan_cut() {
    let origin = HttpOrigin::start();
    let files = publish_firmware(&origin, 300_000);
    let app = Appliance::start(&Setup::new(&origin.url()));

    // Only the worker talks to the appliance's upstream: no phone has asked for anything.
    let took = within(Duration::from_secs(30), || async {
        files.iter().all(|(name, _)| app.cached(name))
    })
    .await;
    assert!(
        took.is_some(),
        "not all prefetched: missing {:?}; log:\n{}",
        files
            .iter()
            .filter(|(n, _)| !app.cached(n))
            .map(|(n, _)| n)
            .collect::<Vec<_>>(),
        app.log_text()
    );
    for (name, body) in &files {
        assert_eq!(&app.cached_content(name).unwrap(), body, "{name}");
        if name.ends_with(".sbn") || name.ends_with(".sgn") {
            assert_eq!(origin.gets(name), 1, "{name} fetched once");
        }
    }
    // The image the .loads lists in upper case was found under the server's spelling.
    assert_eq!(origin.gets("CNU45.9-4-2ES26.SBN"), 1);

    origin.refuse();
    let out = scratch_dir();
    let started = Instant::now();
    for (i, model) in firmware_models().iter().enumerate() {
        // A phone of this model boots: defaults, its load, every image it lists, in the
        // spelling the phone uses.
        let mut names = vec![
            "XMLDefault.cnf.xml".to_string(),
            format!("{}.loads", model.load),
        ];
        names.extend(model.listed.iter().map(|s| s.to_string()));
        for name in names {
            let body = &files
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(&name))
                .unwrap()
                .1;
            let path = out.path().join(format!("{i}-{name}"));
            let run = if i % 2 == 0 {
                curl_tftp_get(app.addr, &name, &path, Some(1428)).await
            } else {
                tftp_hpa_get(app.addr, &name, &path, TftpMode::Binary).await
            };
            run.assert_intact(&sha256_bytes(body));
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "boot from cache took {:?}",
        started.elapsed()
    );
}

/// The miss path and the sync worker are one path: a phone asking for an image the worker is
/// downloading joins that download (one GET at the origin) and is not held to `sync.max_rate`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phone_missing_on_an_image_the_sync_is_fetching_joins_that_one_download() {
    const IMAGE: &str = "cnu45.9-4-2es26.sbn";
    let body = pseudo_random_bytes(11, 1_000_000);
    let origin = HttpOrigin::with_files([(IMAGE, body.clone())]);
    // 1 Mbit/s: the worker alone takes eight seconds over the megabyte.
    let app = Appliance::start(
        &Setup::new(&origin.url())
            .sync(&format!("prefetch: [{IMAGE}]"))
            .sync("max_rate: 1Mbit/s"),
    );
    within(Duration::from_secs(10), || async {
        origin.gets(IMAGE) == 1
    })
    .await
    .unwrap_or_else(|| panic!("the worker never asked; log:\n{}", app.log_text()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!app.cached(IMAGE), "the paced download is still under way");

    let out = scratch_dir();
    let path = out.path().join(IMAGE);
    let started = Instant::now();
    tftp_hpa_get(app.addr, IMAGE, &path, TftpMode::Binary)
        .await
        .assert_intact(&sha256_bytes(&body));
    let phone = started.elapsed();

    assert_eq!(
        origin.gets(IMAGE),
        1,
        "one download for the worker and the phone"
    );
    assert!(
        phone < Duration::from_secs(4),
        "the phone was held to the sync's pace: {phone:?}"
    );
    within(Duration::from_secs(5), || async { app.cached(IMAGE) })
        .await
        .unwrap_or_else(|| panic!("never published; log:\n{}", app.log_text()));
    assert_eq!(app.cached_content(IMAGE).unwrap(), body);
    assert_eq!(origin.gets(IMAGE), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_changes_an_interval_and_the_access_list() {
    let origin = HttpOrigin::with_files([(SEP, phone_config(1))]);
    let app = Appliance::start(
        &Setup::new(&origin.url())
            .sync("prefetch: []")
            .sync("intervals: {config: 1h}"),
    );
    assert!(app.get(SEP).await.is_some());
    origin.put_file(SEP, phone_config(2));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        app.get(SEP).await.unwrap(),
        phone_config(1).as_bytes(),
        "1h interval: not yet"
    );

    app.rewrite_config(|t| t.replace("intervals: {config: 1h}", "intervals: {config: 1s}"));
    within(Duration::from_secs(5), || async {
        app.get(SEP).await.as_deref() == Some(phone_config(2).as_bytes())
    })
    .await
    .unwrap_or_else(|| panic!("new interval not applied; log:\n{}", app.log_text()));

    app.rewrite_config(|t| t.replace("\"127.0.0.0/8\"", "\"10.0.0.0/8\""));
    within(Duration::from_secs(5), || async {
        app.get(SEP).await.is_none()
    })
    .await
    .unwrap_or_else(|| panic!("access list not applied; log:\n{}", app.log_text()));
    assert!(app.log_text().contains("configuration reloaded"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_edit_keeps_the_running_config_and_logs_the_position() {
    let origin = HttpOrigin::with_files([(SEP, phone_config(1))]);
    let mut app = Appliance::start(&Setup::new(&origin.url()).sync("prefetch: []"));
    assert!(app.get(SEP).await.is_some());

    // Would deny us if any of it were applied; the bad duration makes the whole file invalid.
    app.rewrite_config(|t| {
        t.replace("\"127.0.0.0/8\"", "\"10.0.0.0/8\"")
            .replace("  prefetch: []", "  prefetch: []\n  negative_ttl: soon")
    });
    let file = app.config.display().to_string();
    within(Duration::from_secs(5), || async {
        app.log_text().contains("configuration not reloaded")
    })
    .await
    .unwrap_or_else(|| panic!("no reload error logged:\n{}", app.log_text()));
    let log = app.log_text();
    let line = log
        .lines()
        .find(|l| l.contains(&format!("{file}:")) && l.contains("sync.negative_ttl"))
        .unwrap_or_else(|| panic!("no FILE:LINE:COL: key: problem line:\n{log}"));
    let after = &line[line.find(&format!("{file}:")).unwrap() + file.len() + 1..];
    let mut parts = after.splitn(3, ':');
    let l: usize = parts.next().unwrap().parse().expect("line number");
    let c: usize = parts.next().unwrap().parse().expect("column number");
    let text = fs::read_to_string(&app.config).unwrap();
    assert!(
        text.lines().nth(l - 1).unwrap().contains("negative_ttl"),
        "line {l} of {text}"
    );
    assert!(c >= 1);
    // The old access list still admits us.
    assert!(app.get(SEP).await.is_some(), "old config not kept");

    // SIGHUP reloads too: the file is still broken, so again nothing changes.
    let errors = app.log_text().matches("configuration not reloaded").count();
    app.hangup();
    within(Duration::from_secs(5), || async {
        app.log_text().matches("configuration not reloaded").count() > errors
    })
    .await
    .unwrap_or_else(|| panic!("SIGHUP did not reload:\n{}", app.log_text()));
    assert!(app.log_text().contains("SIGHUP: reloading"));
    assert!(app.alive());
    assert!(app.get(SEP).await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overrides_added_replaced_and_removed_take_effect_within_two_seconds() {
    let origin = HttpOrigin::with_files([("dialplan.xml", "<central/>")]);
    let app = Appliance::start(&Setup::new(&origin.url()).sync("prefetch: []"));
    assert_eq!(app.get("dialplan.xml").await.unwrap(), b"<central/>");

    let local = app.overrides().join("DialPlan.xml");
    for (step, content) in [
        ("add", Some("<branch/>")),
        ("replace", Some("<branch v2/>")),
        ("remove", None),
    ] {
        match content {
            Some(c) => write_atomically(&local, c),
            None => fs::remove_file(&local).unwrap(),
        }
        let want = content.unwrap_or("<central/>").as_bytes().to_vec();
        let took = within(Duration::from_secs(2), || async {
            app.get("dialplan.xml").await == Some(want.clone())
        })
        .await;
        assert!(took.is_some(), "{step} not visible within 2 s");
    }
    // A file only the branch has (a wallpaper) is served too.
    fs::create_dir_all(app.overrides().join("Desktops/320x212x12")).unwrap();
    fs::write(
        app.overrides().join("Desktops/320x212x12/branch.png"),
        b"png",
    )
    .unwrap();
    assert!(within(Duration::from_secs(2), || async {
        app.get("Desktops/320x212x12/branch.png").await.as_deref() == Some(&b"png"[..])
    })
    .await
    .is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_once_on_an_empty_cache_pulls_the_whole_prefetch_closure() {
    let origin = HttpOrigin::start();
    let mut files = publish_firmware(&origin, 50_000);
    for (n, b) in [
        ("English_United_States/mk-sip.jar", b"jar".to_vec()),
        ("United_States/g3-tones.xml", b"<tones/>".to_vec()),
    ] {
        origin.put_file(n, b.clone());
        files.push((n.to_string(), b));
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("branchtftp.yaml");
    let setup = Setup::new(&origin.url());
    write_atomically(
        &config,
        &config_yaml(
            dir.path(),
            localhost(free_udp_port()),
            free_tcp_port(),
            &setup,
        ),
    );
    let run = |cfg: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_branchtftp"))
            .args(["sync", "--once", "-c"])
            .arg(cfg)
            .output()
            .unwrap()
    };
    let out = run(&config);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("result: ok"), "{stdout}");
    assert!(stdout.contains("firmware"), "summary table: {stdout}");
    // Not a terminal: one plain line per file.
    assert!(stderr.contains("fetched"), "{stderr}");
    for (name, body) in &files {
        let path = dir.path().join("cache/files").join(name.to_lowercase());
        assert_eq!(
            fs::read(&path).ok().as_ref(),
            Some(body),
            "{name} not pulled; {stdout}\n{stderr}"
        );
    }
    // Firmware named by the configs is pinned.
    let (cache, _) = branchtftp::cache::Cache::open(
        &dir.path().join("cache"),
        1 << 30,
        branchtftp::cache::ClassRules::default(),
    )
    .unwrap();
    let pinned: Vec<String> = cache
        .list()
        .into_iter()
        .filter(|e| e.pinned)
        .map(|e| e.key)
        .collect();
    assert_eq!(pinned.len(), 2 + 5 + 3, "pinned: {pinned:?}");
    drop(cache);

    // The central server unreachable: non-zero exit, and nothing removed.
    origin.refuse();
    let out = run(&config);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("result: unreachable"));
    assert!(dir.path().join("cache/files/xmldefault.cnf.xml").is_file());
}
