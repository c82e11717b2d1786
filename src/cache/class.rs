//! File classes: which of the four kinds of phone file (config, defaults, firmware, locale) a
//! name is, so the sync worker can revalidate each kind at its own pace (interface.md
//! `sync.intervals`). Operators can override the defaults with `cache.classes` rules.

use serde::{Deserialize, Serialize};

/// The kind of a phone file; decides how often sync revalidates it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileClass {
    /// Per-device files that change whenever an admin edits the phone: `SEP<MAC>.cnf.xml` (and
    /// `.sgn`/`.enc.sgn`), CUCM-generated `DR<uuid>.xml`, `SK<uuid>.xml`, `DefaultFP<uuid>.xml`,
    /// `ConfigFileCacheList.txt`.
    Config,
    /// Cluster-wide files: `XMLDefault.cnf.xml`, `*.tlv` trust lists, ring lists, dial plan,
    /// tones, soft keys, `WLANDefault.xml`, `Desktops/...`.
    Defaults,
    /// Versioned images and their `.loads` lists: a firmware name never changes content.
    Firmware,
    /// Anything under a locale directory such as `English_United_States/`.
    Locale,
    Other,
}

impl FileClass {
    pub fn as_str(self) -> &'static str {
        match self {
            FileClass::Config => "config",
            FileClass::Defaults => "defaults",
            FileClass::Firmware => "firmware",
            FileClass::Locale => "locale",
            FileClass::Other => "other",
        }
    }
}

impl std::fmt::Display for FileClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One `cache.classes` entry: `{pattern: "*.foo", class: firmware}`.
///
/// The pattern is a glob matched against the case-folded name: `*` matches within one path
/// component, `**` across components, `?` one character. A pattern without `/` is matched
/// against the last component only (like `.gitignore`), so `*.foo` also classes
/// `English_United_States/x.foo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassRule {
    pub pattern: String,
    pub class: FileClass,
}

/// Operator rules (first match wins) in front of the built-in defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClassRules {
    rules: Vec<ClassRule>,
}

impl ClassRules {
    pub fn new(rules: Vec<ClassRule>) -> ClassRules {
        let rules = rules
            .into_iter()
            .map(|r| ClassRule {
                pattern: r.pattern.to_lowercase(),
                class: r.class,
            })
            .collect();
        ClassRules { rules }
    }

    /// The class of a case-folded key (as [`crate::name::FileName::key`] gives it).
    pub fn classify(&self, key: &str) -> FileClass {
        let key_lower;
        let key = if key.bytes().any(|b| b.is_ascii_uppercase()) {
            key_lower = key.to_lowercase();
            &key_lower
        } else {
            key
        };
        let base = key.rsplit('/').next().unwrap_or(key);
        for rule in &self.rules {
            let subject = if rule.pattern.contains('/') {
                key
            } else {
                base
            };
            if glob_match(rule.pattern.as_bytes(), subject.as_bytes()) {
                return rule.class;
            }
        }
        default_class(key, base)
    }
}

/// The built-in rules; see [`FileClass`] for what each class holds.
fn default_class(key: &str, base: &str) -> FileClass {
    if is_config(base) {
        return FileClass::Config;
    }
    // Before the defaults: `United_States/g3-tones.xml` is the locale's copy of the tones.
    if is_locale_path(key) {
        return FileClass::Locale;
    }
    if is_defaults(key, base) {
        return FileClass::Defaults;
    }
    const FIRMWARE_EXT: [&str; 6] = [".loads", ".sbn", ".sgn", ".bin", ".tar", ".zup"];
    if FIRMWARE_EXT.iter().any(|e| base.ends_with(e)) {
        return FileClass::Firmware;
    }
    FileClass::Other
}

fn is_config(base: &str) -> bool {
    if base.starts_with("sep")
        && [".cnf.xml", ".cnf.xml.sgn", ".cnf.xml.enc.sgn", ".cnf"]
            .iter()
            .any(|s| base.ends_with(s))
    {
        return true;
    }
    if base == "configfilecachelist.txt" {
        return true;
    }
    // CUCM-generated per-device files: DR<uuid>.xml, SK<uuid>.xml, DefaultFP<uuid>.xml.
    for prefix in ["defaultfp", "dr", "sk"] {
        if let Some(rest) = base
            .strip_prefix(prefix)
            .and_then(|r| r.strip_suffix(".xml"))
        {
            if rest.len() >= 8 && rest.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
                return true;
            }
        }
    }
    false
}

fn is_defaults(key: &str, base: &str) -> bool {
    const NAMES: [&str; 12] = [
        "xmldefault.cnf.xml",
        "xmldefault.cnf.xml.sgn",
        "ringlist.xml",
        "distinctiveringlist.xml",
        "dialplan.xml",
        "g3-tones.xml",
        "softkeys.xml",
        "wlandefault.xml",
        "sipdefault.cnf",
        "xmldefault.cnf",
        "os79xx.txt",
        "ringlist-wb.xml",
    ];
    NAMES.contains(&base) || base.ends_with(".tlv") || key.starts_with("desktops/")
}

