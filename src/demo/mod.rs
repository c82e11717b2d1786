//! `branchtftp demo`: the first-run experience. Builds a sample central CUCM TFTP server with a
//! realistic file set, puts a simulated WAN in front of it, starts the appliance against it and
//! boots simulated phones three times: straight to the central server across the WAN, through a
//! cold branch cache, and through the warm cache. Prints boot time and WAN bytes side by side.
//! Loopback only, no root, no config.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

use crate::app::{Appliance, Mode};
use crate::cache::cli::human_size;
use crate::config::{AccessConfig, Config, UpstreamConfig};
use crate::tftp::client::{ClientOptions, Download};
use link::Link;

mod link;

/// What the demo simulates.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub phones: usize,
    pub rtt: Duration,
    /// WAN bandwidth, bits per second, each direction.
    pub rate: u64,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            phones: 6,
            rtt: Duration::from_millis(80),
            rate: 10_000_000,
        }
    }
}

/// A phone model of the sample file set and its firmware load.
struct Model {
    name: &'static str,
    load: &'static str,
    /// Image files listed in the `.loads` file, with their sizes.
    images: &'static [(&'static str, usize)],
}

const MODELS: &[Model] = &[
    Model {
        name: "Cisco IP Phone 8845",
        load: "sip8845_65.14-2-1-0101-15",
        images: &[
            ("kern8845_65.14-2-1-0101-15.sbn", 900_000),
            ("rootfs8845_65.14-2-1-0101-15.sbn", 1_400_000),
            ("sboot8845_65.14-2-1-0101-15.sbn", 200_000),
        ],
    },
    Model {
        name: "Cisco IP Phone 7841",
        load: "sip78xx.14-2-1-0001-14",
        images: &[
            ("kern78xx.14-2-1-0001-14.sbn", 700_000),
            ("rootfs78xx.14-2-1-0001-14.sbn", 1_300_000),
            ("sboot78xx.14-2-1-0001-14.sbn", 150_000),
        ],
    },
];

const LOCALE_FILES: &[(&str, usize)] = &[
    ("English_United_States/mk-sip.jar", 220_000),
    (
        "English_United_States/English_United_States-dictionary.xml",
        40_000,
    ),
    ("United_States/g3-tones.xml", 1_800),
];

fn mac(i: usize) -> String {
    format!("0011223344{:02X}", i)
}

