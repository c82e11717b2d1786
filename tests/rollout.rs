//! Firmware rollouts without a WAN spike (issue 15): `sync.windows` hold the background sync to
//! its hours (never a phone's miss), `sync.loads` stage a load before any config names it and
//! pin it until the name is removed, readiness shows in `status --json` and the metrics, and
//! the rate in force follows the window. Sync passes run through the library on an injected
//! clock; the readiness test runs the real appliance.

mod support;
#[path = "sync_common/mod.rs"]
mod sync_common;

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use branchtftp::config::{ClassWindows, SyncConfig, UpstreamConfig, WindowSpec};
use branchtftp::content::{Body, Found};
use branchtftp::name::FileName;
use branchtftp::sync::{Scope, WallClock};
use jiff::tz::TimeZone;
use jiff::Zoned;
use support::{WanLink, WanRelay};

use support::*;
use sync_common::*;

/// A wall clock the test sets, in central European time (DST rules included).
struct TestClock(Mutex<Zoned>);

impl TestClock {
    fn at(local: &str) -> Arc<TestClock> {
        let c = Arc::new(TestClock(Mutex::new(Zoned::now())));
        c.set(local);
        c
    }

    fn set(&self, local: &str) {
        let tz = TimeZone::posix("CET-1CEST,M3.5.0,M10.5.0/3").unwrap();
        let t = local
            .parse::<jiff::civil::DateTime>()
            .unwrap()
            .to_zoned(tz)
            .unwrap();
        *self.0.lock().unwrap() = t;
    }
}

impl WallClock for TestClock {
    fn now(&self) -> Zoned {
        self.0.lock().unwrap().clone()
    }
}

fn rig(upstream: &str, clock: Arc<TestClock>, tune: impl FnOnce(&mut SyncConfig)) -> SyncRig {
    let mut settings = SyncConfig {
        prefetch: vec!["XMLDefault.cnf.xml".into()],
        ..SyncConfig::default()
    };
    tune(&mut settings);
    let upstream = UpstreamConfig {
        timeout: Duration::from_secs(5),
        ..UpstreamConfig::new(upstream)
    };
    SyncRig::new(&[upstream], 1 << 32, settings, clock)
}

