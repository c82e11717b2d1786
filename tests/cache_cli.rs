//! `branchtftp cache import|ls|verify|evict`, run as the built binary, as an operator would.

use std::path::Path;
use std::process::{Command, Output};

fn branchtftp(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_branchtftp"))
        .args(args)
        .env_remove("BRANCHTFTP_CONFIG")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn write(root: &Path, rel: &str, bytes: &[u8]) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, bytes).unwrap();
}

#[test]
fn operator_imports_lists_verifies_and_evicts() {
    let d = tempfile::tempdir().unwrap();
    let usb = d.path().join("usb");
    write(&usb, "sip88xx.14-2-1-0101-15.loads", &[1u8; 900]);
    write(&usb, "kern88xx.14-2-1-0101-15.sgn", &vec![2u8; 300_000]);
    write(&usb, "English_United_States/mk-sip.jar", &[3u8; 40_000]);
    write(&usb, "SEP001122AABBCC.cnf.xml", b"<device/>");
    write(&usb, "bad\x01name.xml", b"?");
    let cache_dir = d.path().join("cache");
    let cfg = d.path().join("branchtftp.yaml");
    std::fs::write(
        &cfg,
        format!("cache:\n  dir: {}\n  max_size: 1GiB\n", cache_dir.display()),
    )
    .unwrap();
    let c = cfg.to_str().unwrap();

    let o = branchtftp(&["cache", "import", usb.to_str().unwrap(), "-c", c]);
    assert!(o.status.success(), "{o:?}");
    let out = stdout(&o);
    assert!(out.contains("imported 4 files"), "{out}");
    assert!(out.contains("1 skipped"), "{out}");
    // Importing again changes nothing.
    let o = branchtftp(&["cache", "import", usb.to_str().unwrap(), "-c", c]);
    assert!(stdout(&o).contains("imported 0 files"), "{}", stdout(&o));
    assert!(stdout(&o).contains("4 unchanged"), "{}", stdout(&o));

    let o = branchtftp(&["cache", "ls", "-c", c]);
    assert!(o.status.success(), "{o:?}");
    let out = stdout(&o);
    let header = out.lines().next().unwrap();
    for col in ["NAME", "CLASS", "SIZE", "AGE", "SOURCE", "HITS"] {
        assert!(header.contains(col), "{header}");
    }
    let row = |name: &str| {
        out.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} not listed:\n{out}"))
            .to_string()
    };
    assert!(row("kern88xx.14-2-1-0101-15.sgn").contains("firmware"));
    assert!(row("kern88xx.14-2-1-0101-15.sgn").contains("293.0 KiB"));
    assert!(row("English_United_States/mk-sip.jar").contains("locale"));
    assert!(row("SEP001122AABBCC.cnf.xml").contains("config"));
    assert!(row("SEP001122AABBCC.cnf.xml").contains("import:"));
    assert!(out.contains("4 files"), "{out}");

    let o = branchtftp(&["cache", "verify", "-c", c]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert!(stdout(&o).contains("0 corrupt"), "{}", stdout(&o));

    // Bit rot in the firmware image: same size, different bytes.
    let victim = cache_dir.join("files/kern88xx.14-2-1-0101-15.sgn");
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[123_456] ^= 0x40;
    std::fs::write(&victim, bytes).unwrap();
    let o = branchtftp(&[
        "cache",
        "verify",
        "--cache-dir",
        cache_dir.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let out = stdout(&o);
    assert!(out.contains("CORRUPT kern88xx.14-2-1-0101-15.sgn"), "{out}");
    assert!(out.contains("1 corrupt"), "{out}");
    let quarantined: Vec<_> = std::fs::read_dir(cache_dir.join("quarantine"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(quarantined.len(), 1);
    assert!(quarantined[0].starts_with("kern88xx.14-2-1-0101-15.sgn."));
    assert!(!victim.exists());
    let o = branchtftp(&["cache", "verify", "-c", c]);
    assert_eq!(o.status.code(), Some(0), "corrupt entry dropped: {o:?}");

    let o = branchtftp(&[
        "cache",
        "evict",
        "english_united_states/MK-SIP.JAR",
        "-c",
        c,
    ]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let o = branchtftp(&[
        "cache",
        "evict",
        "English_United_States/mk-sip.jar",
        "-c",
        c,
    ]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(stdout(&o).contains("not in the cache"));

    let out = stdout(&branchtftp(&["cache", "ls", "-c", c]));
    assert!(!out.contains("mk-sip.jar"), "{out}");
    assert!(!out.contains("kern88xx"), "{out}");
    assert!(out.contains("2 files"), "{out}");
}

#[test]
fn unusable_config_or_cache_dir_is_an_error_naming_it() {
    let d = tempfile::tempdir().unwrap();
    let missing = d.path().join("nope.yaml");
    let o = branchtftp(&["cache", "ls", "-c", missing.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("nope.yaml"));
    let file = d.path().join("plainfile");
    std::fs::write(&file, b"x").unwrap();
    let o = branchtftp(&["cache", "ls", "--cache-dir", file.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("plainfile"));
}