/// Deterministic content, so every run moves the same bytes.
fn content(seed: &str, len: usize) -> Vec<u8> {
    let mut s = [0u8; 32];
    s.copy_from_slice(&Sha256::digest(seed.as_bytes()));
    let mut rng = rand::rngs::StdRng::from_seed(s);
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

/// A `.loads` file as phones get it: a binary signed header (TLV records; 0x0D padding),
/// then CRLF text with comments and one image name per line.
fn loads_file(model: &Model) -> Vec<u8> {
    let mut v = Vec::new();
    let own = format!("{}.loads", model.load);
    v.extend_from_slice(&[0x01, 0x00, 0x01, 0x02]); // version
    v.extend_from_slice(&[0x02, 0x00, 0x02, 0x01, 0x9c]); // header length (412)
    v.push(0x0C); // signature record: 256 bytes
    v.extend_from_slice(&[0x01, 0x00]);
    v.extend(content(&own, 256));
    v.push(0x0E);
    v.extend_from_slice(own.as_bytes());
    v.push(0);
    while v.len() < 412 {
        v.push(0x0D);
    }
    v.extend_from_slice(b"# Cisco firmware load\r\n# generated for the branchtftp demo\r\n");
    for (img, _) in model.images {
        v.extend_from_slice(format!("{img}  \r\n").as_bytes());
    }
    v
}

/// Writes the central server's file set; returns name → sha256 of every file.
fn build_central(dir: &Path, phones: usize) -> anyhow::Result<BTreeMap<String, String>> {
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut default = String::from("<Default>\n  <callManagerGroup>...</callManagerGroup>\n");
    for (i, m) in MODELS.iter().enumerate() {
        default.push_str(&format!(
            "  <loadInformation{n} model=\"{model}\">{load}</loadInformation{n}>\n",
            n = 500 + i,
            model = m.name,
            load = m.load
        ));
        files.insert(format!("{}.loads", m.load), loads_file(m));
        for (img, size) in m.images {
            files.insert(img.to_string(), content(img, *size));
        }
    }
    default.push_str("</Default>\n");
    files.insert("XMLDefault.cnf.xml".into(), default.into_bytes());
    for p in 0..phones {
        let m = &MODELS[p % MODELS.len()];
        let cfg = format!(
            "<device>\n  <devicePool><name>Branch-42</name></devicePool>\n  \
             <loadInformation>{load}</loadInformation>\n  \
             <userLocale><name>English_United_States</name><langCode>en_US</langCode></userLocale>\n  \
             <networkLocale>United_States</networkLocale>\n  \
             <sipProfile><phoneLabel>Branch phone {p}</phoneLabel></sipProfile>\n{pad}</device>\n",
            load = m.load,
            pad = "  <!-- padding -->\n".repeat(200)
        );
        files.insert(format!("SEP{}.cnf.xml", mac(p)), cfg.into_bytes());
    }
    files.insert("ITLFile.tlv".into(), content("ITLFile.tlv", 5_000));
    files.insert(
        "dialplan.xml".into(),
        b"<DIALTEMPLATE>\n<TEMPLATE MATCH=\"9.......\" Timeout=\"0\"/>\n</DIALTEMPLATE>\n".to_vec(),
    );
    for (name, size) in LOCALE_FILES {
        files.insert(name.to_string(), content(name, *size));
    }
    let mut sums = BTreeMap::new();
    for (name, bytes) in files {
        let path = dir.join(&name);
        std::fs::create_dir_all(path.parent().unwrap())?;
        std::fs::write(&path, &bytes)?;
        sums.insert(name, hex::encode(Sha256::digest(&bytes)));
    }
    Ok(sums)
}

/// Everything started for the demo; dropped at the end.
/// An appliance on loopback ports for the demo: the sample central server (its files as the
/// overrides directory, no upstream) or the branch (an upstream, an empty cache). The sync
/// worker stays idle so the WAN bytes shown are the phones' alone.
async fn start_appliance(
    dir: &Path,
    overrides: &Path,
    upstream: Option<SocketAddr>,
) -> anyhow::Result<Appliance> {
    let mut cfg = Config::default();
    let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
    cfg.tftp.listen = vec![loopback];
    cfg.http.listen = vec![loopback];
    cfg.admin.listen = None;
    cfg.cache.dir = dir.join("cache");
    cfg.cache.overrides = overrides.to_path_buf();
    cfg.upstreams = upstream
        .map(|a| UpstreamConfig::new(format!("http://{a}")))
        .into_iter()
        .collect();
    cfg.access = AccessConfig {
        allow: vec!["127.0.0.0/8".parse().unwrap()],
        max_transfers: 4096,
        max_per_client: 4096,
    };
    cfg.sync.prefetch.clear();
    cfg.sync.discover = false;
    cfg.sync.config_list = false;
    Appliance::start(cfg, Mode::Appliance, None).await
}

/// One phone's boot over HTTP (as 9.3+ firmware does, file by file), in the order phones ask.
/// Returns the files it received with their sha256.
async fn boot_phone(
    client: reqwest::Client,
    base: String,
    mac: String,
) -> anyhow::Result<Vec<(String, String)>> {
    let mut got = Vec::new();
    let get = |name: String| {
        let client = client.clone();
        let url = format!("{base}/{name}");
        async move {
            let resp = client.get(&url).send().await.with_context(|| url.clone())?;
            if resp.status() == reqwest::StatusCode::NOT_FOUND {
                return Ok::<_, anyhow::Error>(None);
            }
            if !resp.status().is_success() {
                bail!("{url}: HTTP {}", resp.status());
            }
            Ok(Some(resp.bytes().await.with_context(|| url.clone())?))
        }
    };
    // Trust lists first: the per-phone ones do not exist, as on most clusters.
    for name in [
        format!("CTLSEP{mac}.tlv"),
        format!("ITLSEP{mac}.tlv"),
        "ITLFile.tlv".to_string(),
    ] {
        if let Some(b) = get(name.clone()).await? {
            got.push((name, hex::encode(Sha256::digest(&b))));
        }
    }
    let cfg_name = format!("SEP{mac}.cnf.xml");
    let cfg = get(cfg_name.clone())
        .await?
        .with_context(|| format!("{cfg_name} missing"))?;
    got.push((cfg_name, hex::encode(Sha256::digest(&cfg))));
    let refs = crate::sync::parse::config_refs(&cfg);
    let load = refs.loads.first().cloned().context("no loadInformation")?;
    let loads_name = format!("{load}.loads");
    let loads = get(loads_name.clone())
        .await?
        .with_context(|| format!("{loads_name} missing"))?;
    got.push((loads_name, hex::encode(Sha256::digest(&loads))));
    for img in crate::sync::parse::loads_images(&loads) {
        let b = get(img.clone())
            .await?
            .with_context(|| format!("{img} missing"))?;
        got.push((img, hex::encode(Sha256::digest(&b))));
    }
    let mut rest: Vec<String> = LOCALE_FILES.iter().map(|(n, _)| n.to_string()).collect();
    rest.push("dialplan.xml".into());
    for name in rest {
        if let Some(b) = get(name.clone()).await? {
            got.push((name, hex::encode(Sha256::digest(&b))));
        }
    }
    Ok(got)
}

/// Boots every phone at once (a branch after a power cut); returns the slowest boot.
async fn boot_all(
    base: &str,
    phones: usize,
    sums: &BTreeMap<String, String>,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for p in 0..phones {
        let client = reqwest::Client::builder().no_proxy().build()?;
        set.spawn(boot_phone(client, base.to_string(), mac(p)));
    }
    while let Some(r) = set.join_next().await {
        for (name, sha) in r?? {
            if sums.get(&name) != Some(&sha) {
                bail!("{name}: content differs from the central server's");
            }
        }
    }
    Ok(started.elapsed())
}

pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
    let work = tempfile::Builder::new()
        .prefix("branchtftp-demo")
        .tempdir()?;
    let central_dir: PathBuf = work.path().join("central");
    let sums = build_central(&central_dir, opts.phones)?;
    let total: u64 = walk_size(&central_dir);
    println!(
        "branchtftp demo: {} phones ({}), a central server with {} files ({}), \
         WAN {} ms RTT / {} Mbit/s, all on loopback\n",
        opts.phones,
        MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", "),
        sums.len(),
        human_size(total),
        opts.rtt.as_millis(),
        opts.rate as f64 / 1e6
    );

    // The central CUCM TFTP/HTTP server: the sample files, served read-only.
    let central = start_appliance(&work.path().join("central-state"), &central_dir, None).await?;
    let wan = Link::start(central.local_addrs().http[0], opts.rtt, opts.rate).await?;
    let wan_addr = wan.addr();

    let mut rows = Vec::new();
    // 1. Phones straight to the central server across the WAN.
    wan.reset();
    let t = boot_all(&format!("http://{wan_addr}"), opts.phones, &sums).await?;
    rows.push(("direct to central", t, wan.bytes()));
    println!(
        "  direct to central ............ {:>6.2} s",
        t.as_secs_f64()
    );

    // 2. and 3. Through the branch appliance, cold then warm.
    let branch_dir = work.path().join("branch");
    let branch = start_appliance(
        &branch_dir,
        &branch_dir.join("no-overrides"),
        Some(wan_addr),
    )
    .await?;
    let (branch_http, branch_tftp) = (branch.local_addrs().http[0], branch.local_addrs().tftp[0]);
    for (label, row) in [
        ("through branchtftp, cold cache", "cold"),
        ("through branchtftp, warm cache", "warm"),
    ] {
        wan.reset();
        let t = boot_all(&format!("http://{branch_http}"), opts.phones, &sums).await?;
        rows.push((label, t, wan.bytes()));
        println!(
            "  branchtftp, {row} cache ...... {:>6.2} s",
            t.as_secs_f64()
        );
    }
    // An older phone that only speaks TFTP, from the warm cache.
    let img = MODELS[0].images[1].0;
    let started = Instant::now();
    let mut dl = Download::start(branch_tftp, img, &ClientOptions::default()).await?;
    let bytes = dl.read_to_end().await?;
    let tftp_time = started.elapsed();
    if hex::encode(Sha256::digest(&bytes)) != sums[img] {
        bail!("{img}: TFTP copy differs from the central server's");
    }

    println!(
        "\n| scenario ({} phones booting at once) | boot time | WAN bytes |",
        opts.phones
    );
    println!("| --- | ---: | ---: |");
    for (label, t, b) in &rows {
        println!(
            "| {label} | {:.2} s | {} |",
            t.as_secs_f64(),
            human_size(*b)
        );
    }
    let direct = rows[0].1.as_secs_f64();
    println!(
        "\ncold cache: {:.1}× faster than direct, warm: {:.0}× faster; the WAN carried each file once.",
        direct / rows[1].1.as_secs_f64(),
        direct / rows[2].1.as_secs_f64().max(1e-6)
    );
    println!(
        "TFTP (lock-step, 512-byte blocks) from the warm cache: {} in {:.2} s on the LAN; \
         across this WAN the same transfer would take about {:.0} s.",
        human_size(bytes.len() as u64),
        tftp_time.as_secs_f64(),
        (bytes.len() as f64 / 512.0).ceil() * opts.rtt.as_secs_f64()
    );
    println!("Every file every phone received matched the central server's sha256.");
    branch.shutdown().await?;
    drop(wan);
    central.shutdown().await?;
    Ok(())
}

fn walk_size(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                total += walk_size(&p);
            } else if let Ok(m) = e.metadata() {
                total += m.len();
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_images_are_found_after_the_binary_header() {
        let imgs = crate::sync::parse::loads_images(&loads_file(&MODELS[0]));
        let want: Vec<String> = MODELS[0]
            .images
            .iter()
            .map(|(n, _)| n.to_string())
            .collect();
        assert_eq!(imgs, want);
    }
}
