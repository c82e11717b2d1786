//! Power loss: a child process publishes, replaces and evicts files in a loop and is SIGKILLed
//! at random moments. After every kill the cache must reopen with every indexed file complete
//! (size and sha256 match), no temp file left, and every operation the child saw complete still
//! in effect.
//!
//! The child is this same test binary, re-executed with `CACHE_POWER_LOSS_DIR` set.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use branchtftp::cache::{Cache, ClassRules, PublishMeta};
use branchtftp::name::FileName;
use sha2::{Digest, Sha256};

const DIR_VAR: &str = "CACHE_POWER_LOSS_DIR";
const SEED_VAR: &str = "CACHE_POWER_LOSS_SEED";
const NAMES: [&str; 6] = [
    "SEP001122AABBCC.cnf.xml",
    "XMLDefault.cnf.xml",
    "sip88xx.loads",
    "kern88xx.sgn",
    "English_United_States/mk-sip.jar",
    "ITLFile.tlv",
];

/// xorshift: deterministic, dependency-free randomness.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Child mode: publish forever, journaling each operation before it starts and after it ends.
/// The journal is written with plain appends: a SIGKILL loses no page cache.
#[test]
fn power_loss_child() {
    let Some(dir) = std::env::var_os(DIR_VAR) else {
        return; // only meaningful when re-executed by the parent below
    };
    let dir = Path::new(&dir);
    let seed: u64 = std::env::var(SEED_VAR).unwrap().parse().unwrap();
    let mut rng = Rng(seed | 1);
    let (cache, _) = Cache::open(&dir.join("cache"), u64::MAX, ClassRules::default()).unwrap();
    let mut journal = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(dir.join("journal"))
        .unwrap();
    loop {
        let name = NAMES[rng.below(NAMES.len() as u64) as usize];
        let key = FileName::parse(name).unwrap().key().to_string();
        if rng.below(8) == 0 {
            note(&mut journal, format!("start {key}\n"));
            cache.evict(&key).unwrap();
            note(&mut journal, format!("evicted {key}\n"));
            continue;
        }
        let len = rng.below(256 * 1024) as usize;
        let fill = rng.next();
        let body: Vec<u8> = (0..len)
            .map(|i| (fill >> (i % 8 * 8)) as u8 ^ i as u8)
            .collect();
        note(&mut journal, format!("start {key}\n"));
        let mut p = cache.publisher(&FileName::parse(name).unwrap()).unwrap();
        for chunk in body.chunks(16 * 1024) {
            p.write_chunk(chunk).unwrap();
        }
        let e = p
            .commit(PublishMeta {
                source: "child".into(),
                expected_size: Some(len as u64),
                ..PublishMeta::default()
            })
            .unwrap();
        note(&mut journal, format!("done {key} {}\n", e.sha256));
    }
}

/// One write(2) per line, so a kill tears at most the last line.
fn note(journal: &mut std::fs::File, line: String) {
    journal.write_all(line.as_bytes()).unwrap();
}

/// What the journal says the cache must hold: key → Some(sha) / None (evicted), and the key of
/// the operation in flight when the child died (its outcome may go either way).
fn expected_state(journal: &str) -> (HashMap<String, Option<String>>, Option<String>) {
    let mut state = HashMap::new();
    let mut in_flight = None;
    // A last line without its newline was torn by the kill: ignore it.
    for line in journal.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
        let mut parts = line.trim_end().split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some("start"), Some(k), _) => in_flight = Some(k.to_string()),
            (Some("done"), Some(k), Some(sha)) => {
                state.insert(k.to_string(), Some(sha.to_string()));
                in_flight = None;
            }
            (Some("evicted"), Some(k), _) => {
                state.insert(k.to_string(), None);
                in_flight = None;
            }
            // A line torn by the kill (completed by the parent's newline): a torn `start` means
            // the operation never began; a torn `done` leaves its `start` in flight.
            _ => {}
        }
    }
    (state, in_flight)
}

#[test]
fn cache_survives_sigkill_at_random_moments() {
    let d = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let started = Instant::now();
    let kills = 60;
    let mut repairs = 0;
    let mut interrupted = 0;
    for round in 0..kills {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "power_loss_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(DIR_VAR, d.path())
            .env(SEED_VAR, (round + 1).to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Some kills land during start-up recovery; most once the child is publishing.
        let journal_len = || std::fs::metadata(d.path().join("journal")).map_or(0, |m| m.len());
        if rng.below(5) > 0 {
            let before = journal_len();
            let deadline = Instant::now() + Duration::from_secs(10);
            while journal_len() == before && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        std::thread::sleep(Duration::from_micros(rng.below(80_000)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        let (cache, report) = Cache::open(&d.path().join("cache"), u64::MAX, ClassRules::default())
            .unwrap_or_else(|e| panic!("round {round}: reopen failed: {e}"));
        repairs += report.repairs();
        assert!(
            std::fs::read_dir(d.path().join("cache/tmp"))
                .unwrap()
                .next()
                .is_none(),
            "round {round}: temp files left"
        );
        for e in cache.list() {
            let mut f = cache.open_file(&e.key).unwrap().unwrap();
            let mut bytes = Vec::new();
            f.read_to_end(&mut bytes).unwrap();
            assert_eq!(bytes.len() as u64, e.size, "round {round}: {} size", e.key);
            assert_eq!(
                hex::encode(Sha256::digest(&bytes)),
                e.sha256,
                "round {round}: {} content does not match its hash",
                e.key
            );
        }
        let journal = std::fs::read_to_string(d.path().join("journal")).unwrap_or_default();
        let (want, in_flight) = expected_state(&journal);
        for (key, sha) in &want {
            if in_flight.as_deref() == Some(key.as_str()) {
                continue;
            }
            let got = cache.get(key).map(|e| e.sha256);
            assert_eq!(
                &got, sha,
                "round {round}: {key}: a completed operation was lost"
            );
        }
        // The operation cut short went one way or the other; record which, so later rounds
        // hold the cache to it. (The journal keeps growing: each child continues where the
        // last one died.) A torn last line gets its own line ending first.
        if let Some(key) = in_flight {
            interrupted += 1;
            let mut j = std::fs::OpenOptions::new()
                .append(true)
                .open(d.path().join("journal"))
                .unwrap();
            let sep = if journal.ends_with('\n') { "" } else { "\n" };
            match cache.get(&key) {
                Some(e) => note(&mut j, format!("{sep}done {key} {}\n", e.sha256)),
                None => note(&mut j, format!("{sep}evicted {key}\n")),
            }
        }
        drop(cache);
    }
    let elapsed = started.elapsed();
    eprintln!(
        "{kills} kills in {elapsed:?}: {interrupted} cut an operation short, \
         recovery made {repairs} repairs"
    );
    assert!(
        repairs > 0 && interrupted >= kills / 4,
        "the kills rarely interrupted anything: the test is not biting"
    );
}