/// A first path component made of at least two alphabetic words joined by `_`, as Cisco names
/// its locale directories (`English_United_States`, `United_States`, `French_France`).
fn is_locale_path(key: &str) -> bool {
    let Some((first, _)) = key.split_once('/') else {
        return false;
    };
    let words: Vec<&str> = first.split('_').collect();
    words.len() >= 2
        && words
            .iter()
            .all(|w| !w.is_empty() && w.chars().all(|c| c.is_alphabetic()))
}

/// Glob match: `*` within a component, `**` across components, `?` one non-`/` character.
fn glob_match(pat: &[u8], s: &[u8]) -> bool {
    match pat.first() {
        None => s.is_empty(),
        Some(b'*') => {
            let across = pat.get(1) == Some(&b'*');
            let rest = if across { &pat[2..] } else { &pat[1..] };
            for i in 0..=s.len() {
                if glob_match(rest, &s[i..]) {
                    return true;
                }
                if i < s.len() && s[i] == b'/' && !across {
                    return false;
                }
            }
            false
        }
        Some(b'?') => !s.is_empty() && s[0] != b'/' && glob_match(&pat[1..], &s[1..]),
        Some(&c) => !s.is_empty() && s[0] == c && glob_match(&pat[1..], &s[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::name::FileName;

    fn class(rules: &ClassRules, raw: &str) -> FileClass {
        rules.classify(FileName::parse(raw).unwrap().key())
    }

    #[test]
    fn phone_boot_names_get_their_domain_class() {
        let r = ClassRules::default();
        let cases = [
            ("SEP001122AABBCC.cnf.xml", FileClass::Config),
            ("SEP001122AABBCC.cnf.xml.sgn", FileClass::Config),
            ("SEP001122AABBCC.cnf.xml.enc.sgn", FileClass::Config),
            ("ConfigFileCacheList.txt", FileClass::Config),
            (
                "DR1b2c3d4e-0000-1111-2222-333344445555.xml",
                FileClass::Config,
            ),
            (
                "SK7f3e2a10-aaaa-bbbb-cccc-ddddeeeeffff.xml",
                FileClass::Config,
            ),
            (
                "DefaultFP7f3e2a10-aaaa-bbbb-cccc-ddddeeeeffff.xml",
                FileClass::Config,
            ),
            ("XMLDefault.cnf.xml", FileClass::Defaults),
            ("CTLSEP001122AABBCC.tlv", FileClass::Defaults),
            ("ITLFile.tlv", FileClass::Defaults),
            ("RINGLIST.XML", FileClass::Defaults),
            ("DistinctiveRingList.xml", FileClass::Defaults),
            ("dialplan.xml", FileClass::Defaults),
            ("g3-tones.xml", FileClass::Defaults),
            ("softkeys.xml", FileClass::Defaults),
            ("WLANDefault.xml", FileClass::Defaults),
            ("Desktops/320x212x12/List.xml", FileClass::Defaults),
            ("sip88xx.14-2-1-0101-15.loads", FileClass::Firmware),
            ("term41.default.loads", FileClass::Firmware),
            ("apps41.9-4-2TH1-1.sbn", FileClass::Firmware),
            ("kern88xx.14-2-1-0101-15.sgn", FileClass::Firmware),
            ("rootfs88xx.14-2-1.zz.sgn", FileClass::Firmware),
            ("cvm41sccp.9-4-2.bin1.sgn", FileClass::Firmware),
            ("jar41sip.bin", FileClass::Firmware),
            ("English_United_States/mk-sip.jar", FileClass::Locale),
            ("United_States/g3-tones.xml", FileClass::Locale),
            ("French_France/glyphs.sgn", FileClass::Locale),
            ("notes.txt", FileClass::Other),
            ("skins.xml", FileClass::Other),
            ("drivers/readme.xml", FileClass::Other),
        ];
        for (name, want) in cases {
            assert_eq!(class(&r, name), want, "{name}");
        }
    }

    #[test]
    fn operator_rules_win_over_defaults_first_match_first() {
        let r = ClassRules::new(vec![
            ClassRule {
                pattern: "*.FOO".into(),
                class: FileClass::Firmware,
            },
            ClassRule {
                pattern: "special/**".into(),
                class: FileClass::Config,
            },
            ClassRule {
                pattern: "*.foo".into(),
                class: FileClass::Other,
            },
            ClassRule {
                pattern: "dialplan.xml".into(),
                class: FileClass::Config,
            },
        ]);
        assert_eq!(class(&r, "x.foo"), FileClass::Firmware);
        assert_eq!(
            class(&r, "English_United_States/x.foo"),
            FileClass::Firmware
        );
        assert_eq!(class(&r, "Special/a/b.xml"), FileClass::Config);
        assert_eq!(class(&r, "DialPlan.xml"), FileClass::Config);
        assert_eq!(class(&r, "softkeys.xml"), FileClass::Defaults);
    }

    #[test]
    fn glob_star_stays_within_a_component() {
        assert!(glob_match(b"a/*.x", b"a/b.x"));
        assert!(!glob_match(b"a/*.x", b"a/b/c.x"));
        assert!(glob_match(b"a/**.x", b"a/b/c.x"));
        assert!(glob_match(b"?b*", b"abcd"));
        assert!(!glob_match(b"?b", b"/b"));
    }
}