fn window(at: &str, max_rate: Option<u64>) -> ClassWindows {
    ClassWindows::Windows(vec![WindowSpec {
        at: at.into(),
        max_rate,
    }])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_the_firmware_window_only_a_phone_miss_fetches_firmware() {
    let origin = HttpOrigin::start();
    publish_firmware(&origin, 20_000);
    let models = firmware_models();
    let clock = TestClock::at("2026-06-10T12:00");
    let r = rig(&origin.url(), clock.clone(), |s| {
        s.windows.firmware = window("22:00-06:00", None);
    });

    // Noon: the config is kept fresh, the firmware it names waits for the night.
    let noon = r.pass().await;
    assert!(r.entry("XMLDefault.cnf.xml").is_some());
    assert_eq!(noon.held, [branchtftp::cache::FileClass::Firmware]);
    for m in &models {
        assert_eq!(origin.gets(&format!("{}.loads", m.load)), 0, "{}", m.load);
        for img in &m.stored {
            assert_eq!(origin.gets(img), 0, "{img} fetched at noon");
        }
    }

    // A phone asks for an image at noon: served at once through the miss path.
    let wanted = models[1].stored[0];
    let started = Instant::now();
    match r
        .fetcher
        .open(&FileName::parse(wanted).unwrap(), std::time::Instant::now())
        .await
    {
        Ok(Found {
            body: Body::Stream(mut reader),
            ..
        }) => {
            let mut buf = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut buf)
                .await
                .unwrap();
            assert_eq!(buf, origin.file(wanted).unwrap());
        }
        _ => panic!("expected a miss"),
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    // A second noon pass (the worker's discover-only pass after a miss) still waits.
    r.syncer.pass(Scope::DiscoverOnly, &Quiet).await;
    assert_eq!(origin.gets(models[1].stored[1]), 0);

    // 23:00: the next pass fetches what is missing, not what the phone already brought.
    clock.set("2026-06-10T23:00");
    let night = r.pass().await;
    assert!(night.held.is_empty());
    for m in &models {
        for img in &m.stored {
            let e = r.entry(img).unwrap_or_else(|| panic!("{img} not staged"));
            assert!(e.pinned, "{img} not pinned");
        }
    }
    assert_eq!(
        origin.gets(wanted),
        1,
        "the phone's image was fetched again"
    );
    let ready = r.syncer.load_readiness();
    assert_eq!(ready.len(), 3, "{ready:?}");
    for l in &ready[..2] {
        assert!(l.ready && l.verified && l.configured && !l.planned, "{l:?}");
        assert_eq!(l.images, l.images_present);
        assert_eq!(l.bytes, Some(l.bytes_present));
    }
    // The third model's load is not on the central server: known, not ready.
    assert!(!ready[2].ready && ready[2].images == 0);
}

/// A load the central server has, named by no config yet.
fn publish_planned_load(origin: &HttpOrigin, load: &str, sizes: &[usize]) -> Vec<String> {
    let images: Vec<String> = (0..sizes.len())
        .map(|i| format!("img{i}.{load}.sbn"))
        .collect();
    let mut text = String::from("# planned\r\n");
    for name in &images {
        text.push_str(&format!("{name}\r\n"));
    }
    let own = format!("{load}.loads");
    origin.put_file(&own, signed_loads(&own, &text));
    for (i, (name, size)) in images.iter().zip(sizes).enumerate() {
        origin.put_file(name, pseudo_random_bytes(900 + i as u64, *size));
    }
    images
}

const PLANNED: &str = "sip8845_65.14-3-1-0001-13";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_load_is_staged_pinned_and_unpinned_when_removed() {
    let origin = HttpOrigin::start();
    publish_firmware(&origin, 5_000);
    let images = publish_planned_load(&origin, PLANNED, &[30_000, 40_000, 50_000]);
    let clock = TestClock::at("2026-06-10T02:00");
    let r = rig(&origin.url(), clock.clone(), |s| {
        s.windows.firmware = window("22:00-06:00", Some(0));
        s.loads = vec![PLANNED.to_string()];
    });
    r.pass().await;
    for name in images.iter().chain([&format!("{PLANNED}.loads")]) {
        assert!(r.entry(name).is_some_and(|e| e.pinned), "{name}");
    }
    let planned = r
        .syncer
        .load_readiness()
        .into_iter()
        .find(|l| l.name == PLANNED)
        .unwrap();
    assert!(planned.planned && !planned.configured);
    assert!(planned.ready && planned.verified, "{planned:?}");
    assert_eq!((planned.images, planned.images_present), (3, 3));
    assert_eq!(planned.bytes, Some(120_000));

    // Removed from sync.loads: the next pass unpins it (the configured loads stay pinned).
    let mut s = r.syncer.settings();
    s.loads.clear();
    r.syncer.reconfigure(s);
    let rep = r.pass().await;
    assert!(rep.unpinned >= 4, "{rep:?}");
    for name in &images {
        assert!(!r.entry(name).unwrap().pinned, "{name} still pinned");
    }
    assert!(r.entry(firmware_models()[0].stored[0]).unwrap().pinned);
    assert!(!r.syncer.load_readiness().iter().any(|l| l.name == PLANNED));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_rate_follows_the_window_through_the_wan() {
    let big = pseudo_random_bytes(3, 1_000_000);
    let origin = HttpOrigin::with_files([("big.txt", big.clone())]);
    let wan = WanRelay::tcp(
        origin.addr(),
        WanLink::with_rtt(Duration::from_millis(20)).mbit(100),
    );
    let clock = TestClock::at("2026-06-10T12:00");
    // 4 Mbit/s by day; inside the night window 16 Mbit/s.
    let r = rig(&format!("http://{}", wan.addr()), clock.clone(), |s| {
        s.prefetch = vec!["big.txt".into()];
        s.max_rate = 4_000_000;
        s.windows.firmware = window("22:00-06:00", Some(16_000_000));
    });
    let mut rates = Vec::new();
    for at in ["2026-06-10T12:00", "2026-06-10T23:00"] {
        clock.set(at);
        r.cache.evict("big.txt").unwrap();
        wan.reset_counters();
        let started = Instant::now();
        let rep = r.pass().await;
        let took = started.elapsed().as_secs_f64();
        assert_eq!(rep.total().fetched, 1, "{rep:?}");
        let bytes = wan.bytes_down();
        assert!(bytes >= 1_000_000, "{bytes} bytes through the WAN");
        rates.push(bytes as f64 * 8.0 / took);
    }
    let (day, night) = (rates[0], rates[1]);
    eprintln!("through the WAN relay: by day {day:.0} bit/s (cap 4 Mbit/s), by night {night:.0} bit/s (window's 16 Mbit/s)");
    assert!(
        (2_800_000.0..5_000_000.0).contains(&day),
        "by day {day:.0} bit/s, wanted about 4 Mbit/s"
    );
    assert!(
        (11_000_000.0..20_000_000.0).contains(&night),
        "by night {night:.0} bit/s, wanted about 16 Mbit/s"
    );
}

#[test]
fn check_config_places_overlapping_windows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("branchtftp.yaml");
    std::fs::write(
        &path,
        "sync:\n  windows:\n    firmware:\n      - \"22:00-06:00\"\n      - {at: \"05:30-07:00\", max_rate: 2Mbit/s}\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_branchtftp"))
        .args(["check-config", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}:5:9: sync.windows.firmware[1]: `05:30-07:00` overlaps `22:00-06:00`",
            path.display()
        )),
        "{err}"
    );
}

/// The admin port the helper wrote into the appliance's config.
fn admin_of(app: &Appliance) -> String {
    let text = std::fs::read_to_string(&app.config).unwrap();
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("listen: \"127.0.0.1:"))
        .unwrap();
    line.split('"').nth(1).unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_and_metrics_show_a_planned_load_ready() {
    let origin = HttpOrigin::start();
    let images = publish_planned_load(&origin, PLANNED, &[64_000, 64_000]);
    let app = Appliance::start(
        &Setup::new(&origin.url())
            .sync("prefetch: []")
            .sync(&format!("loads: [{PLANNED}]"))
            .sync("windows: {firmware: always}"),
    );
    let admin = admin_of(&app);
    let status = || {
        let out = Command::new(env!("CARGO_BIN_EXE_branchtftp"))
            .args(["status", "--json", "--admin", &admin])
            .output()
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or_default()
    };
    let ready = within(Duration::from_secs(10), || async {
        status()["loads"][0]["ready"] == serde_json::Value::Bool(true)
    })
    .await;
    assert!(
        ready.is_some(),
        "not ready: {}\n{}",
        status(),
        app.log_text()
    );
    let l = &status()["loads"][0];
    assert_eq!(l["name"], PLANNED);
    assert_eq!(l["planned"], true);
    assert_eq!(l["images"], 2);
    assert_eq!(l["images_present"], 2);
    assert_eq!(l["bytes"], 128_000);
    assert_eq!(l["bytes_present"], 128_000);
    assert_eq!(l["verified"], true);
    for name in &images {
        assert!(app.cached(name), "{name}");
    }
    let metrics = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(&format!("branchtftp_load_ready{{load=\"{PLANNED}\"}} 1")),
        "{metrics}"
    );
    let table = Command::new(env!("CARGO_BIN_EXE_branchtftp"))
        .args(["status", "--admin", &admin])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains(PLANNED) && table.contains("2/2"), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_loads_stages_planned_loads_now_whatever_the_window() {
    let origin = HttpOrigin::start();
    let images = publish_planned_load(&origin, PLANNED, &[10_000, 20_000]);
    let dir = tempfile::tempdir().unwrap();
    // A firmware window that is closed now (the child runs in UTC): six hours from now.
    let hour = (jiff::Timestamp::now().as_second() / 3600 + 6) % 24;
    let config = dir.path().join("branchtftp.yaml");
    std::fs::write(
        &config,
        format!(
            "cache:\n  dir: {}\n  overrides: {}\nupstreams:\n  - url: {}\nsync:\n  windows:\n    firmware: [\"{hour:02}:00-{:02}:00\"]\n  loads: [{PLANNED}]\n",
            dir.path().join("cache").display(),
            dir.path().join("overrides").display(),
            origin.url(),
            (hour + 1) % 24
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_branchtftp"))
            .args(args)
            .arg("-c")
            .arg(&config)
            .env("TZ", "UTC")
            .output()
            .unwrap()
    };
    // `sync --once` keeps to the window: the firmware waits.
    let once = run(&["sync", "--once"]);
    let text = String::from_utf8_lossy(&once.stdout);
    assert!(
        text.contains("outside their sync.windows, not synced: firmware"),
        "{text}"
    );
    assert_eq!(origin.gets(&images[0]), 0);
    // `sync --loads` does not.
    let out = run(&["sync", "--loads"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("1 of 1 planned loads ready"), "{text}");
    assert!(text.contains(PLANNED) && text.contains("2/2"), "{text}");
    for name in &images {
        assert_eq!(origin.gets(name), 1, "{name}");
    }
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(progress.contains(&images[1]), "no progress: {progress}");
}
